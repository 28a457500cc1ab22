"""CPU placement of the two phases, in one run: separate cores vs colocated (sync), and async.

    .venv/bin/python benchmarks/colocate.py [--config configs/tiny.yaml] [--steps 12] [--sft-steps N]

Every variant starts from the same cold-start checkpoint and trains `--steps` GRPO steps:
- sync_separate: the rollout engine and the learner each own half the cores (as actors own
  devices on a GPU cluster; the setting of the earlier TRL benchmark);
- sync_colocated: the default sync plan (drivers/placement.py): generation and learning take
  turns and each gets every core;
- sync_colocated_passive: the same, with OMP_WAIT_POLICY=PASSIVE in the workers (idle OpenMP
  threads sleep at once instead of spinning);
- async: the default async plan, the two sides on separate cores at the same time.
For each: samples/s, the CPU seconds each actor process used (psutil) against the RL wall time
(an idle pool that spins shows as CPU time beyond its phase), final reward. Prints one JSON
object with the ratios against sync_separate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from harness import scratch_dir   # benchmarks/ is the script's directory

VARIANTS = ("sync_separate", "sync_colocated", "sync_colocated_passive", "async")


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def run_variant(base: dict, name: str, out: Path, model_path: str, steps: int, cores: int) -> dict:
    import psutil

    from drivers import ray_utils
    from drivers.config import build_config
    from drivers.train import Run

    half = max(1, cores // 2)
    overrides = {"sync_separate": [f"rollout.cpu_threads={half}", f"learner.cpu_threads={half}"]}.get(name, [])
    mode = "async" if name == "async" else "sync"
    cfg = build_config(base, overrides + [f"train.mode={mode}", f"train.steps={steps}", "train.sft_steps=0",
                                          f"run.output_dir={out / name}", f"model.path={model_path}", "train.eval_every=0",
                                          "train.checkpoint_every=1000000", "run.wandb_mode=disabled"])
    env = dict(ray_utils.WORKER_ENV)
    if name.endswith("passive"):
        ray_utils.WORKER_ENV["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        run = Run(cfg)
    finally:
        ray_utils.WORKER_ENV.clear()
        ray_utils.WORKER_ENV.update(env)
    try:
        procs = {"rollout": psutil.Process(_pid(run.rollout.actors[0])),
                 "learner": psutil.Process(_pid(run.learner.actors[0]))}
        cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        t0 = time.perf_counter()
        run.train()
        wall = time.perf_counter() - t0
        cpu = {k: round(sum(p.cpu_times()[:2]) - cpu0[k], 1) for k, p in procs.items()}
        rows = [r for r in run.logger.history() if "reward/mean" in r]
    finally:
        run.close()
    rl_time = sum(r["perf/step_seconds"] for r in rows)
    tail = rows[-max(1, len(rows) // 3):]
    mean = lambda key: round(statistics.mean(r[key] for r in rows if key in r), 3)  # noqa: E731
    return {"samples_per_s": round(sum(r["rollout/samples"] for r in rows) / rl_time, 2),
            "rl_seconds": round(rl_time, 1), "wall_seconds_incl_evals": round(wall, 1),
            "threads": {"rollout": run.cfg.rollout.cpu_threads or "plan", "learner": run.cfg.learner.cpu_threads or "plan"},
            "cpu_seconds": cpu, "machine_busy_frac": round(sum(cpu.values()) / (wall * cores), 3),
            "generate_s_per_step": mean("perf/generate_seconds"), "learner_s_per_step": mean("train/step_seconds"),
            "final_reward": round(statistics.mean(r["reward/mean"] for r in tail), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    a = ap.parse_args()

    import ray
    import yaml

    from async_vs_sync import cold_start_checkpoint
    from outcome_margins import cpu_name

    cores = os.cpu_count() or 1
    base = yaml.safe_load(Path(a.config).read_text())
    base.setdefault("learner", {})["warmup_steps"] = 0
    out = scratch_dir("r1ray_colocate_")
    start = cold_start_checkpoint(base, [], out, a.sft_steps)
    try:
        result = {v: run_variant(base, v, out, start, a.steps, cores) for v in a.variants}
    finally:
        ray.shutdown()
    ref = result.get("sync_separate", {}).get("samples_per_s")
    ratios = {f"{v}_over_sync_separate": round(r["samples_per_s"] / ref, 3) for v, r in result.items() if ref}
    print(json.dumps({"cpu": cpu_name(), "cores": cores, "steps": a.steps, **result, **ratios}, indent=1))


if __name__ == "__main__":
    main()
