"""DeepSpeed learner ranks as Ray actors: equality with a plain PyTorch step, resume, NaN guard."""
import math
import random

import pytest
import torch

from actors.grpo import grpo_loss
from actors.learner import Learner, common_prefix_len, pack_micro_batches, pack_prompt_groups

LOSS = dict(eps_low=0.2, eps_high=0.28, beta=0.0, agg="token-mean")
# Adam's first step is g / (|g| + eps): with eps 1e-8, fp32 summation-order noise in
# gradients near 0 is amplified to O(lr). eps 1e-5 keeps the comparison about the gradients.
OPT = dict(lr=1e-3, weight_decay=0.01, adam_betas=(0.9, 0.99), adam_eps=1e-5, grad_clip=1.0)


def test_pack_micro_batches_by_hand():
    # budget 12 padded tokens: [5, 3] -> 2*5=10 ok; +4 -> 3*5=15 > 12 -> new; [4, 2] -> 8; +6 -> 18 -> new
    assert pack_micro_batches([5, 3, 4, 2, 6], 12) == [[0, 1], [2, 3], [4]]
    assert pack_micro_batches([20, 1], 12) == [[0], [1]]  # an oversized row goes alone
    assert pack_micro_batches([], 12) == []
    with pytest.raises(ValueError):
        pack_micro_batches([1], 0)


def test_pack_prompt_groups_by_hand():
    # prompts A (3 tokens), B (2 tokens); a micro-batch costs prompts * (longest prompt - 1)
    # + rows * (longest completion + 1)
    A, B = [1, 2, 3], [4, 5]
    ids = [A + [9, 9], B + [9], A + [9], A + [9, 9, 9, 9], B + [9, 9]]
    plens = [3, 2, 3, 3, 2]
    # budget 30: A -> 2 + 3 rows * 5 = 17; A and B together -> 2 prompts * 2 + 5 rows * 5 = 29 fits
    assert pack_prompt_groups(ids, plens, 30) == [[0, 2, 3, 1, 4]]
    # budget 20: together 29 > 20; B alone -> 1 + 2 * 3 = 7
    assert pack_prompt_groups(ids, plens, 20) == [[0, 2, 3], [1, 4]]
    # budget 10: A's rows are packed within 10 - 2 = 8 padded tokens: [3, 2] -> 6, + 5 -> 15 > 8;
    # A's second part [3] (2 + 5 = 7) with B: 2 * 2 + 3 * 5 = 19 > 10
    assert pack_prompt_groups(ids, plens, 10) == [[0, 2], [3], [1, 4]]
    # group ids name the groups (the same prompt twice: two groups, packed together when they fit)
    assert pack_prompt_groups([A + [9], A + [9], A + [9]], [3, 3, 3], 30, group_ids=[7, 8, 7]) == [[0, 2, 1]]


def test_common_prefix_len_by_hand():
    # the tokens all prefixes start with, leaving each at least one of its own
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2          # identical: one token left each
    assert common_prefix_len([[1, 2], [3, 2]]) == 0
    assert common_prefix_len([[1, 2, 3]]) == 0                      # one prompt: nothing to split
    assert common_prefix_len([[1], [1, 2]]) == 0


def make_batch(model_path, n_rows=8, seed=0, group_size=1, system=0):
    """Synthetic GRPO rows; behaviour logprobs = the model's own + noise (ratios off 1, some clipped).
    Consecutive runs of `group_size` rows share a prompt (a GRPO group); every prompt starts with
    the same `system` tokens."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rows, plens = [], []
    for r in range(n_rows):
        if r % group_size == 0:
            prompt = [5, 6, 7, 8, 9, 10][:system] + [rng.randrange(256) for _ in range(rng.randint(3, 8))]
            p = len(prompt)
        c = rng.randint(2, 12)
        rows.append(prompt + [rng.randrange(256) for _ in range(c)])
        plens.append(p)
    behavior = []
    g = torch.Generator().manual_seed(seed)
    for ids, p in zip(rows, plens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][p - 1:]
        behavior.append((lp + 0.3 * torch.randn(lp.shape, generator=g)).tolist())
    adv = [rng.choice([-1.0, -0.5, 0.5, 1.0]) for _ in rows]
    return {"input_ids": rows, "prompt_lens": plens, "advantages": adv, "behavior_logp": behavior}


def reference_step(model_path, batch, learner_old=False):
    """Single-process plain PyTorch: full-batch grpo_loss, backward, clip, AdamW.
    learner_old: the proximal policy is the model's own logprobs from a separate no-grad forward
    (the behaviour logprobs then weight tokens by TIS, cap 2); else the behaviour logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=OPT["lr"], betas=OPT["adam_betas"], eps=OPT["adam_eps"],
                            weight_decay=OPT["weight_decay"])
    width = max(len(r) for r in batch["input_ids"])
    B = len(batch["input_ids"])
    ids = torch.zeros(B, width, dtype=torch.long)
    attn = torch.zeros(B, width, dtype=torch.long)
    old = torch.zeros(B, width - 1)
    mask = torch.zeros(B, width - 1)
    for i, (r, p, b) in enumerate(zip(batch["input_ids"], batch["prompt_lens"], batch["behavior_logp"])):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        mask[i, p - 1:len(r) - 1] = 1
        old[i, p - 1:len(r) - 1] = torch.tensor(b)
    def forward():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]

    extra = {}
    if learner_old:
        behavior = old
        with torch.no_grad():
            old = forward()
        extra = dict(behavior_logp=behavior, rollout_correction="tis", is_cap=2.0)
    loss, _ = grpo_loss(forward(), old, torch.tensor(batch["advantages"]), mask, **LOSS, **extra)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["grad_clip"])
    opt.step()
    return loss.item(), {n: p.detach().clone() for n, p in model.named_parameters()}


def learner_group(model_path, world, stage, **extra):
    from drivers.ray_utils import ActorGroup
    from learner_args import learner_kwargs

    def kwargs(rank, addr, port):
        return learner_kwargs(model_path=model_path, rank=rank, world_size=world, master_addr=addr,
                              master_port=port, zero_stage=stage,
                              **{"micro_batch_tokens": 40, **OPT, **LOSS, **extra})

    return ActorGroup(Learner, world, kwargs_fn=kwargs, name=f"learner-zero{stage}")


def shard(batch, world):
    # uneven shards: rank 0 gets 5 rows, rank 1 the rest
    cut = [0, 5, len(batch["input_ids"])] if world == 2 else [0, len(batch["input_ids"])]
    return [({k: v[cut[r]:cut[r + 1]] for k, v in batch.items()},) for r in range(world)]


@pytest.mark.parametrize("stage,group_size,old_logp,attn,system", [
    (2, 4, "rollout", "auto", 0), (3, 4, "rollout", "auto", 4), (2, 1, "rollout", "auto", 0),
    (2, 4, "learner", "auto", 0), (3, 4, "learner", "auto", 0), (2, 4, "rollout", "eager", 4),
    (2, 4, "learner", "auto", 3)])
def test_two_ranks_match_a_plain_pytorch_step(ray_session, tiny_model_path, stage, group_size, old_logp, attn, system):
    """group_size 4: the shared-prompt forward (each prompt once, in a padded batch of a micro-batch's
    prompts; groups split across ranks and micro-batches) against the reference's full forward of every row.
    attn: the learner's attention (auto is sdpa in fp32; eager is bf16's on CPU). system: tokens every
    prompt starts with, which a micro-batch runs once before the rest of its prompts.
    old_logp "learner" (TIS against the engine's logprobs): the proximal logprobs are those of
    the update's own forward, detached, so each micro-batch runs the policy once (no pass of
    their own), and the update equals the reference's with a separate no-grad pass."""
    # with a common start: 4 groups and micro-batches of several prompts on both ranks
    batch = make_batch(tiny_model_path, n_rows=16 if system else 8, group_size=group_size, system=system)
    learner_old = old_logp == "learner"
    ref_loss, ref_weights = reference_step(tiny_model_path, batch, learner_old=learner_old)
    extra = dict(old_logp="learner", rollout_correction="tis", is_cap=2.0) if learner_old else {}
    # system 4: one micro-batch a rank, both with the common start; system 3: 100 tokens, two on
    # rank 1 (one with it, one without), one and a pad on rank 0
    extra.update(attn_implementation=attn, micro_batch_tokens={0: 40, 3: 100, 4: 200}[system])

    def count_forwards(learner):     # runs in the actor (__ray_call__); nested: pickled by value
        learner.forwards = 0

        def count(*_):
            learner.forwards += 1
        learner.engine.module.register_forward_pre_hook(count)

    group = learner_group(tiny_model_path, 2, stage, **extra)
    try:
        group.get([a.__ray_call__.remote(count_forwards) for a in group.actors])
        metrics = group.get(group.call_each("train_step", shard(batch, 2)))
        forwards = group.get([a.__ray_call__.remote(lambda learner: learner.forwards) for a in group.actors])
        plans = group.get([a.__ray_call__.remote(lambda learner, b: learner._plan(b, True), b)
                           for a, (b,) in zip(group.actors, shard(batch, 2))])
        weights = group.get(group.call("get_state_dict"))[0]
    finally:
        group.kill()
    # one pass per micro-batch, whichever old_logp (a shared-prompt pass calls the model twice: prompts,
    # rows; three times where the prompts start alike on both ranks: their common start, the rest, rows)
    shards = shard(batch, 2)
    assert forwards == [sum(2 + s if share else 1 for s in split) for micro, share, split in plans]
    # the common start runs where every rank's prompts of that micro-batch start alike (and only there)
    def starts_alike(b, m):     # two or more prompts (minus their last token) of >= 2 tokens, one first token
        prefixes = [tuple(b["input_ids"][i][:b["prompt_lens"][i] - 1]) for i in m]
        prefixes = [x for j, x in enumerate(prefixes) if j == 0 or x != prefixes[j - 1]]
        return len(prefixes) > 1 and len({x[0] for x in prefixes}) == 1 and min(map(len, prefixes)) >= 2

    for k in range(len(plans[0][0])):
        alike = all(starts_alike(b, micro[k]) for (micro, _, _), (b,) in zip(plans, shards))
        assert all(split[k] == alike for _, _, split in plans)
    if system:
        assert any(any(split) for _, _, split in plans)
    if system == 3:   # micro-batches with and without the common start, and a rank's pad among them
        assert {x for _, _, split in plans for x in split} == {True, False}
        assert any(not m for micro, _, _ in plans for m in micro)
    if group_size > 1:    # some micro-batch runs the prompts of two groups (of different lengths) at once
        assert any(len({len(b["input_ids"][i][:b["prompt_lens"][i]]) for i in m}) > 1
                   for (micro, _, _), (b,) in zip(plans, shards) for m in micro)
    if learner_old:
        assert metrics[0]["train/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert metrics[0]["train/mismatch_abs_mean"] > 0.1    # the batch adds noise of std .3 to the engine logprobs
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=0)  # identical on all ranks
    assert metrics[0]["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert metrics[0]["skipped"] == 0
    assert metrics[0]["train/clip_frac_high"] > 0 or learner_old     # learner old: ratio 1, nothing clipped
    worst = max((weights[n] - ref_weights[n]).abs().max().item() for n in ref_weights)
    moved = max((ref_weights[n] - w0).abs().max().item()
                for n, w0 in _initial(tiny_model_path).items())
    print(f"ZeRO-{stage}: loss {metrics[0]['loss']:.6f} vs ref {ref_loss:.6f}; max |w - w_ref| = {worst:.2e}"
          f" (update size {moved:.2e})")
    assert worst <= 1e-5 and moved > 1e-4


@pytest.mark.parametrize("zeros", ["one group", "every row", "one group, learner old_logp",
                                   "one group, ZeRO-3, gspo, seq-mean, 2 mini-batches"])
def test_rows_of_zero_advantage_are_not_run_and_the_update_is_the_full_batchs(ray_session, tiny_model_path, zeros):
    """skip_zero_advantage (the default): with beta 0 a row of advantage exactly 0 adds 0 to the
    loss and its gradient, so the learner does not run it but keeps its tokens in the token-mean
    denominator. Checked against the plain step over every row (same loss and weights). "one
    group": rank 1's whole shard is zeros (it runs only the pad forward that keeps ZeRO's
    collectives aligned); "every row": a zero gradient, and the optimizer still steps (AdamW's
    weight decay moves the weights); "learner old_logp" (TIS against the engine's logprobs):
    the run equals the same learner with the skip turned off; so does the ZeRO-3 case with
    GSPO's sequence ratio, the per-sequence mean and two updates a step."""
    batch = make_batch(tiny_model_path, group_size=4)
    zero = range(8) if zeros == "every row" else range(4, 8)
    batch["advantages"] = [0.0 if i in zero else a for i, a in enumerate(batch["advantages"])]
    extra = dict(old_logp="learner", rollout_correction="tis", is_cap=2.0) if "learner" in zeros else {}
    if "ZeRO-3" in zeros:
        extra = dict(policy_loss="gspo", agg="seq-mean-token-mean", mini_batches=2)
    stage = 3 if "ZeRO-3" in zeros else 2

    def run(**kw):
        group = learner_group(tiny_model_path, 2, stage, **{**extra, **kw})
        try:
            metrics = group.get(group.call_each("train_step", shard(batch, 2)))
            return metrics, group.get(group.call("get_state_dict"))[0]
        finally:
            group.kill()

    metrics, weights = run()
    if extra:
        ref_metrics, ref_weights = run(skip_zero_advantage=False)
        ref_loss = ref_metrics[0]["loss"]
        assert ref_metrics[0]["train/rows_not_run"] == 0
    else:
        ref_loss, ref_weights = reference_step(tiny_model_path, batch)
    assert metrics[0]["train/rows_not_run"] == len(zero) == metrics[1]["train/rows_not_run"]
    # every completion token of the batch, also over two updates (a count: summed, not averaged)
    assert metrics[0]["train/tokens"] == sum(len(x) - p for x, p in zip(batch["input_ids"], batch["prompt_lens"]))
    assert metrics[0]["loss"] == pytest.approx(ref_loss, abs=1e-6)
    worst = max((weights[n] - ref_weights[n]).abs().max().item() for n in ref_weights)
    moved = max((weights[n] - w0).abs().max().item() for n, w0 in _initial(tiny_model_path).items())
    print(f"{zeros}: loss {metrics[0]['loss']:.6f} vs ref {ref_loss:.6f}; max |w - w_ref| = {worst:.2e} (moved {moved:.2e})")
    if zeros == "every row":   # only weight decay: w * (1 - lr * wd), computed alike on both sides
        assert metrics[0]["loss"] == 0.0 and worst <= 1e-8 and moved >= 5e-6
        assert math.isnan(metrics[0]["train/entropy"])   # no row ran: no mean over rows run (logged as null)
    else:
        assert worst <= 1e-5 and moved > 1e-4
        assert metrics[0]["train/entropy"] > 0
    if not extra:   # token-mean, no KL: the policy loss over every token is the loss
        assert metrics[0]["train/policy_loss"] == pytest.approx(metrics[0]["loss"], abs=1e-6)


def _initial(model_path):
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_path).named_parameters()}


def test_resume_nan_guard_sft_and_export(ray_session, tiny_model_path, tmp_path, rollout_worker, outcome_seed,
                                        outcome_threads):
    from outcomes import report_outcome

    ray = ray_session
    batch1 = make_batch(tiny_model_path, seed=1 + 2 * outcome_seed)
    batch2 = make_batch(tiny_model_path, seed=2 + 2 * outcome_seed)
    group = learner_group(tiny_model_path, 2, 2, cpu_threads=outcome_threads or 1)
    try:
        group.get(group.call_each("train_step", shard(batch1, 2)))
        group.get(group.call("save_checkpoint", str(tmp_path / "ckpt"), "step1"))
        uninterrupted = group.get(group.call_each("train_step", shard(batch2, 2)))[0]["loss"]
        w_uninterrupted = group.get(group.call("get_state_dict"))[0]

        # resume: back to step 1, the same next step, bit for bit
        group.get(group.call("load_checkpoint", str(tmp_path / "ckpt"), "step1"))
        resumed = group.get(group.call_each("train_step", shard(batch2, 2)))[0]["loss"]
        w_resumed = group.get(group.call("get_state_dict"))[0]
        assert resumed == uninterrupted
        assert all(torch.equal(w_resumed[n], w_uninterrupted[n]) for n in w_resumed)
        with pytest.raises(ray.exceptions.RayTaskError, match="no checkpoint"):
            group.get(group.call("load_checkpoint", str(tmp_path / "missing")))

        # NaN guard: a non-finite loss on one rank (a NaN advantage in its shard) skips the step on
        # all ranks, weights untouched
        def checksum():
            return sum(float(t.double().sum()) for t in group.get(group.call("get_state_dict"))[0].values())
        before = checksum()
        poisoned = shard(batch2, 2)
        poisoned[0] = ({**poisoned[0][0], "advantages": [float("nan")] + poisoned[0][0]["advantages"][1:]},)
        bad = group.get(group.call_each("train_step", poisoned))
        assert all(m["skipped"] == 1.0 for m in bad)
        assert checksum() == before
        good = group.get(group.call_each("train_step", shard(batch2, 2)))
        assert good[0]["skipped"] == 0.0 and checksum() != before

        # SFT mode on the same engine: the NLL of a fixed batch falls
        sft = {"input_ids": batch1["input_ids"], "prompt_lens": batch1["prompt_lens"]}
        nlls = [group.get(group.call_each("sft_step", shard(sft, 2)))[0]["sft/nll"] for _ in range(4)]
        report_outcome("learner_sft_4_steps", "nll after 4 steps < first", nll_first=nlls[0], nll_last=nlls[-1])
        assert nlls[-1] < nlls[0]

        # export -> rollout engine: vLLM's logprobs equal the learner's weights' logprobs
        handles = group.get(group.call("export_weights", release_cache=True))[0]
        state = group.get(group.call("get_state_dict"))[0]
        version = ray.get(rollout_worker.info.remote())["policy_version"] + 1
        ray.get(rollout_worker.update_weights.remote(handles, version))
        group.get(group.call("save_checkpoint", str(tmp_path / "ckpt"), "final"))
    finally:
        group.kill()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "final" / "hf").eval()
    assert all(torch.equal(p, state[n]) for n, p in hf.named_parameters())
    seq = batch1["input_ids"][0]
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([seq])).logits[0, :-1], -1)
    expect = lp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    got = torch.tensor(ray.get(rollout_worker.sequence_logprobs.remote([seq]))[0])
    assert (got - expect).abs().max() <= 1e-3
    # give the session engine its original weights back
    original = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    from actors.weight_sync import ObjectStoreTransport, export_state

    ray.get(rollout_worker.update_weights.remote(ObjectStoreTransport.publish(export_state(original)),
                                                 version + 1))


@pytest.mark.parametrize("world,stage,system", [(1, 2, 0), (2, 3, 0), (2, 3, 4)])
def test_reference_model_and_learner_side_old_logp(ray_session, tiny_model_path, world, stage, system):
    """beta > 0 loads a reference; old_logp="learner" takes the proximal policy from the update's own forward and weights
    tokens by min(exp(old - behavior), cap). First step: ref == old == current, so ratio 1, KL 0,
    and the loss is the token mean of -A * w, computed here from the HF model. 2 ranks, ZeRO-3,
    uneven shards: the rank with fewer micro-batches still runs every parameter gather."""
    from transformers import AutoModelForCausalLM

    # shared prompts: old and ref too; system: every prompt starts with the same tokens (run once)
    batch = make_batch(tiny_model_path, n_rows=16 if system else 4 * world, seed=3, group_size=4 if system else 2,
                       system=system)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    num, den, diffs = 0.0, 0, []
    for ids, p, a, b in zip(batch["input_ids"], batch["prompt_lens"], batch["advantages"], batch["behavior_logp"]):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        old = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][p - 1:]
        w = torch.exp(old - torch.tensor(b)).clamp(max=2.0)
        num += float((-a * w).sum())
        den += len(b)
        diffs.append(old - torch.tensor(b))
    diffs = torch.cat(diffs)
    group = learner_group(tiny_model_path, world, stage, beta=0.1, old_logp="learner", is_cap=2.0,
                          micro_batch_tokens=200 if system else 40)
    try:
        m = group.get(group.call_each("train_step", shard(batch, world)), timeout=300)[0]
        plans = group.get([a.__ray_call__.remote(lambda learner, b: learner._plan(b, True), b)
                           for a, (b,) in zip(group.actors, shard(batch, world))])
    finally:
        group.kill()
    # system: the policy and the reference ran the prompts' common start once (on every rank)
    assert all(any(split) == bool(system) for _, _, split in plans)
    assert m["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["loss"] == pytest.approx(num / den, abs=1e-5)
    # the engine/learner mismatch over every rank's tokens (first step: logp == old), and TIS's truncations
    assert m["train/mismatch_abs_mean"] == pytest.approx(float(diffs.abs().mean()), abs=1e-5)
    assert m["train/mismatch_abs_max"] == pytest.approx(float(diffs.abs().max()), abs=1e-5)
    assert m["train/correction_masked_frac"] == pytest.approx(float((diffs.exp() > 2.0).float().mean()), abs=1e-6)
    assert m["train/mismatch_abs_mean"] > 0.1          # the test batch adds noise of std .3 to the engine logprobs


def test_a_resume_takes_the_configs_learning_rate(ray_session, tiny_model_path, tmp_path):
    """The checkpoint records the lr it was trained at, but a resumed run uses its config's
    (a user who lowers learner.lr for the rest of a run gets what they asked for)."""
    batch = make_batch(tiny_model_path, seed=5)
    first = learner_group(tiny_model_path, 1, 2, lr=1e-3)
    try:
        assert first.get(first.call("train_step", batch))[0]["lr"] == pytest.approx(1e-3)
        first.get(first.call("save_checkpoint", str(tmp_path / "ckpt"), "step1"))
    finally:
        first.kill()
    resumed = learner_group(tiny_model_path, 1, 2, lr=2e-4)
    try:
        resumed.get(resumed.call("load_checkpoint", str(tmp_path / "ckpt"), "step1"))
        assert resumed.get(resumed.call("train_step", batch))[0]["lr"] == pytest.approx(2e-4)
    finally:
        resumed.kill()



def test_the_warmup_is_linear_restarts_per_phase_and_resumes_where_it_was(ray_session, tiny_model_path, tmp_path):
    """DeepSpeed's WarmupLR as the learner steps it: step t of a phase gets lr * min(1, (t+1)/warmup);
    with a decay horizon D (learner.lr_decay: linear), lr * (D - t) / (D + 1 - warmup) after the warmup."""
    batch = make_batch(tiny_model_path, seed=6)
    group = learner_group(tiny_model_path, 1, 2, lr=1e-3, warmup_steps=4)
    try:
        lrs = [group.get(group.call("train_step", batch))[0]["lr"] for _ in range(5)]
        assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
        group.get(group.call("set_lr", 2e-3))                    # a new phase warms up again
        lrs = [group.get(group.call("train_step", batch))[0]["lr"] for _ in range(2)]
        assert lrs == pytest.approx([5e-4, 1e-3])
        group.get(group.call("save_checkpoint", str(tmp_path / "ckpt"), "mid"))
        group.get(group.call("set_lr", 1e-3, 6))                 # warmup 4, then down to the horizon 6
        lrs = [group.get(group.call("train_step", batch))[0]["lr"] for _ in range(6)]
        assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 2e-3 / 3, 1e-3 / 3])
    finally:
        group.kill()
    resumed = learner_group(tiny_model_path, 1, 2, lr=2e-3, warmup_steps=4)
    try:
        resumed.get(resumed.call("load_checkpoint", str(tmp_path / "ckpt"), "mid"))
        assert resumed.get(resumed.call("train_step", batch))[0]["lr"] == pytest.approx(1.5e-3)   # step 3 of 4
    finally:
        resumed.kill()
