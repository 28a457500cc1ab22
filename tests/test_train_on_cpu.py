"""The driver end to end on the tiny model: wandb read-back, exact resume, async staleness."""
import json
import time
from pathlib import Path

import pytest

from drivers.config import build_config
from drivers.tracking import read_offline_history

SMALL = {
    "task": {"a_max": 20, "b_max": 3, "heldout": 8},
    "rollout": {"group_size": 4, "max_tokens": 24, "max_model_len": 256},
    "learner": {"lr": 1e-3, "sft_lr": 1e-3},
    "reward": {"weights": {"accuracy": 1.0, "format": 0.5}},
    "train": {"prompts_per_step": 4, "sft_steps": 3, "sft_batch_size": 8, "checkpoint_every": 2},
}


def _cfg(tmp_path, name, model_path, **train):
    return build_config({**SMALL, "run": {"name": name, "output_dir": str(tmp_path / name)},
                         "model": {"path": model_path},
                         "train": {**SMALL["train"], **train}})


def _run(cfg, resume=False):
    from drivers.train import Run

    run = Run(cfg, resume=resume)
    try:
        return run.train(), run.logger.history()
    finally:
        run.close()


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, "full", tiny_model_path, steps=4)
    cfg.run.keep_checkpoints = 1
    summary, history = _run(cfg)
    return cfg, summary, history


def test_run_logs_every_metric_on_one_step_counter(uninterrupted):
    cfg, summary, history = uninterrupted
    run_dir = Path(cfg.run.output_dir)
    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    # wandb-core writes the offline file from its own process; finish() can return before the
    # last records are on disk, so wait (bounded) until the final step is there
    deadline = time.time() + 120
    rows = read_offline_history(wandb_files[0])
    while not any(r["_step"] == 4 and "eval/accuracy" in r for r in rows) and time.time() < deadline:
        time.sleep(1)
        rows = read_offline_history(wandb_files[0])
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 4
    for r in rows:                      # wandb's step == our step counter in every row
        assert r["train/step"] == r["_step"]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["_step"] for r in train_rows] == [1, 2, 3, 4]
    needed = {"reward/mean", "reward/accuracy", "reward/format", "reward/ok", "reward/timeout",
              "rollout/length_mean", "train/clip_frac_low", "train/clip_frac_high", "train/kl",
              "train/entropy", "async/staleness_mean", "perf/samples_per_s", "sync/seconds",
              "train/policy_loss", "train/grad_norm", "train/lr", "train/mismatch_abs_mean",
              "train/mismatch_abs_max", "train/groups", "train/prompt_digest", "pool/rollout_workers",
              "perf/idle_frac_rollout", "perf/idle_frac_reward", "perf/idle_frac_learner"}
    assert needed <= set(train_rows[0]), needed - set(train_rows[0])
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "timeline.png").stat().st_size > 1000
    for r in train_rows:    # sync mode: each actor waits while the others work
        assert all(0.0 < r[f"perf/idle_frac_{a}"] < 1.0 for a in ("rollout", "reward", "learner")), r
    spans = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    assert {(s["actor"], s["phase"]) for s in spans if s["step"] == 2} >= {
        ("rollout", "generate"), ("reward", "score"), ("learner", "learn"), ("learner", "export"), ("rollout", "update")}
    assert (run_dir / "checkpoints" / "state.json").exists()
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["step"] == 4
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["dtype"] == "float32"
    # checkpoints at steps 2 and 4, keep_checkpoints=1: step 2 is gone, hf is step 4's export
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step4"]
    assert (ckpt / "hf").resolve() == (ckpt / "step4" / "hf").resolve()
    assert (ckpt / "hf" / "model.safetensors").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
    assert all(r["async/staleness_max"] == 0 for r in train_rows)   # sync mode: always fresh


def test_resume_matches_the_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path):
    cfg_full, _, full_history = uninterrupted
    first = _cfg(tmp_path, "resumed", tiny_model_path, steps=2)
    _run(first)
    with pytest.raises(FileExistsError):   # never silently overwrite a run
        _run(first)
    second = _cfg(tmp_path, "resumed", tiny_model_path, steps=4)
    _, history = _run(second, resume=True)

    def by_step(hist):
        return {r["train/step"]: r for r in hist if "train/loss" in r}
    full, resumed = by_step(full_history), by_step(history)
    for step in (3, 4):
        for key in ("train/loss", "reward/mean", "rollout/length_mean", "train/policy_loss"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_resume_without_a_checkpoint_is_a_clear_error(ray_session, tiny_model_path, tmp_path):
    from drivers.train import Run

    with pytest.raises(FileNotFoundError, match="no checkpoint state"):
        Run(_cfg(tmp_path, "never", tiny_model_path, steps=2), resume=True)
    broken = tmp_path / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        Run(_cfg(tmp_path, "broken", tiny_model_path, steps=2), resume=True)
    # a run that trained in bf16 (model.dtype auto on a bf16 machine) resumed where auto says fp32
    other = tmp_path / "bf16" / "checkpoints"
    other.mkdir(parents=True)
    (other / "state.json").write_text(json.dumps({"step": 2, "version": 2, "tag": "step2", "dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="trained in bfloat16, but this config's model.dtype is float32"):
        Run(_cfg(tmp_path, "bf16", tiny_model_path, steps=2), resume=True)


def test_async_mode_bounds_staleness(ray_session, tiny_model_path, tmp_path):
    cfg = _cfg(tmp_path, "async", tiny_model_path, steps=3, mode="async", max_staleness=1, sft_steps=0)
    summary, history = _run(cfg)
    rows = [r for r in history if "reward/mean" in r]
    assert len(rows) == 3
    assert max(r["async/staleness_max"] for r in rows) == 1      # trained on one-version-old samples
    assert all(r["async/staleness_max"] <= 1 for r in rows)
    assert rows[-1]["train/policy_version"] == 3


def test_async_resume_from_a_checkpoint_taken_with_rollouts_in_flight(ray_session, tiny_model_path, tmp_path):
    """Async (max_staleness 1): the step-2 checkpoint is written while step 3's rollouts are already
    launched; the run crashes right after it. Resumed, every step trains on its own prompts
    exactly once: the same prompts per step as an uninterrupted run, none lost, none twice."""
    from drivers.train import Run

    def cfg(name):
        return _cfg(tmp_path, name, tiny_model_path, steps=4, mode="async", max_staleness=1, sft_steps=0)

    _, full = _run(cfg("async_full"))
    launched_at_checkpoint = []

    class CrashAfterCheckpoint(Run):
        launched: list = []

        def launch_step(self, step):
            self.launched.append(step)
            return super().launch_step(step)

        def checkpoint(self):
            super().checkpoint()
            if self.state.step == 2:
                launched_at_checkpoint.extend(self.launched)
                raise RuntimeError("crash right after the step-2 checkpoint")

    run = CrashAfterCheckpoint(cfg("async_cut"))
    try:
        with pytest.raises(RuntimeError, match="crash right after"):
            run.train()
    finally:
        run.close()
    assert launched_at_checkpoint == [0, 1, 2]       # step index 2 (the third step) was in flight
    _, resumed = _run(cfg("async_cut"), resume=True)

    def by_step(hist):
        rows = [r for r in hist if "train/loss" in r]
        assert len(rows) == len({r["train/step"] for r in rows}), "a step was trained twice"
        return {r["train/step"]: r for r in rows}
    a, b = by_step(full), by_step(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert b[step]["train/prompt_digest"] == a[step]["train/prompt_digest"], step
        assert (b[step]["rollout/samples"], b[step]["train/groups"]) == (a[step]["rollout/samples"], 4)
    assert b[4]["train/samples_total"] == a[4]["train/samples_total"] == 4 * 4 * 4
    for step in (1, 2):                                   # before the crash: the same run
        assert b[step]["train/loss"] == a[step]["train/loss"]


def test_tiny_recipe_really_learns(ray_session, tmp_path, outcome_seed, outcome_threads):
    """The README recipe's cold start and first 20 GRPO steps: held-out greedy accuracy must rise.

    The model is built by the run itself, as in `make run` (here model seed = run seed). The
    recipe's lr decays over its 150 steps (a 20-step run would decay over 20, inside the 20-step
    warmup), so this test keeps a constant lr and 64 held-out problems. Margins measured on this
    code (benchmarks/outcome_margins.py, 2-core AMD EPYC, 1 and 2 threads give the same values):
    seed 0 0.234 -> 0.344, seed 1 0.562 -> 0.688, seed 2 0.125 -> 0.250 (gains 0.109-0.125 against
    the 0.05 asserted; start format 0.984-1.0 against 0.9). Runs are deterministic (two `make run`s
    agree bit for bit), so with lr 0 the end evaluation repeats the start's and the assertion fails.
    """
    from drivers.config import load_config
    from outcomes import report_outcome

    root = Path(__file__).resolve().parents[1]
    s, t = outcome_seed, outcome_threads
    cfg = load_config(root / "configs/tiny.yaml", [
        f"run.output_dir={tmp_path / 'tiny'}", "train.steps=20", "train.eval_every=0", "run.wandb_mode=disabled",
        "learner.lr_decay=none", "task.heldout=64",
        f"seed={s}", f"model.seed={s}", f"learner.cpu_threads={t}", f"rollout.cpu_threads={t}"])
    summary, _ = _run(cfg)
    start, end = summary["start"]["eval/accuracy"], summary["end"]["eval/accuracy"]
    report_outcome("tiny_recipe_20_steps", "start format >= 0.9; end >= start + 0.05",
                   start_format=summary["start"]["eval/format"], start=start, end=end, gain=end - start)
    assert summary["start"]["eval/format"] >= 0.9          # the cold start taught the format
    assert end >= start + 0.05                              # GRPO itself raised the accuracy


def test_dynamic_sampling_drops_flat_groups_and_refills(ray_session, tiny_model_path, tmp_path):
    """An untrained model earns reward 0 everywhere: every group is flat, so dynamic sampling
    draws more prompts (max_refill_rounds times), trains on nothing, and says so in the metrics."""
    cfg = build_config({**SMALL, "run": {"name": "dyn", "output_dir": str(tmp_path / "dyn")},
                        "model": {"path": tiny_model_path}, "algo": {"dynamic_sampling": True},
                        "train": {**SMALL["train"], "steps": 1, "sft_steps": 0, "max_refill_rounds": 2}})
    _, history = _run(cfg)
    row = [r for r in history if "reward/mean" in r][0]
    assert row["reward/mean"] == 0.0
    assert row["train/refill_rounds"] == 2
    assert row["rollout/samples"] == 3 * 4 * 4          # 3 rounds x 4 prompts x G=4
    assert row["train/zero_variance_groups"] == 12 and row["train/rows"] == 0
    assert "train/loss" not in row                      # nothing to learn from: no update


def test_faults_workers_die_sync_stalls_learner_crashes_and_nothing_is_lost(uninterrupted, tiny_model_path,
                                                                            tmp_path, ray_session, kill_actor):
    """Kill a rollout and a reward worker mid-run, stall a weight sync, kill the learner; resume.

    Every step must equal the uninterrupted run's (same samples, same loss): the restarted rollout
    worker regenerates its lost prompts with the same seeds and the current weights.
    """
    from drivers.train import Run

    _, _, full_history = uninterrupted
    cfg = _cfg(tmp_path, "faults", tiny_model_path, steps=2)
    run = Run(cfg)
    history = []
    try:
        run.train()
        kill_actor(run.rollout.actors[0])                      # fault 1: the rollout worker dies
        kill_actor(run.rewards.actors[0])                # fault 2: the reward worker dies
        run.cfg.train.steps = 3
        run.train()
        assert run.state.restarts == 2 and run.state.requeued_prompts == 4
        # fault 3: a weight sync that cannot finish (the engine is busy; mode "finish" waits)
        busy = run.rollout.actors[0].generate.remote(["What is 1 + 1?"], n=64, max_tokens=150, ignore_eos=True)
        while ray_session.get(run.rollout.actors[0].num_in_flight.remote()) == 0:
            time.sleep(0.05)
        run.cfg.train.sync_timeout_s = 0.5
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match="sync_timeout_s=0.5"):
            run.push_weights(run.state.version)             # same weights: harmless once it lands
        assert time.perf_counter() - t0 < 5
        ray_session.get(busy)
        run.cfg.train.sync_timeout_s = 600
        kill_actor(run.learner.actors[0])                # fault 4: the learner rank crashes
        run.cfg.train.steps = 4
        with pytest.raises(ray_session.exceptions.RayActorError):
            run.train()
        history += run.logger.history()
    finally:
        run.close()
    state = json.loads((tmp_path / "faults" / "checkpoints" / "state.json").read_text())
    assert state["step"] == 3                                   # the last checkpoint is intact
    resumed = _cfg(tmp_path, "faults", tiny_model_path, steps=4)
    _, history = _run(resumed, resume=True)

    def by_step(hist):
        return {r["train/step"]: r for r in hist if "train/loss" in r}
    full, faulty = by_step(full_history), by_step(history)
    assert sorted(faulty) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("train/loss", "reward/mean", "rollout/samples", "train/samples_total"):
            assert faulty[step][key] == full[step][key], (step, key)
    print(f"faults injected 4, survived 4; samples {faulty[4]['train/samples_total']} "
          f"= uninterrupted {full[4]['train/samples_total']} (0 lost, 0 counted twice)")


def test_async_evaluation_runs_while_training_continues(ray_session, tiny_model_path, tmp_path):
    """eval_every=1 with train.async_eval: each evaluation runs on its own worker against a saved
    checkpoint; the loop never waits for it, so evaluations overlap later training steps."""
    cfg = _cfg(tmp_path, "aeval", tiny_model_path, steps=4, eval_every=1, async_eval=True, sft_steps=0)
    summary, history = _run(cfg)
    evals = [r for r in history if "eval/of_step" in r]
    assert sorted(r["eval/of_step"] for r in evals) == [1, 2, 3]          # the last step's is the final eval
    assert all(r["eval/n"] == 8 and 0 <= r["eval/accuracy"] <= 1 for r in evals)
    for e in evals:
        assert (tmp_path / "aeval" / "eval_checkpoints" / f"step{int(e['eval/of_step'])}" / "model.safetensors").exists()
    steps = [r for r in history if "perf/step_started" in r]
    overlapping = [(e["eval/of_step"], s["train/step"]) for e in evals for s in steps
                   if s["train/step"] > e["eval/of_step"]
                   and e["eval/started"] < s["perf/step_finished"] and s["perf/step_started"] < e["eval/finished"]]
    print(f"evaluation of step -> training step running meanwhile: {overlapping}")
    assert overlapping                                                    # training went on meanwhile
    assert "end" in summary and summary["end"]["eval/n"] == 8
