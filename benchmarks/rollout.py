"""Rollout benchmark: the worker inside a Ray actor vs the bare vLLM engine; weight-sync cost.

    .venv/bin/python benchmarks/rollout.py [--preset tiny] [--sync-preset small]

Prints JSON. Goals (issue 6): actor tokens/s >= 0.9x the direct engine on the same prompts;
weight update (publish + in-place reload) <= 2x the time to serialise and copy the bytes once.
Both sides run in this one invocation, one after the other, on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from harness import scratch_dir   # benchmarks/ is the script's directory

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPTS = [f"What is {a} + {b}?" for a, b in zip(range(1, 9), range(11, 19))]


def bench_direct(model_path: str, n: int, max_tokens: int, repeats: int) -> float:
    from vllm import LLM, SamplingParams

    from actors.prompts import prompt_ids
    from actors.rollout import CPU_BLOCK_SIZE

    llm = LLM(model=model_path, dtype="float32", seed=0, enforce_eager=True, max_model_len=1024,
              block_size=CPU_BLOCK_SIZE)   # the worker's CPU block size
    tok = llm.get_tokenizer()
    ids = [prompt_ids(tok, p) for p in PROMPTS]   # the rollout worker's rendering
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, logprobs=0, temperature=1.0)
    prompts = [{"prompt_token_ids": i} for i in ids]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        rates.append(tokens / (time.perf_counter() - t0))
    del llm
    return statistics.median(rates)


def bench_actor(model_path: str, n: int, max_tokens: int, repeats: int) -> float:
    import ray

    from drivers.config import build_config
    from drivers.ray_utils import rollout_worker_actor

    worker = rollout_worker_actor(model_path, build_config({}))
    kw = dict(n=n, max_tokens=max_tokens, ignore_eos=True, temperature=1.0)
    ray.get(worker.generate.remote(PROMPTS, **kw))  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rollouts = ray.get(worker.generate.remote(PROMPTS, **kw))
        rates.append(sum(len(r.completion_ids) for r in rollouts) / (time.perf_counter() - t0))
    ray.kill(worker)
    return statistics.median(rates)


def bench_sync(model_path: str, repeats: int, bucket_mb: int) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.weight_sync import ObjectStoreTransport, export_state, pack_buckets
    from drivers.config import build_config
    from drivers.ray_utils import rollout_worker_actor

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    worker = rollout_worker_actor(model_path, build_config({}))
    nbytes = sum(t.numel() * t.element_size() for _, t in export_state(model))
    bound, sync = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        flats = [flat for _, flat in pack_buckets(export_state(model), bucket_mb << 20)]
        copies = [bytearray(f.numpy().tobytes()) for f in flats]  # serialise + one copy
        bound.append(time.perf_counter() - t0)
        del flats, copies
        t0 = time.perf_counter()
        handles = ObjectStoreTransport.publish(export_state(model), bucket_mb << 20)
        ray.get(worker.update_weights.remote(handles, i + 1))
        sync.append(time.perf_counter() - t0)
    ray.kill(worker)
    b, s = statistics.median(bound[1:]), statistics.median(sync[1:])
    return {"bytes": nbytes, "serialise_copy_s": round(b, 4), "update_s": round(s, 4),
            "ratio": round(s / b, 2), "goal_ratio_max": 2.0, "meets_goal": s / b <= 2.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sync-preset", default="small")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=64)
    a = ap.parse_args()

    import ray

    from drivers.models import init_model
    from drivers.ray_utils import init_ray

    tmp = scratch_dir("r1ray_bench_")
    gen_model = str(init_model(a.preset, os.path.join(tmp, a.preset)))
    init_ray()  # up for both sides, so Ray's own daemons load the machine equally
    try:
        direct = bench_direct(gen_model, a.n, a.max_tokens, a.repeats)
        actor = bench_actor(gen_model, a.n, a.max_tokens, a.repeats)
        sync = {}
        for preset in dict.fromkeys([a.preset, a.sync_preset]):
            path = gen_model if preset == a.preset else str(init_model(preset, os.path.join(tmp, preset)))
            sync[preset] = bench_sync(path, a.repeats, a.bucket_mb)
    finally:
        ray.shutdown()
    print(json.dumps({
        "device": "cpu", "preset": a.preset, "prompts": len(PROMPTS), "n": a.n,
        "max_tokens": a.max_tokens,
        "throughput": {"direct_tokens_per_s": round(direct, 1), "actor_tokens_per_s": round(actor, 1),
                       "ratio": round(actor / direct, 3), "goal_ratio_min": 0.9,
                       "meets_goal": actor / direct >= 0.9},
        "weight_sync": sync}, indent=1))


if __name__ == "__main__":
    main()
