"""Learner benchmark: one DeepSpeed step vs the same step in plain PyTorch, same process kind.

    .venv/bin/python benchmarks/learner.py [--rows 32] [--completion 192] [--repeats 5]

Both run as Ray actors with the same thread count on the same batch, one after the other.
Prints JSON: median step seconds of each, their ratio (goal <= 1.3), peak memory per rank; and
"shared_prompt": the learner on GRPO-shaped rows (groups of 8 sharing a prompt) with
learner.share_prefix off and on, and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from harness import scratch_dir   # benchmarks/ is the script's directory


class PlainTrainer:
    """The reference: full-batch grpo_loss, backward, clip, AdamW; no DeepSpeed."""

    def __init__(self, model_path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def step(self, batch: dict) -> float:
        import torch

        from actors.grpo import grpo_loss, token_logprobs

        t0 = time.perf_counter()
        rows = batch["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(rows), width - 1)
        old = torch.zeros(len(rows), width - 1)
        for i, (r, p, b) in enumerate(zip(rows, batch["prompt_lens"], batch["behavior_logp"])):
            ids[i, :len(r)] = torch.tensor(r)
            attn[i, :len(r)] = 1
            mask[i, p - 1:len(r) - 1] = 1
            old[i, p - 1:len(r) - 1] = torch.tensor(b)
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        logp = token_logprobs(logits, ids[:, 1:])
        loss, _ = grpo_loss(logp, old, torch.tensor(batch["advantages"]), mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t0

    def peak_memory_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(rows: int, prompt: int, completion: int, seed: int = 0, group_size: int = 1) -> dict:
    """Random rows; consecutive runs of `group_size` rows share a prompt (a GRPO group)."""
    rng = random.Random(seed)
    ids, plens, adv, beh = [], [], [], []
    for r in range(rows):
        if r % group_size == 0:
            shared = [rng.randrange(256) for _ in range(prompt)]
        c = rng.randint(completion // 2, completion)
        ids.append(shared + [rng.randrange(256) for _ in range(c)])
        plens.append(prompt)
        adv.append(rng.choice([-1.0, 1.0]))
        beh.append([-5.5 + rng.random() * 0.1 for _ in range(c)])
    return {"input_ids": ids, "prompt_lens": plens, "advantages": adv, "behavior_logp": beh}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--group-rows", type=int, default=128, help="shared-prompt comparison: rows (G=8, tiny's shape)")
    ap.add_argument("--group-prompt", type=int, default=93)
    ap.add_argument("--group-completion", type=int, default=40)
    a = ap.parse_args()

    import ray

    from actors.learner import Learner
    from drivers.config import AlgoConfig, LearnerConfig
    from drivers.models import init_model
    from drivers.ray_utils import ActorGroup, init_ray

    model = str(init_model(a.preset, os.path.join(scratch_dir("r1ray_bench_"), a.preset)))
    batch = make_batch(a.rows, a.prompt, a.completion)
    init_ray()
    try:
        plain = ray.remote(num_cpus=1)(PlainTrainer).remote(model, a.threads)
        ray.get(plain.step.remote(batch))  # warm-up
        plain_s = statistics.median(ray.get(plain.step.remote(batch)) for _ in range(a.repeats))
        plain_mb = ray.get(plain.peak_memory_mb.remote())
        ray.kill(plain)

        def learner_seconds(batch: dict, **kw) -> tuple[float, list]:
            group = ActorGroup(Learner, 1, kwargs_fn=lambda r, addr, port: dict(
                model_path=model, rank=r, world_size=1, master_addr=addr, master_port=port, cpu_threads=a.threads,
                learner=LearnerConfig(zero_stage=a.zero_stage, lr=1e-5, **kw),
                algo=AlgoConfig(old_logp="rollout", rollout_correction="none")))
            try:
                group.get(group.call("train_step", batch))  # warm-up
                seconds = statistics.median(group.get(group.call("train_step", batch))[0]["step_seconds"]
                                            for _ in range(a.repeats))
                return seconds, group.get(group.call("peak_memory_mb"))
            finally:
                group.kill()

        ds_s, ds_mb = learner_seconds(batch, micro_batch_tokens=10**9)
        # GRPO groups (G rows share a prompt): the prompt once per group vs once per row
        grouped = make_batch(a.group_rows, a.group_prompt, a.group_completion, seed=1, group_size=8)
        share = {k: learner_seconds(grouped, micro_batch_tokens=16384, share_prefix=k)[0] for k in (False, True)}
    finally:
        ray.shutdown()
    tokens = sum(len(r) for r in batch["input_ids"])
    print(json.dumps({
        "device": "cpu", "preset": a.preset, "rows": a.rows, "tokens": tokens, "threads": a.threads,
        "zero_stage": a.zero_stage, "plain_step_s": round(plain_s, 4), "learner_step_s": round(ds_s, 4),
        "ratio": round(ds_s / plain_s, 3), "goal_ratio_max": 1.3, "meets_goal": ds_s / plain_s <= 1.3,
        "peak_memory_mb": {"plain": round(plain_mb), "learner_rank0": round(ds_mb[0])},
        "shared_prompt": {"rows": a.group_rows, "group_size": 8, "prompt": a.group_prompt,
                          "completion_max": a.group_completion, "off_step_s": round(share[False], 4),
                          "on_step_s": round(share[True], 4), "speedup": round(share[False] / share[True], 3)}},
        indent=1))


if __name__ == "__main__":
    main()
