"""The vLLM rollout worker on the tiny model: group sampling and logprob parity with transformers."""
import pytest
import torch


@pytest.fixture(scope="module")
def sampled(rollout_worker, ray_session):
    prompts = ["What is 2 + 3?", "Name a prime number."]
    return ray_session.get(rollout_worker.generate.remote(prompts, n=4, temperature=1.0, max_tokens=32))


def test_groups_are_contiguous_and_complete(sampled, rollout_worker, ray_session):
    assert [r.prompt_index for r in sampled] == [0] * 4 + [1] * 4
    for r in sampled:
        assert 1 <= len(r.completion_ids) <= 32
        assert len(r.logprobs) == len(r.completion_ids)
        assert r.finish_reason in {"stop", "length"}
        assert r.policy_version == ray_session.get(rollout_worker.info.remote())["policy_version"]
        assert all(lp <= 0.0 for lp in r.logprobs)
    # same prompt, same rendered ids; different prompts differ
    assert sampled[0].prompt_ids == sampled[3].prompt_ids != sampled[4].prompt_ids


def test_vllm_logprobs_match_transformers_fp32(sampled, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    worst = 0.0
    for r in sampled:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1]
        hf = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        worst = max(worst, (hf - torch.tensor(r.logprobs)).abs().max().item())
    print(f"max |logp_vllm - logp_hf| = {worst:.2e} over {sum(len(r.logprobs) for r in sampled)} tokens")
    assert worst <= 1e-3


def test_an_ending_engine_thread_fails_every_waiting_caller():
    """_fail_waiting (the engine loop's exit): in-flight, paused, held and still-queued requests
    and sync points all get an error; what is already resolved keeps its result."""
    import queue
    from concurrent.futures import Future

    from actors.rollout import RolloutWorker, _Request

    def req():
        return _Request(0, "p", [1], None, Future())

    worker = RolloutWorker.__new__(RolloutWorker)           # no engine: the bookkeeping only
    flying, paused, held_add, queued_add, done = req(), req(), req(), req(), req()
    done.future.set_result("kept")
    worker._in_flight = {"r0": flying, "r1": done}
    worker._commands = queue.Queue()
    barrier, held_sync, queued_sync = Future(), Future(), Future()
    worker._commands.put(("add", [queued_add]))
    worker._commands.put(("sync", None, queued_sync, ""))
    worker._commands.put(("stop",))
    worker._fail_waiting([("add", [held_add]), ("sync", None, held_sync, "")], [paused], (None, barrier))
    waiting = [flying.future, paused.future, held_add.future, queued_add.future, barrier, held_sync, queued_sync]
    assert all(isinstance(f.exception(timeout=0), RuntimeError) for f in waiting)
    assert done.future.result(timeout=0) == "kept" and worker._in_flight == {} and worker._commands.empty()


def test_the_cpu_engine_runs_kv_blocks_of_32(rollout_worker, ray_session):
    """rollout.block_size None: the CPU engine gets blocks of 32 tokens (vLLM's CPU default is 128;
    32 decoded 1.5x faster at the tiny size), and its attention runs them."""
    from actors.rollout import CPU_BLOCK_SIZE

    def engine_block_size(worker):     # runs in the actor (__ray_call__)
        return worker.engine.vllm_config.cache_config.block_size

    assert CPU_BLOCK_SIZE == 32
    assert ray_session.get(rollout_worker.__ray_call__.remote(engine_block_size)) == CPU_BLOCK_SIZE


def test_the_text_decoded_once_equals_vllms_own(rollout_worker, ray_session):
    """Without stop strings the worker turns vLLM's per-token detokenizer off and decodes each
    sample once at its end. Same seeds, detokenizer on and off: the same ids and texts, also for
    samples a stop token ended (vLLM leaves the stop token out of the text; so must the worker)."""
    from collections import Counter

    prompts = ["What is 2 + 3?", "Name a prime number.", "What is 17 + 5?"]

    def sample(**kw):
        return ray_session.get(rollout_worker.generate.remote(prompts, n=4, temperature=1.0, max_tokens=32,
                                                              seed=7, **kw))

    def record_requests(worker):     # runs in the actor (__ray_call__): note each request's detokenize flag
        submit, worker.detokenize_flags = worker._submit, []

        def recording(items):
            worker.detokenize_flags += [params.detokenize for *_, params in items]
            return submit(items)
        worker._submit = recording

    def stop_recording(worker):      # the class's own _submit again; the flags seen
        del worker._submit
        return worker.detokenize_flags

    first = sample()
    stop = Counter(t for r in first for t in r.completion_ids[1:]).most_common(1)[0][0]  # ends some samples early
    ray_session.get(rollout_worker.__ray_call__.remote(record_requests))
    try:
        for kw in ({}, {"stop_token_ids": [stop]}):
            fast, slow = sample(**kw), sample(detokenize=True, **kw)
            assert [r.completion_ids for r in fast] == [r.completion_ids for r in slow]
            assert [r.text for r in fast] == [r.text for r in slow]
            assert sum(len(r.text) for r in fast) > 0
        with_stop_string = sample(stop=["</answer>"])
    finally:
        flags = ray_session.get(rollout_worker.__ray_call__.remote(stop_recording))
    # by default vLLM's detokenizer is off; a stop string needs it (it matches text)
    n = len(prompts) * 4
    assert flags == ([False] * n + [True] * n) * 2 + [True] * n and len(with_stop_string) == n
    # some samples ended on the stop token (others on EOS or at max_tokens)
    assert any(r.finish_reason == "stop" and r.completion_ids[-1] == stop for r in fast)


def test_only_byte_level_tokenizers_decode_at_the_end(tiny_model_path):
    """A SentencePiece decoder's text depends on what came before (a leading space): vLLM's
    detokenizer, primed with the prompt, stays on for those."""
    from types import SimpleNamespace

    from tokenizers import decoders
    from transformers import AutoTokenizer

    from actors.rollout import byte_level

    assert byte_level(AutoTokenizer.from_pretrained(tiny_model_path))
    assert not byte_level(SimpleNamespace(backend_tokenizer=SimpleNamespace(decoder=decoders.Metaspace())))
    assert not byte_level(object())        # a slow tokenizer: no backend to tell
