"""Fuzz the reward verifiers with hostile inputs through score_batch, under a deadline.

    .venv/bin/python benchmarks/fuzz_rewards.py [--n 10000] [--timeout 1.0] [--procs 2]

Prints JSON: items, statuses, items/s, the worst overrun past the deadline, and per-kind counts.
The test suite runs a small subset of the same generator (tests/test_rewards_on_cpu.py).
"""
from __future__ import annotations

import argparse
import json
import random
import time

KINDS = ["huge_number", "nested_latex", "unbalanced_tags", "invalid_unicode", "megabyte",
         "frac_bomb", "power_tower", "random_bytes", "many_tags", "benign"]


def hostile_input(kind: str, rng: random.Random) -> str:
    """One hostile completion of the given kind (deterministic for a seeded rng)."""
    if kind == "huge_number":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([30, 400, 5000])))
        return f"<think>big</think> <answer>{rng.choice(['', '-', '1e'])}{digits}</answer>"
    if kind == "nested_latex":
        depth = rng.choice([10, 100, 1000])
        return "<answer>" + "\\sqrt{" * depth + "2" + "}" * depth + "</answer>"
    if kind == "unbalanced_tags":
        parts = ["<think>", "</think>", "<answer>", "</answer>", "5", " ", "\\boxed{", "}"]
        return "".join(rng.choice(parts) for _ in range(rng.randint(1, 200)))
    if kind == "invalid_unicode":
        junk = "".join(chr(rng.choice([0xD800, 0xDFFF, 0xFFFE, 0x0, 0x202E, rng.randint(0, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 100)))
        return f"<think>{junk}</think> <answer>{junk}</answer>"
    if kind == "megabyte":
        unit = rng.choice(["a", "<answer>", "\\frac{", "9", "你"])
        return (unit * (1_000_000 // len(unit)))[:1_000_000]
    if kind == "frac_bomb":
        depth = rng.choice([5, 50, 500, 3000])
        return "<answer>" + "\\frac{1}{" * depth + "2" + "}" * rng.randint(0, depth) + "</answer>"
    if kind == "power_tower":
        depth = rng.randint(2, 12)
        return "<answer>" + "9^{" * depth + "9" + "}" * depth + "</answer>"
    if kind == "random_bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000))).decode("utf-8", "replace")
    if kind == "many_tags":
        return "<think>" * rng.randint(1, 5000) + "</answer>" * rng.randint(0, 5000)
    return f"<think>{rng.randint(0, 99)} plus 1</think> <answer>{rng.randint(0, 100)}</answer>"


def hostile_batch(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """n (completion, reference, kind) triples, kinds in rotation."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    refs = [rng.choice(["5", "\\frac{1}{2}", "#### 1,000", "x^2+1", "\\boxed{3}"]) for _ in kinds]
    return [hostile_input(k, rng) for k in kinds], refs, kinds


def run(n: int, timeout_s: float, procs: int, seed: int = 0) -> dict:
    """Score n hostile items; return the statistics as a dict."""
    from actors.rewards import VerifierPool, score_batch, summarize

    comps, refs, kinds = hostile_batch(n, seed)
    pool = VerifierPool(procs, timeout_s)
    try:
        score_batch(["<answer>1</answer>"], ["1"], pool=pool)  # warm the children
        t0 = time.perf_counter()
        res = score_batch(comps, refs, pool=pool, weights={"format": 0.5, "language": 0.1})
        wall = time.perf_counter() - t0
    finally:
        pool.close()
    per_kind: dict[str, dict[str, int]] = {}
    for kind, r in zip(kinds, res):
        per_kind.setdefault(kind, {}).setdefault(r.status, 0)
        per_kind[kind][r.status] += 1
    secs = sorted(r.seconds for r in res)
    stats = summarize(res)
    return {"items": n, "timeout_s": timeout_s, "procs": procs, "wall_s": round(wall, 2),
            "items_per_s": round(n / wall, 1),
            "statuses": {s: int(stats[f"reward/{s}"]) for s in ("ok", "timeout", "error")},
            "max_item_s": round(secs[-1], 3), "p50_item_s": round(secs[len(secs) // 2], 4),
            "max_overrun_s": round(max(0.0, secs[-1] - timeout_s), 3),
            "no_crash": len(res) == n and all(r.status in ("ok", "timeout", "error") for r in res),
            "per_kind": per_kind}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(run(a.n, a.timeout, a.procs, a.seed), indent=1))
