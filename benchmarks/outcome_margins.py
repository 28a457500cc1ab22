"""The margin of every test that asserts on a training outcome, over seeds and thread counts.

    .venv/bin/python benchmarks/outcome_margins.py [--seeds 0 1 2] [--threads 1 2] [--tests KEY ...]

Each (seed, threads) pair runs the chosen tests in a pytest process of its own with
R1RAY_TEST_SEED / R1RAY_TEST_THREADS set (tests/conftest.py: `outcome_seed`, `outcome_threads`);
the tests append what they measured to $R1RAY_OUTCOMES (tests/outcomes.py). Prints one JSON
object: every measured row, and per test the min / max of each value with the threshold it
asserts and whether every run passed. Runs are serial: on a 2-core machine parallel runs would
only share the cores. Measured on 2 cores: all four tests with 1 thread took 1436-1756 s per
seed while other training jobs shared the cores; the pipeline and learner tests alone (seed 0,
2 threads, nothing else running) 404 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
TESTS = {
    "sft_then_eval": "tests/test_eval_sft_on_cpu.py::test_sft_then_eval_commands_on_the_tiny_model",
    "tiny_recipe_20_steps": "tests/test_train_on_cpu.py::test_tiny_recipe_really_learns",
    "pipeline_cold_start": "tests/test_pipeline_on_cpu.py::test_tiny_pipeline_runs_every_stage_and_resumes_stage_by_stage",
    "learner_sft_4_steps": "tests/test_learner_on_cpu.py::test_resume_nan_guard_sft_and_export",
}


def summarize(rows: list[dict]) -> dict:
    """Per test: runs, runs passed, min / max of every measured value, and the threshold it asserts."""
    out = {}
    for test in sorted({r["test"] for r in rows}):
        mine = [r for r in rows if r["test"] == test]
        measured = [r for r in mine if "error" not in r]
        keys = [k for k, v in (measured or [{}])[0].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "threads")]
        out[test] = {"threshold": (measured or [{"threshold": ""}])[0]["threshold"], "runs": len(mine),
                     "passed": sum(r["passed"] for r in mine),
                     **{k: [round(min(r[k] for r in measured), 4), round(max(r[k] for r in measured), 4)]
                        for k in keys}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tests", nargs="+", default=list(TESTS), choices=list(TESTS))
    ap.add_argument("--timeout-s", type=int, default=3600, help="per (seed, threads) pytest run")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    rows: list[dict] = []
    runs = [(s, t) for s in args.seeds for t in args.threads]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, threads in tqdm(runs, desc="seed x threads", unit="run"):
            sink = Path(tmp) / f"s{seed}-t{threads}.jsonl"
            env = {**os.environ, "R1RAY_TEST_SEED": str(seed), "R1RAY_TEST_THREADS": str(threads),
                   "R1RAY_OUTCOMES": str(sink)}
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       *[TESTS[k] for k in args.tests]], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=args.timeout_s)
                out, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:
                out, rc = f"timed out after {args.timeout_s} s\n{e.stdout or ''}", "timeout"
            failed = {line.split("::")[-1].split(" ")[0] for line in out.splitlines()
                      if line.startswith(("FAILED", "ERROR"))}
            got = [json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else []
            for key in args.tests:
                name = TESTS[key].split("::")[-1]
                mine = [r for r in got if r["test"] == key]
                if not mine:   # failed before it measured anything
                    rows.append({"test": key, "threshold": "", "seed": seed, "threads": threads, "passed": False,
                                 "error": out[-1500:]})
                for r in mine:
                    rows.append({**r, "passed": name not in failed and rc != "timeout"})
            print(f"seed {seed} threads {threads}: rc {rc} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "seeds": args.seeds, "threads": args.threads,
              "summary": summarize(rows), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
