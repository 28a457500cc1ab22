"""R1-Zero on a real model: held-out pass@1 before vs after GRPO on SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/real_zero.py [--seeds 0 1] [--steps 20] [--config configs/smollm2-zero.yaml] [--set KEY=VALUE ...]

Each seed is one `r1ray train` of the recipe (its own process, its own local Ray) in
runs/real_zero/seed<S>/. The recipe evaluates the held-out problems at the start and the end
(train.eval_k samples per prompt at train.eval_temperature: pass@1 is the mean accuracy). While
it runs, the memory of the run's whole process tree (driver, Ray, the vLLM engine, the learner,
the verifiers) is sampled every second: the peak of the PSS sum (shared pages split between the
processes that map them) and of the RSS sum (shared pages counted once per process). Prints one JSON object: per seed the before/after pass@1, format
rate and mean length, the change in points, the wall time and its split into generate / score /
learner / sync / the rest (start-up, evaluations, checkpoints), the peak memory and the curves PNG.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from outcome_margins import cpu_name   # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"generate": "perf/generate_seconds", "score": "perf/score_seconds", "learner": "train/step_seconds",
         "sync": "sync/seconds"}


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) in bytes of `proc` and all its descendants (the ones that just ended count 0).

    PSS splits each shared page between the processes that map it, so the sum is the tree's
    real share of memory; the RSS sum counts shared pages (torch, the model files) once per process.
    """
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss, rss = pss + info.pss, rss + info.rss
        except psutil.Error:
            pass
    return pss, rss


def run_seed(config: str, seed: int, steps: int, out_dir: Path, timeout_s: float, overrides: list[str]) -> dict:
    """One training run; its metrics from metrics.jsonl, wall time, time split and peak memory."""
    run_dir = out_dir / f"seed{seed}"
    cmd = [str(Path(sys.executable).parent / "r1ray"), "train", config, f"seed={seed}", f"train.steps={steps}",
           f"run.output_dir={run_dir}", *overrides]
    log = (out_dir / f"seed{seed}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    peak, watched = [0, 0], psutil.Process(proc.pid)

    def sample():
        while proc.poll() is None:
            try:
                peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(watched))]
            except psutil.Error:
                pass
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()        # our own child only; its Ray session ends with it
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.join(timeout=5)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    evals = [r for r in rows if "eval/accuracy" in r]
    steps_rows = [r for r in rows if "reward/mean" in r]
    split = {part: round(sum(r.get(key, 0.0) for r in steps_rows), 1) for part, key in PARTS.items()}
    split["other"] = round(wall - sum(split.values()), 1)
    result = {"seed": seed, "rc": rc, "steps_done": len(steps_rows), "wall_s": round(wall, 1), "time_split_s": split,
              "peak_pss_gb": round(peak[0] / 1024**3, 2), "peak_rss_sum_gb": round(peak[1] / 1024**3, 2), "curves": str(run_dir / "curves.png"), "log": log.name}
    if len(evals) >= 2 and rc == 0:
        first, last = evals[0], evals[-1]
        for name, row in (("before", first), ("after", last)):
            result[name] = {"pass@1": round(row["eval/accuracy"], 4), "format": round(row["eval/format"], 4),
                            "length": round(row["eval/length"], 1)}
        result["delta_points"] = round(100 * (last["eval/accuracy"] - first["eval/accuracy"]), 1)
        result["train_reward"] = [round(r["reward/mean"], 3) for r in steps_rows]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-zero.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the config's)")
    ap.add_argument("--out-dir", default="runs/real_zero")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per seed")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="dotted config overrides, e.g. learner.lr=2e-5")
    args = ap.parse_args()

    from tqdm import tqdm

    from drivers.config import load_config

    cfg = load_config(ROOT / args.config, args.overrides)     # a bad config fails here, before any run
    steps = args.steps if args.steps is not None else cfg.train.steps
    out_dir = (ROOT / args.out_dir).resolve()
    taken = [str(out_dir / f"seed{s}") for s in args.seeds if (out_dir / f"seed{s}").exists()]
    if taken:
        ap.error(f"earlier runs are in the way: {', '.join(taken)} (give another --out-dir or remove them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in tqdm(args.seeds, desc="seeds", unit="run"):
        runs.append(run_seed(args.config, seed, steps, out_dir, args.timeout_s, args.overrides))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    deltas = [r["delta_points"] for r in runs if "delta_points" in r]
    result = {"config": args.config, "steps": steps, "eval_k": cfg.train.eval_k,
              "eval_temperature": cfg.train.eval_temperature, "heldout": cfg.task.heldout,
              "cpu": cpu_name(), "cores": psutil.cpu_count(),
              "delta_points": {"min": min(deltas, default=None), "max": max(deltas, default=None)},
              "wall_s_max": max((r["wall_s"] for r in runs), default=None), "runs": runs}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
