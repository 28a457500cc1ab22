"""What a training-outcome test measured: printed, and appended to $R1RAY_OUTCOMES when set
(benchmarks/outcome_margins.py sets it to collect every run's values)."""
from __future__ import annotations

import json
import os


def report_outcome(test: str, threshold: str, **values) -> None:
    """Record the measured values of one training-outcome test and the threshold it asserts."""
    row = {"test": test, "threshold": threshold, "seed": int(os.environ.get("R1RAY_TEST_SEED", "0")),
           "threads": int(os.environ.get("R1RAY_TEST_THREADS", "0")), **values}
    print("OUTCOME " + json.dumps(row), flush=True)
    if os.environ.get("R1RAY_OUTCOMES"):
        with open(os.environ["R1RAY_OUTCOMES"], "a") as f:
            f.write(json.dumps(row) + "\n")
