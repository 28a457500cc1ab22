"""The CPU choices r1ray makes by default, each against the alternative, at the tiny config's shape.

    .venv/bin/python benchmarks/cpu_kernels.py [--preset tiny] [--threads 1] [--repeats 3]

- vLLM's KV-cache block: 32 tokens (rollout.block_size None on CPU) vs vLLM's CPU default 128;
  16 prompts x G 8 sampled to exactly --max-tokens tokens (bare engine, bf16 and fp32).
- The learner's attention in bf16 (learner.attn_implementation auto -> eager on CPU) vs sdpa.
- The learner's shared-prompt micro-batches in bf16: all groups in one micro-batch (their prompts
  one padded batch, the common system start once) vs one group per micro-batch (the token budget
  of one group). Rows: 16 groups x G 8 of the R1 template's prompts, completions of 26-48 tokens,
  4 groups of advantage 0 (not run).
Prints JSON: median seconds of each and the speed-ups.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from harness import scratch_dir   # noqa: E402  (benchmarks/ is the script's directory)


def prompts(tokenizer, groups: int, seed: int = 0) -> list[list[int]]:
    from actors.prompts import prompt_ids

    rng = random.Random(seed)
    return [prompt_ids(tokenizer, f"What is {rng.randrange(100)} + {rng.randrange(10)}?") for _ in range(groups)]


def generation_seconds(model: str, dtype: str, block_size: int, ids: list[list[int]], g: int, max_tokens: int,
                       repeats: int, threads: int) -> float:
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model=model, dtype=dtype, seed=0, enforce_eager=True, max_model_len=512, block_size=block_size,
              enable_chunked_prefill=False, logprobs_mode="processed_logprobs")
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, min_tokens=max_tokens, logprobs=0, seed=s,
                             detokenize=False) for s in range(len(ids) * g)]
    requests = [{"prompt_token_ids": p} for p in ids for _ in range(g)]
    llm.generate(requests, params, use_tqdm=False)   # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
    del llm
    return statistics.median(seconds)


def grpo_batch(ids: list[list[int]], g: int, zero_groups: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    batch = {k: [] for k in ("input_ids", "prompt_lens", "advantages", "behavior_logp", "group_ids")}
    for k, p in enumerate(ids):
        for _ in range(g):
            n = rng.randint(26, 48)
            batch["input_ids"].append(p + [rng.randrange(3, 200) for _ in range(n)])
            batch["prompt_lens"].append(len(p))
            batch["advantages"].append(0.0 if k < zero_groups else rng.gauss(0.0, 1.0))
            batch["behavior_logp"].append([-2.0] * n)
            batch["group_ids"].append(k)
    return batch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()

    import ray
    from transformers import AutoTokenizer

    from actors.learner import Learner
    from drivers.config import AlgoConfig, LearnerConfig
    from drivers.models import init_model
    from drivers.ray_utils import ActorGroup, init_ray

    model = str(init_model(a.preset, os.path.join(scratch_dir("r1ray_kernels_"), a.preset)))
    ids = prompts(AutoTokenizer.from_pretrained(model), a.groups)
    gen = {f"{dtype}_block{b}": generation_seconds(model, dtype, b, ids, a.group_size, a.max_tokens, a.repeats,
                                                   a.threads)
           for dtype in ("bfloat16", "float32") for b in (32, 128)}
    batch = grpo_batch(ids, a.group_size, zero_groups=a.groups // 4)
    # a budget that holds the costliest group alone (a prompt pass + G rows), never two
    one_group = max(len(ids[k]) - 1 + a.group_size * max(len(x) - len(ids[k]) + 1 for x in
                                                          batch["input_ids"][k * a.group_size:(k + 1) * a.group_size])
                    for k in range(a.groups))
    init_ray()
    try:
        def learner_seconds(**kw) -> float:
            group = ActorGroup(Learner, 1, kwargs_fn=lambda r, addr, port: dict(
                model_path=model, rank=r, world_size=1, master_addr=addr, master_port=port, cpu_threads=a.threads,
                dtype="bfloat16", learner=LearnerConfig(lr=1e-9, **kw),
                algo=AlgoConfig(old_logp="learner", rollout_correction="tis")))
            try:
                group.get(group.call("train_step", batch))   # warm-up
                return statistics.median(group.get(group.call("train_step", batch))[0]["step_seconds"]
                                         for _ in range(a.repeats))
            finally:
                group.kill()

        learn = {"eager_all_groups": learner_seconds(attn_implementation="eager"),
                 "sdpa_all_groups": learner_seconds(attn_implementation="sdpa"),
                 "eager_one_group_each": learner_seconds(attn_implementation="eager", micro_batch_tokens=one_group)}
    finally:
        ray.shutdown()
    r = lambda x: round(x, 4)   # noqa: E731
    print(json.dumps({
        "device": "cpu", "preset": a.preset, "threads": a.threads, "shape": f"{a.groups} prompts x G {a.group_size}",
        "prompt_tokens": len(ids[0]), "generation_s": {k: r(v) for k, v in gen.items()},
        "generation_speedup_block32": {d: round(gen[f"{d}_block128"] / gen[f"{d}_block32"], 3)
                                       for d in ("bfloat16", "float32")},
        "learner_bf16_step_s": {k: r(v) for k, v in learn.items()},
        "learner_speedup_eager_over_sdpa": round(learn["sdpa_all_groups"] / learn["eager_all_groups"], 3),
        "learner_speedup_all_groups_over_one_each": round(learn["eager_one_group_each"] / learn["eager_all_groups"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
