"""What the training benchmarks share: run a Config's training and return its step rows."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


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


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder for a benchmark's runs and checkpoints, removed when the script exits.

    A benchmark at SmolLM2 scale writes gigabytes (checkpoints, optimizer states); left in /tmp they
    fill a disk within a few runs. Set R1RAY_BENCH_KEEP=1 to keep the folder (its path is printed);
    a run that fails with an exception keeps it too.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("R1RAY_BENCH_KEEP") == "1":
        print(f"scratch folder kept: {path}", file=sys.stderr)
    else:
        atexit.register(_remove_unless_failed, path)
    return path


_failed: list = []
_excepthook = sys.excepthook


def _note_failure(*exc_info) -> None:
    _failed.append(exc_info[0])
    _excepthook(*exc_info)


sys.excepthook = _note_failure


def _remove_unless_failed(path: Path) -> None:
    """atexit: a benchmark that died of an exception keeps its folder (logs, checkpoints) to look at."""
    if _failed:
        print(f"scratch folder kept after the failure: {path}", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)
