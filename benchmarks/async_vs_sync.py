"""Async vs sync GRPO on the same config and seed, in one run: samples/s and final reward.

    .venv/bin/python benchmarks/async_vs_sync.py [--steps 12] [--threads 1] [overrides ...]

Both modes start from the same cold-start checkpoint (one SFT run shared through model.path),
then run `--steps` GRPO steps. `--threads` sets the CPU threads of the rollout engine and of the
learner in both modes (1: each actor owns one of the 2 cores, as actors own devices on a GPU
cluster). Prints JSON with samples/s of each mode, their ratio (goal >= 1.5) and the mean
reward of the last third of the steps (async should not be worse beyond noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import train_rows, scratch_dir   # benchmarks/ is the script's directory


def run_mode(base: dict, overrides: list[str], out: Path, mode: str, model_path: str, steps: int) -> dict:
    from drivers.config import build_config

    cfg = build_config(base, overrides + [f"train.mode={mode}", f"train.steps={steps}", "train.sft_steps=0",
                                          f"run.output_dir={out / mode}", f"model.path={model_path}",
                                          "train.checkpoint_every=1000000", "run.wandb_mode=disabled"])
    rows, wall = train_rows(cfg)
    rl_time = sum(r["perf/step_seconds"] for r in rows)
    samples = sum(r["rollout/samples"] for r in rows)
    tail = rows[-max(1, len(rows) // 3):]
    return {"samples_per_s": round(samples / rl_time, 2), "rl_seconds": round(rl_time, 1),
            "wall_seconds_incl_evals": round(wall, 1),
            "final_reward": round(statistics.mean(r["reward/mean"] for r in tail), 4),
            "final_accuracy": round(statistics.mean(r["reward/accuracy"] for r in tail), 4),
            "staleness_max": max(r["async/staleness_max"] for r in rows),
            "step_seconds": [round(r["perf/step_seconds"], 2) for r in rows]}


def cold_start_checkpoint(base: dict, overrides: list[str], out: Path, sft_steps: int | None) -> str:
    """One shared cold start (SFT only, 0 RL steps); its HF export is where every compared run starts."""
    from drivers.config import build_config
    from drivers.train import Run

    sft = build_config(base, overrides + ["train.steps=0", f"run.output_dir={out / 'sft'}", "run.wandb_mode=disabled"]
                       + ([f"train.sft_steps={sft_steps}"] if sft_steps is not None else []))
    run = Run(sft)
    try:
        run.train()
        run.checkpoint()
    finally:
        run.close()
    return str(out / "sft" / "checkpoints" / "hf")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=None, help="default: the config's")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import ray
    import yaml

    base = yaml.safe_load(Path(a.config).read_text())
    threads = [f"rollout.cpu_threads={a.threads}", f"learner.cpu_threads={a.threads}"]
    out = scratch_dir("r1ray_async_")
    start = cold_start_checkpoint(base, a.overrides + threads, out, a.sft_steps)
    try:
        result = {m: run_mode(base, a.overrides + threads, out, m, start, a.steps) for m in ("sync", "async")}
    finally:
        ray.shutdown()
    ratio = result["async"]["samples_per_s"] / result["sync"]["samples_per_s"]
    print(json.dumps({"device": "cpu", "steps": a.steps, "threads_per_actor": a.threads, **result,
                      "async_over_sync": round(ratio, 3), "goal_min": 1.5, "meets_goal": ratio >= 1.5},
                     indent=1))


if __name__ == "__main__":
    main()
