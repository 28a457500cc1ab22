"""Experiment tracking: wandb (offline by default), a metrics.jsonl beside it, PNG curves.

One step counter for every metric: the RL step. wandb's run id is kept in the run directory,
so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


class RunLogger:
    """Logs a dict of metrics per step to wandb and to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: str | Path, *, mode: str, project: str, name: str, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(mode=mode, project=project, name=name, id=run_id, resume="allow",
                                    dir=str(self.run_dir), config=config)
            self.wandb.define_metric("*", step_metric="train/step")

    def log(self, metrics: dict, step: int) -> None:
        """Record metrics at RL step `step` (the same counter for every key)."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}
        clean["train/step"] = step
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in clean.items()}) + "\n")

    def history(self) -> list[dict]:
        """Every logged row so far (this run and the runs it resumed)."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Reward, accuracy and response-length curves as one PNG; returns its path."""
        rows = self.history()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.run_dir / "curves.png")
        panels = [("reward/mean", "reward"), ("reward/accuracy", "accuracy (train samples)"),
                  ("eval/accuracy", "held-out accuracy (pass@1)"), ("rollout/length_mean", "response length")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
        for ax, (key, title) in zip(axes, panels):
            pts = [(r["train/step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def finish(self) -> None:
        """Close the wandb run (flushes the offline files)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class Timeline:
    """Which actor did what, when: spans (actor, phase, start, end) in wall-clock seconds, kept in
    run_dir/timeline.jsonl per step; each step's idle fraction per actor; a Gantt chart of the
    last steps (timeline.png beside curves.png).

    Spans are timed by the driver around its calls, so a span is the longest the actors could
    have worked on the call; a launched generation is an open span until it is gathered (in
    async mode it runs across steps, and counts as busy in every step it overlaps).
    """

    ACTORS = ("rollout", "reward", "learner")

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "timeline.jsonl"
        self.spans: list[tuple[str, str, float, float]] = []   # closed, not yet written
        self.open: dict[int, tuple[str, str, float]] = {}       # id -> (actor, phase, start)

    @contextmanager
    def span(self, actor: str, phase: str):
        start = time.time()
        try:
            yield
        finally:
            self.spans.append((actor, phase, start, time.time()))

    def begin(self, key: int, actor: str, phase: str) -> None:
        """A span that ends later (end(key)): e.g. a generation launched now, gathered next step."""
        self.open[key] = (actor, phase, time.time())

    def end(self, key: int) -> None:
        if key in self.open:
            actor, phase, start = self.open.pop(key)
            self.spans.append((actor, phase, start, time.time()))

    def close_step(self, step: int, start: float, end: float) -> dict:
        """Write the step's spans (open ones up to `end`, kept open); returns perf/idle_frac_* of
        every actor over [start, end] (1 - the merged busy time / the step's wall time)."""
        spans = self.spans + [(a, ph, s, end) for a, ph, s in self.open.values()]
        self._write(step, spans)
        wall = max(end - start, 1e-9)
        return {f"perf/idle_frac_{a}": 1.0 - busy_seconds([(s, e) for b, _, s, e in spans if b == a], start, end) / wall
                for a in self.ACTORS}

    def flush(self, step: int) -> None:
        """Write the spans closed since the last step (e.g. the final evaluation) under `step`."""
        self._write(step, self.spans)

    def _write(self, step: int, spans: list) -> None:
        with open(self.path, "a") as f:
            for actor, phase, s, e in spans:
                f.write(json.dumps({"step": step, "actor": actor, "phase": phase, "start": s, "end": e}) + "\n")
        self.spans = []

    def plot(self, path: str | Path, last: int = 6) -> Path | None:
        """Gantt chart of the last `last` steps: one row per actor, one colour per phase."""
        if not self.path.exists():
            return None
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        steps = sorted({r["step"] for r in rows})[-last:]
        rows = [r for r in rows if r["step"] in steps]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t0 = min(r["start"] for r in rows)
        actors = sorted({r["actor"] for r in rows}, key=lambda a: (a not in self.ACTORS, a))
        phases = sorted({r["phase"] for r in rows})
        colours = dict(zip(phases, plt.get_cmap("tab10").colors))
        fig, ax = plt.subplots(figsize=(11, 0.6 * len(actors) + 1.4))
        for r in rows:
            ax.barh(actors.index(r["actor"]), r["end"] - r["start"], left=r["start"] - t0, height=0.6,
                    color=colours[r["phase"]], edgecolor="none")
        ax.set_yticks(range(len(actors)), actors)
        ax.invert_yaxis()
        ax.set_xlabel(f"seconds (steps {steps[0]}-{steps[-1]})")
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[p]) for p in phases], labels=phases,
                  ncol=len(phases), loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return Path(path)


def busy_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of the intervals, clipped to [start, end]."""
    total, reach = 0.0, start
    for s, e in sorted((max(s, start), min(e, end)) for s, e in intervals):
        if e > reach and e > s:     # (a span outside the window is empty once clipped)
            total += e - max(s, reach)
            reach = e
    return total


def read_offline_history(wandb_file: str | Path) -> list[dict]:
    """The history rows ({key: value, "_step": n}) of an offline wandb run file (run-*.wandb).

    The file is a LevelDB-style log (7-byte header, 32 KiB blocks, records of crc32c(4) +
    length(2) + type(1): FULL=1, FIRST=2, MIDDLE=3, LAST=4) of wandb Record protobufs.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(wandb_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{wandb_file} is not a wandb run file")
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                row["_step"] = record.history.step.num
                rows.append(row)
            pending = b""
    return rows
