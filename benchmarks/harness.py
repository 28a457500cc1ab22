"""What the training benchmarks share: run a Config's training and return its step rows."""
from __future__ import annotations

import time


def train_rows(cfg, key: str = "reward/mean") -> tuple[list[dict], float]:
    """Train `cfg` to its last step in a fresh Run; its logged rows that have `key` and the wall seconds."""
    from drivers.train import Run

    run = Run(cfg)
    try:
        t0 = time.perf_counter()
        run.train()
        wall = time.perf_counter() - t0
        return [r for r in run.logger.history() if key in r], wall
    finally:
        run.close()
