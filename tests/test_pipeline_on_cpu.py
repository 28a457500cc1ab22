"""The R1 pipeline: the pure pieces by hand, then every stage on the tiny model (shortened)."""
import json

from actors.rewards import RewardResult, score_one
from drivers.pipeline import cold_start_demo, keep_sample


def test_cold_start_demos_have_the_layout_and_the_right_answer():
    ex = {"prompt": "What is 19 + 6?", "answer": "25", "worked": "9 + 6 = 15 , 1 + 1 = 2"}
    text = cold_start_demo(ex)
    assert text.startswith("|special_token| 9 + 6") and text.count("|special_token|") == 2
    r = score_one(text, "25", weights={"accuracy": 1.0, "format": 1.0, "language": 1.0}, layout="cold_start")
    assert (r.components["accuracy"], r.components["format"], r.components["language"]) == (1.0, 1.0, 1.0)
    assert score_one(text, "26", weights={"accuracy": 1.0}, layout="cold_start").components["accuracy"] == 0.0


def test_rejection_filter_reasons():
    def res(acc=1.0, fmt=1.0, lang=1.0, status="ok"):
        return RewardResult(reward=acc if status == "ok" else None, status=status,
                            components={"accuracy": acc, "format": fmt, "language": lang})
    assert keep_sample("ok", res(), "stop") is None
    assert keep_sample("x", res(status="timeout"), "stop") == "verifier_failed"
    assert keep_sample("x", res(), "length") == "overlong"
    assert keep_sample("x", res(acc=0.0), "stop") == "incorrect"
    assert keep_sample("x", res(fmt=0.0), "stop") == "bad_format"
    assert keep_sample("x", res(lang=0.8), "stop") == "mixed_language"
    assert keep_sample("```py\nx```", res(), "stop") == "code_block"


def test_tiny_pipeline_runs_every_stage_and_resumes_stage_by_stage(ray_session, tmp_path, capsys, outcome_seed,
                                                                   outcome_threads):
    """Every stage on the tiny model, shortened; its one training outcome is the cold start's format.

    Margin (benchmarks/outcome_margins.py, seeds 0-2, 2-core AMD EPYC): cold-start format
    0.969-1.0 against the 0.5 asserted; the random base model's is 0.0.
    """
    from drivers.cli import main
    from outcomes import report_outcome

    out = tmp_path / "pipe"
    args = ["pipeline", "configs/tiny.yaml", f"run.output_dir={out}", "run.wandb_mode=disabled",
            "task.heldout=16", "train.eval_every=0", "train.prompts_per_step=8", "rollout.group_size=4",
            "pipeline.zero_steps=2", "pipeline.cold_start_steps=150", "pipeline.reasoning_rl_steps=3",
            "pipeline.all_scenario_rl_steps=2", "judge.share=0.125", "pipeline.rejection_epochs=1",
            "pipeline.rejection_prompts=48", "pipeline.rejection_k=4", "pipeline.distill_steps=60",
            "pipeline.eval_k=2", f"seed={outcome_seed}", f"model.seed={outcome_seed}",
            f"learner.cpu_threads={outcome_threads}", f"rollout.cpu_threads={outcome_threads}"]
    assert main(args) == 0
    result = json.loads((out / "pipeline.json").read_text())
    table = result["eval"]
    print(json.dumps(table))
    assert set(table) == {"base", "zero", "cold_start", "reasoning_rl", "rejection_sampling", "all_scenario_rl",
                          "distill", "distill_no_teacher"}
    report_outcome("pipeline_cold_start", "cold_start format >= 0.5 (base 0.0 measured alongside)",
                   cold_start_format=table["cold_start"]["format"], base_format=table["base"]["format"])
    assert table["base"]["format"] == 0.0 and table["cold_start"]["format"] >= 0.5   # the layout was learned
    stats = result["stages"]["rejection_sampling"]["stats"]
    assert stats["sampled"] == 48 * 4 and 0 < stats["kept"] <= stats["sampled"]
    assert sum(v for k, v in stats.items() if k not in ("sampled", "kept", "prompts_with_a_kept_sample", "sft_rows")) \
        + stats["kept"] == stats["sampled"]                                 # every sample accounted for
    kept = (out / "rejection_sampling" / "samples.jsonl").read_text().splitlines()
    assert len(kept) == stats["kept"]
    sft_set = (out / "rejection_sampling" / "model_data.jsonl").read_text().splitlines()
    assert len(sft_set) == stats["sft_rows"] > stats["kept"]     # + the cold-start demonstrations (R1's mix)
    # all-scenario RL: general prompts (no answer) were rewarded by the judge in its steps
    rows = [json.loads(x) for x in (out / "all_scenario_rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2 and any("reward/judge" in r for r in steps)
    assert all(-1.0 <= r["reward/judge"] <= 1.0 for r in steps if "reward/judge" in r)
    # a finished pipeline is not run again: every stage is skipped
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("done already") == 6 and "== stage zero\n" not in log
