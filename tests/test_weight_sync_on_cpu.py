"""Weight sync: buckets (pure), in-place updates into the real vLLM engine, sync points."""
import time

import pytest
import torch

from actors.weight_sync import (BucketMeta, ObjectStoreTransport, export_state, pack_buckets,
                                plan_buckets, unpack_bucket)


# ----------------------------------------------------------------------------- pure buckets
def test_pack_unpack_roundtrip_mixed_dtypes():
    named = [("a", torch.arange(6, dtype=torch.float32).view(2, 3)),       # 24 bytes
             ("b", torch.tensor([1.5, -2.0], dtype=torch.bfloat16)),        # 4 bytes
             ("c", torch.arange(3, dtype=torch.int64)),                     # 24 bytes
             ("d", torch.ones(10, dtype=torch.float32))]                    # 40 bytes
    buckets = list(pack_buckets(named, bucket_bytes=30))
    # a (24) | b fits (28) | c would make 52 > 30 -> new | d would make 64 -> new
    assert [m.names for m, _ in buckets] == [["a", "b"], ["c"], ["d"]]
    assert [m.nbytes for m, _ in buckets] == [28, 24, 40] and buckets[0][0].offsets == [0, 24]
    back = dict(kv for m, flat in buckets for kv in unpack_bucket(m, flat))
    for name, t in named:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_oversized_tensor_gets_its_own_bucket_and_bad_sizes_fail():
    named = [("small", torch.zeros(2)), ("big", torch.zeros(100)), ("tail", torch.zeros(1))]
    assert [[n for n, _ in b] for b in plan_buckets(named, bucket_bytes=16)] == [["small"], ["big"], ["tail"]]
    with pytest.raises(ValueError, match="metadata says"):
        unpack_bucket(BucketMeta(["x"], [[2]], ["float32"], [0], 8), torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        list(plan_buckets(named, bucket_bytes=0))


def test_export_state_drops_tied_head(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    names = [n for n, _ in export_state(model)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == len(model.state_dict()) - 1


# ----------------------------------------------------------------------------- the engine
def _hf_logprobs(model, seq):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def hf_model(tiny_model_path, rollout_worker, ray_session):
    """The HF copy of the session model; the engine gets its original weights back afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    model.load_state_dict(original)
    version = ray_session.get(rollout_worker.info.remote())["policy_version"]
    ray_session.get(rollout_worker.update_weights.remote(
        ObjectStoreTransport.publish(export_state(model)), version + 1))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_update_weights_matches_transformers_and_changes_the_engine(rollout_worker, ray_session, hf_model):
    ray = ray_session
    tok_ids = ray.get(rollout_worker.render_prompts.remote(["What is 2 + 3?"]))[0]
    completion = list(" <think> 2 plus 3 is 5 </think> <answer> 5 </answer>".encode())
    seq = tok_ids + completion
    before = torch.tensor(ray.get(rollout_worker.sequence_logprobs.remote([seq]))[0])
    assert (before - _hf_logprobs(hf_model, seq)).abs().max() <= 1e-3

    _perturb(hf_model, seed=1)
    handles = ObjectStoreTransport.publish(export_state(hf_model), bucket_bytes=1 << 20)
    assert len(handles) > 3  # bucketed: several transfers, far fewer than tensors
    version = ray.get(rollout_worker.info.remote())["policy_version"] + 1
    res = ray.get(rollout_worker.update_weights.remote(handles, version))
    assert res["version"] == version and res["tensors"] == len(hf_model.state_dict()) - 1

    after = torch.tensor(ray.get(rollout_worker.sequence_logprobs.remote([seq]))[0])
    expect = _hf_logprobs(hf_model, seq)
    diff, moved = (after - expect).abs().max().item(), (after - before).abs().max().item()
    print(f"after update: max|vllm - hf| = {diff:.2e}; max change vs before = {moved:.3f}")
    assert diff <= 1e-3 and moved > 1e-2
    # greedy continuation of the same prompt reflects the new weights too (prefix cache reset)
    rollouts = ray.get(rollout_worker.generate.remote(["What is 2 + 3?"], n=1, temperature=0.0, max_tokens=8))
    assert rollouts[0].policy_version == version
    lp = _hf_logprobs(hf_model, rollouts[0].prompt_ids + rollouts[0].completion_ids)[-8:]
    assert (torch.tensor(rollouts[0].logprobs) - lp).abs().max() <= 1e-3


def test_two_workers_updated_from_one_set_of_weights_agree(rollout_worker, ray_session, hf_model,
                                                           tiny_model_path):
    from drivers.config import build_config
    from drivers.ray_utils import rollout_worker_actor

    ray = ray_session
    second = rollout_worker_actor(tiny_model_path, build_config({}))
    try:
        _perturb(hf_model, seed=2)
        handles = ObjectStoreTransport.publish(export_state(hf_model))
        ray.get([w.update_weights.remote(handles, 7) for w in (rollout_worker, second)])
        prompts = ["What is 2 + 3?", "Name a prime number.", "Count to three."]
        outs = ray.get([w.generate.remote(prompts, n=1, temperature=0.0, max_tokens=24)
                        for w in (rollout_worker, second)])
        assert [r.completion_ids for r in outs[0]] == [r.completion_ids for r in outs[1]]
        assert all(r.policy_version == 7 for out in outs for r in out)
        sums = ray.get([w.checksum.remote() for w in (rollout_worker, second)])
        assert sums[0] == pytest.approx(sums[1], rel=1e-12)
    finally:
        ray.kill(second)


def test_continuous_batching_and_sync_points(rollout_worker, ray_session, hf_model):
    ray = ray_session
    long_call = rollout_worker.generate.remote(["Tell a long story."], n=4, max_tokens=500,
                                               ignore_eos=True)
    deadline = time.time() + 60
    while ray.get(rollout_worker.num_in_flight.remote()) == 0 and time.time() < deadline:
        time.sleep(0.02)
    short_call = rollout_worker.generate.remote(["Hi."], n=1, max_tokens=4, ignore_eos=True)
    ready, _ = ray.wait([long_call, short_call], num_returns=1, timeout=120)
    assert ready == [short_call]            # joined the running batch, finished first
    assert len(ray.get(short_call)[0].completion_ids) == 4

    # "finish" sync point: the long requests complete under the old version first
    v = ray.get(rollout_worker.info.remote())["policy_version"]
    handles = ObjectStoreTransport.publish(export_state(hf_model))
    ray.get(rollout_worker.update_weights.remote(handles, v + 1, mode="finish"))
    long_out = ray.get(long_call)
    assert all(len(r.completion_ids) == 500 and r.policy_version == v for r in long_out)

    # "abort" sync point: in-flight requests come back marked, version moves on
    aborted = rollout_worker.generate.remote(["Tell a long story."], n=2, max_tokens=500, ignore_eos=True)
    while ray.get(rollout_worker.num_in_flight.remote()) == 0 and time.time() < deadline:
        time.sleep(0.02)
    ray.get(rollout_worker.update_weights.remote(handles, v + 2, mode="abort"))
    out = ray.get(aborted)
    assert [r.finish_reason for r in out] == ["abort", "abort"] and out[0].completion_ids == []
    assert ray.get(rollout_worker.generate.remote(["Hi."], n=1, max_tokens=2))[0].policy_version == v + 2

    # a second sync command while a "finish" sync point waits runs after it (it used to replace it,
    # and the first caller waited forever)
    busy = rollout_worker.generate.remote(["Tell a long story."], n=8, max_tokens=900, ignore_eos=True)
    while ray.get(rollout_worker.num_in_flight.remote()) == 0 and time.time() < deadline + 60:
        time.sleep(0.02)
    update = rollout_worker.update_weights.remote(handles, v + 3, mode="finish")
    while ray.get(rollout_worker.info.remote())["syncs_waiting"] < 1 and time.time() < deadline + 90:
        time.sleep(0.01)        # the actor runs calls concurrently: the second must come after the first
    second = rollout_worker.update_weights.remote(handles, v + 4, mode="finish")
    while ray.get(rollout_worker.info.remote())["syncs_waiting"] < 2 and time.time() < deadline + 90:
        time.sleep(0.01)
    assert not ray.wait([busy], timeout=0)[0]                        # both queued while it generated
    first_out, second_out = ray.get([update, second], timeout=120)
    assert (first_out["version"], second_out["version"]) == (v + 3, v + 4)
    assert all(r.policy_version == v + 2 and len(r.completion_ids) == 900 for r in ray.get(busy))
    assert ray.get(rollout_worker.info.remote())["policy_version"] == v + 4


def test_partial_rollouts_continue_under_the_new_weights_and_keep_each_tokens_version(
        rollout_worker, ray_session, hf_model):
    """mode "partial", twice: the samples in flight at a sync point stop, the new weights load, and
    they continue from where they were, within their max_tokens. Each token carries the version
    that sampled it and that version's logprob (each segment checked against transformers)."""
    ray = ray_session
    v = ray.get(rollout_worker.info.remote())["policy_version"]
    states = [{k: t.clone() for k, t in hf_model.state_dict().items()}]
    call = rollout_worker.generate.remote(["Tell a long story."], n=2, max_tokens=900, ignore_eos=True, seed=11)
    for k, seed in enumerate((3, 4), start=1):
        deadline = time.time() + 60
        while ray.get(rollout_worker.in_flight_tokens.remote()) < 40 and time.time() < deadline:
            time.sleep(0.005)                                  # some tokens under the current version
        _perturb(hf_model, seed=seed)
        states.append({k: t.clone() for k, t in hf_model.state_dict().items()})
        ray.get(rollout_worker.update_weights.remote(ObjectStoreTransport.publish(export_state(hf_model)), v + k,
                                                     mode="partial"))
    out = ray.get(call)
    assert len(out) == 2
    for r in out:
        counts = [r.token_versions.count(v + k) for k in range(3)]
        print(f"partial rollout: tokens per version v{v}..v{v + 2}: {counts}")
        assert r.finish_reason == "length" and len(r.completion_ids) == len(r.logprobs) == 900
        assert r.token_versions == sorted(r.token_versions) and all(c > 0 for c in counts)
        assert r.policy_version == v                          # staleness counts from the oldest token
        seq, behaviour, start = r.prompt_ids + r.completion_ids, torch.tensor(r.logprobs), 0
        for k, state in enumerate(states):
            hf_model.load_state_dict(state)
            ref = _hf_logprobs(hf_model, seq)[-900:]
            part = slice(start, start + counts[k])
            assert (behaviour[part] - ref[part]).abs().max() <= 1e-3, f"version {v + k}"
            if k:        # the versions really differ on these tokens
                hf_model.load_state_dict(states[k - 1])
                assert (_hf_logprobs(hf_model, seq)[-900:][part] - ref[part]).abs().max() > 1e-2
            start += counts[k]
    hf_model.load_state_dict(states[-1])
