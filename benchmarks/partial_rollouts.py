"""Partial rollouts vs drain-at-sync in async mode, same config, model and seed, in one run.

    .venv/bin/python benchmarks/partial_rollouts.py [--config configs/smollm2-zero.yaml] [--steps 6]
        [--staleness 2] [overrides ...]

At each weight sync of async mode the rollout engines either let the samples in flight finish
under the old weights first ("drain", train.partial_rollouts=false) or pause them, load the new
weights and continue them ("partial"). Draining hurts when some answers are much longer than the
median: the sync waits for the longest one, and with train.max_staleness >= 2 the samples of the
step after next, just started, must finish too. SmolLM2-135M-Instruct (the default config) writes
answers of very different lengths; `--max-tokens` sets the cap. Prints JSON per mode: samples/s
over the GRPO steps, mean step and sync seconds, the learner's idle share, the completion-length
spread per step (median, max, max / median), the share of rollouts that span two versions, the mean
token staleness and the mean reward of the last third of the steps; then partial / drain ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import train_rows, scratch_dir   # benchmarks/ is the script's directory


def run_mode(base: dict, overrides: list[str], out: Path, partial: bool, steps: int) -> dict:
    from drivers.config import build_config

    name = "partial" if partial else "drain"
    cfg = build_config(base, overrides + [f"train.partial_rollouts={str(partial).lower()}", f"train.steps={steps}",
                                          f"run.output_dir={out / name}", "train.checkpoint_every=1000000",
                                          "train.eval_every=0", "run.wandb_mode=disabled"])
    rows, wall = train_rows(cfg)
    rl_time = sum(r["perf/step_seconds"] for r in rows)
    tail = rows[-max(1, len(rows) // 3):]
    return {"samples_per_s": round(sum(r["rollout/samples"] for r in rows) / rl_time, 3),
            "step_seconds_mean": round(rl_time / len(rows), 2),
            "sync_seconds_mean": round(statistics.mean(r.get("sync/seconds", 0.0) for r in rows), 2),
            "learner_idle_frac_mean": round(statistics.mean(r["perf/idle_frac_learner"] for r in rows), 3),
            "rollout_idle_frac_mean": round(statistics.mean(r["perf/idle_frac_rollout"] for r in rows), 3),
            "length_median_mean": round(statistics.mean(r["rollout/length_median"] for r in rows), 1),
            "length_max_mean": round(statistics.mean(r["rollout/length_max"] for r in rows), 1),
            "length_max_over_median": round(statistics.mean(r["rollout/length_max"] / max(r["rollout/length_median"], 1)
                                                            for r in rows), 2),
            "partial_frac_mean": round(statistics.mean(r.get("async/partial_frac", 0.0) for r in rows), 3),
            "token_staleness_mean": round(statistics.mean(r.get("async/token_staleness_mean", 0.0) for r in rows), 3),
            "final_reward": round(statistics.mean(r["reward/mean"] for r in tail), 4),
            "wall_seconds": round(wall, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-zero.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--staleness", type=int, default=2, help="train.max_staleness: steps generated ahead")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import ray
    import yaml

    base = yaml.safe_load(Path(a.config).read_text())
    over = ["train.mode=async", f"train.max_staleness={a.staleness}", f"rollout.max_tokens={a.max_tokens}",
            "algo.old_logp=learner", "algo.rollout_correction=tis", *a.overrides]
    out = scratch_dir("r1ray_partial_")
    try:
        result = {name: run_mode(base, over, out, name == "partial", a.steps) for name in ("drain", "partial")}
    finally:
        ray.shutdown()
    d, p = result["drain"], result["partial"]
    print(json.dumps({"config": a.config, "steps": a.steps, "max_staleness": a.staleness, "max_tokens": a.max_tokens,
                      **result, "partial_over_drain_samples_per_s": round(p["samples_per_s"] / d["samples_per_s"], 3),
                      "partial_over_drain_learner_idle": round(p["learner_idle_frac_mean"]
                                                               / max(d["learner_idle_frac_mean"], 1e-9), 3)},
                     indent=1))


if __name__ == "__main__":
    main()
