"""How a sync GRPO step grows with G, with completion length and with the number of rollout workers.

    .venv/bin/python benchmarks/scaling.py [--steps 3] [--out benchmarks/scaling.png] [overrides ...]

Every point is a real `Run` (vLLM engine(s), reward worker, DeepSpeed learner) on the tiny preset
from its random init, which rarely stops early, so completion length ~= rollout.max_tokens. One
axis varies at a time around the centre point (G 8, 48 tokens, 1 worker, 8 prompts per step).
The first step of each point is a warm-up and is dropped; the rest give the median seconds of
the step and of its parts: generate + score, learner update, weight sync. Prints JSON, saves a
PNG with one panel per axis.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from harness import train_rows, scratch_dir   # benchmarks/ is the script's directory

CENTRE = {"rollout.group_size": 8, "rollout.max_tokens": 48, "rollout.num_workers": 1}
AXES = {"rollout.group_size": [4, 8, 16], "rollout.max_tokens": [24, 48, 96], "rollout.num_workers": [1, 2]}
PARTS = {"generate": "perf/generate_seconds", "score": "perf/score_seconds", "learner": "train/step_seconds", "sync": "sync/seconds"}


def measure(base: dict, overrides: list[str], point: dict, out: Path, steps: int, model_path: str) -> dict:
    """Median step time and its parts over steps 2..`steps` of one sync run at `point`."""
    from drivers.config import build_config

    name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
    cfg = build_config(base, overrides + [f"{k}={v}" for k, v in point.items()] + [
        "train.mode=sync", f"train.steps={steps}", "train.sft_steps=0", "train.eval_every=0",
        "train.checkpoint_every=1000000", "run.wandb_mode=disabled", f"run.output_dir={out / name}",
        f"model.path={model_path}", "task.heldout=8"])
    rows = train_rows(cfg, key="perf/step_seconds")[0][1:]
    med = {part: round(statistics.median(r.get(key, 0.0) for r in rows), 3) for part, key in PARTS.items()}
    return {**point, "step_seconds": round(statistics.median(r["perf/step_seconds"] for r in rows), 3), **med,
            "samples_per_step": rows[-1]["rollout/samples"],
            "length_mean": round(statistics.mean(r["rollout/length_mean"] for r in rows), 1)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, (axis, points) in zip(axes, results.items()):
        xs = [p[axis] for p in points]
        ax.plot(xs, [p["step_seconds"] for p in points], "o-k", label="step")
        for part in PARTS:
            ax.plot(xs, [p[part] for p in points], "o--", label=part)
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds (median)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("r1ray sync GRPO step time (tiny preset, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/scaling.png")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import ray
    import yaml

    from drivers.config import build_config
    from drivers.models import ensure_model

    base = yaml.safe_load(Path(a.config).read_text())
    overrides = ["train.prompts_per_step=8", "rollout.cpu_threads=1", "learner.cpu_threads=1"] + a.overrides
    out = scratch_dir("r1ray_scaling_")
    model_path = str(ensure_model(build_config(base, overrides).model, out))
    t0 = time.perf_counter()
    results, done = {}, {}
    try:
        for axis, values in AXES.items():
            results[axis] = []
            for v in values:
                point = {**CENTRE, axis: v}
                key = tuple(sorted(point.items()))
                if key not in done:          # the centre point is shared by every axis
                    done[key] = measure(base, overrides, point, out, a.steps, model_path)
                    print(json.dumps(done[key]), flush=True)
                results[axis].append(done[key])
    finally:
        ray.shutdown()
    plot(results, Path(a.out))
    slopes = {}
    for axis, points in results.items():   # growth of the step from the smallest to the largest value
        lo, hi = points[0], points[-1]
        slopes[axis] = {"x_ratio": round(hi[axis] / lo[axis], 2),
                        "step_ratio": round(hi["step_seconds"] / lo["step_seconds"], 2)}
    print(json.dumps({"device": "cpu", "steps_per_point": a.steps, "centre": CENTRE, "growth": slopes,
                      "points": results, "plot": a.out, "wall_seconds": round(time.perf_counter() - t0, 1)},
                     indent=1))


if __name__ == "__main__":
    main()
