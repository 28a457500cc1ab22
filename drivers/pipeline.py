"""`r1ray pipeline CONFIG`: the DeepSeek-R1 stages, each feeding the next (R1 paper, DeepSeek-AI
2025, sections 2.2-2.4).

Stages (pipeline.stages, in this order; each writes <output_dir>/<stage>/ and a done.json with
its model path and metrics; a stage with a done.json is not run again, an RL stage stopped half
way resumes from its checkpoint):
  zero                GRPO from the base model, R1 template, rule rewards (accuracy + format);
  cold_start          SFT from the base on readable demonstrations in the
                      |special_token|<reasoning>|special_token|<summary> layout;
  reasoning_rl        GRPO from cold_start: accuracy + format (cold-start layout) + language consistency;
  rejection_sampling  k samples per prompt from reasoning_rl; keep correct, well-formatted,
                      single-language, non-truncated, de-duplicated ones; SFT from the base on them
                      plus the cold-start demonstrations (R1 adds ~200k non-reasoning SFT samples
                      to its ~600k rejection-sampled ones; pipeline.rejection_add_demos);
  all_scenario_rl     GRPO from rejection_sampling on reasoning prompts (rule rewards) mixed with
                      general prompts without a checkable answer (pipeline.general_path; default:
                      the facts world's questions), rewarded by the format rule plus the AGSER
                      judge's score of the answer part (the R1 paper judges helpfulness on the
                      summary; harmlessness needs a reward model, which the embedded default has not);
  distill             SFT of a smaller student (pipeline.student_path, or student_preset) on that
                      SFT set (as R1 distills with its 800k samples), and the same student with the
                      same SFT budget on the cold-start demonstrations alone (no teacher).
Then every stage's model is evaluated on the held-out prompts (pass@1 over k samples, format,
language consistency, length) and a table is printed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from drivers.config import Config

COLD_START = "|special_token|"
REASONING_REWARD = {"weights": {"accuracy": 1.0, "format": 0.2, "language": 0.1}, "layout": "cold_start"}


def cold_start_demo(ex: dict) -> str:
    """A readable cold-start completion: |special_token|<reasoning>|special_token|<summary>."""
    return f"{COLD_START} {ex.get('worked', ex['answer'])} {COLD_START} The answer is <answer> {ex['answer']} </answer>"


def keep_sample(text: str, result, finish_reason: str, min_language: float = 0.99) -> str | None:
    """Why a rejection-sampling candidate is dropped (None: kept). Pure."""
    if result.status != "ok":
        return "verifier_failed"
    if finish_reason == "length":
        return "overlong"
    if result.components.get("accuracy", 0.0) < 1.0:
        return "incorrect"
    if result.components.get("format", 0.0) < 1.0:
        return "bad_format"
    if result.components.get("language", 1.0) < min_language:
        return "mixed_language"
    if "```" in text:
        return "code_block"
    return None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


class Pipeline:
    """Runs the configured stages under cfg.run.output_dir; see the module docstring."""

    def __init__(self, cfg: Config):
        from drivers.models import ensure_model
        from drivers.train import load_task

        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = str(ensure_model(cfg.model, self.out))
        self.train_set, self.heldout, _ = load_task(cfg)
        _write_jsonl(self.out / "heldout.jsonl", [{"prompt": e["prompt"], "answer": e["answer"]} for e in self.heldout])

    # ------------------------------------------------------------------ plumbing
    def done(self, stage: str) -> dict | None:
        path = self.out / stage / "done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def finish(self, stage: str, record: dict) -> dict:
        tmp = self.out / stage / "done.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.out / stage / "done.json")
        return record

    def _grpo(self, stage: str, model: str, steps: int, reward: dict, **sections: dict) -> dict:
        from drivers.config import build_config
        from drivers.train import run_training

        data = self.cfg.model_dump()
        data["model"]["path"] = model
        data["run"].update(output_dir=str(self.out / stage), name=f"{self.cfg.run.name}-{stage}")
        data["train"].update(steps=steps, sft_steps=0)
        data["reward"].update(reward)
        for name, values in sections.items():
            data[name].update(values)
        cfg = build_config(data)
        print(f"   GRPO from {model}", flush=True)
        resume = (self.out / stage / "checkpoints" / "state.json").exists()
        summary = run_training(cfg, resume=resume, shutdown=False)   # one Ray session for all stages
        return {"model": str(self.out / stage / "checkpoints" / "hf"),
                "train": {k: summary.get(k) for k in ("start", "end", "samples")}}

    def _sft(self, stage: str, model: str, rows: list[dict], steps: int, name: str = "model",
             lr: float | None = None) -> dict:
        from drivers.sft import run_sft

        p = self.cfg.pipeline
        data = self.out / stage / f"{name}_data.jsonl"
        _write_jsonl(data, rows)
        epochs = steps * p.sft_batch_size / max(len(rows), 1)
        print(f"   SFT ({name}) from {model} on {len(rows)} rows", flush=True)
        summary = run_sft(model, str(data), str(self.out / stage / name), epochs=epochs,
                          batch_size=p.sft_batch_size, lr=lr or p.sft_lr, warmup_steps=p.sft_warmup_steps,
                          seed=self.cfg.seed, dtype=self.cfg.model.dtype, cpu_threads=self.cfg.learner.cpu_threads)
        return {"model": str(self.out / stage / name), "sft": summary}

    # ------------------------------------------------------------------ stages
    def zero(self, _prev: str) -> dict:
        return self._grpo("zero", self.base, self.cfg.pipeline.zero_steps,
                          {"weights": {"accuracy": 1.0, "format": 0.2}, "layout": "r1"})

    def cold_start(self, _prev: str) -> dict:
        return self._sft("cold_start", self.base, self.demos(), self.cfg.pipeline.cold_start_steps)

    def reasoning_rl(self, prev: str) -> dict:
        return self._grpo("reasoning_rl", prev, self.cfg.pipeline.reasoning_rl_steps, REASONING_REWARD)

    def rejection_sampling(self, prev: str) -> dict:
        import ray

        from actors.rewards import RewardWorker
        from drivers.config import build_config
        from drivers.ray_utils import ActorGroup, init_ray, rollout_worker_actor

        p, cfg = self.cfg.pipeline, self.cfg
        prompts = self.train_set[:p.rejection_prompts]
        init_ray()
        worker = rollout_worker_actor(prev, build_config({**cfg.model_dump(include={"model", "rollout"}),
                                                          "rollout": {**cfg.rollout.model_dump(), "temperature": 1.0}}))
        scorers = ActorGroup(RewardWorker, 1, name="reward", kwargs_fn=lambda r, a, port: dict(
            timeout_s=cfg.reward.timeout_s, weights={"accuracy": 1.0, "format": 0.0, "language": 0.0},
            layout="cold_start", target_language=cfg.reward.target_language, extraction=cfg.reward.extraction))
        try:
            rollouts = ray.get(worker.generate.remote([e["prompt"] for e in prompts], n=p.rejection_k, seed=cfg.seed))
            results = ray.get(scorers.actors[0].score.remote([r.text for r in rollouts],
                                                             [prompts[r.prompt_index]["answer"] for r in rollouts]))
        finally:
            ray.kill(worker)
            scorers.kill()
        stats = {"sampled": len(rollouts), "duplicate": 0}
        kept, seen = [], set()
        for r, res in zip(rollouts, results):
            why = keep_sample(r.text, res, r.finish_reason)
            key = (r.prompt_index, " ".join(r.text.split()))
            if why is None and key in seen:
                why = "duplicate"
            if why:
                stats[why] = stats.get(why, 0) + 1
                continue
            seen.add(key)
            kept.append({"prompt": prompts[r.prompt_index]["prompt"], "completion": r.text.strip()})
        stats["kept"] = len(kept)
        stats["prompts_with_a_kept_sample"] = len({k[0] for k in seen})
        _write_jsonl(self.out / "rejection_sampling" / "samples.jsonl", kept)
        if not kept:
            raise RuntimeError(f"rejection sampling kept no sample: {stats}")
        rows = kept + (self.demos() if p.rejection_add_demos else [])
        stats["sft_rows"] = len(rows)
        steps = max(1, round(p.rejection_epochs * len(rows) / p.sft_batch_size))
        return {**self._sft("rejection_sampling", self.base, rows, steps), "stats": stats}

    def demos(self) -> list[dict]:
        """The cold-start demonstrations: one per training prompt."""
        return [{"prompt": e["prompt"], "completion": cold_start_demo(e)} for e in self.train_set]

    def all_scenario_rl(self, prev: str) -> dict:
        """GRPO on the reasoning prompts plus general ones (no verifiable answer): rule rewards
        where the answer can be checked; on general prompts the format rule plus the AGSER judge
        (the policy itself, weights synced) scoring the answer part (pipeline.judge_reward_weight)."""
        p = self.cfg.pipeline
        general = p.general_path
        if general is None:     # the embedded default: questions about the facts world's countries
            from drivers.agser_eval import facts_world

            general = self.out / "all_scenario_rl" / "general.jsonl"
            _write_jsonl(general, [{"prompt": row["question"]} for row in facts_world(seed=self.cfg.seed)["eval"]])
        return self._grpo("all_scenario_rl", prev, p.all_scenario_rl_steps, REASONING_REWARD,
                          task={"general_path": str(general)},
                          judge={"enabled": True, "reward_weight": p.judge_reward_weight})

    def distill(self, _prev: str) -> dict:
        from drivers.models import init_model

        p = self.cfg.pipeline
        samples_path = self.out / "rejection_sampling" / "model_data.jsonl"   # its SFT set, as in R1
        if not samples_path.exists():
            raise RuntimeError("distill needs the rejection_sampling stage's SFT set (run it first)")
        samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
        student = p.student_path or str(init_model(p.student_preset, self.out / "distill" / "student-init",
                                                   seed=self.cfg.seed))
        distilled = self._sft("distill", student, samples, p.distill_steps, name="model", lr=p.student_sft_lr)
        baseline = self._sft("distill", student, self.demos(), p.distill_steps, name="no_teacher", lr=p.student_sft_lr)
        return {**distilled, "no_teacher_model": baseline["model"]}

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        """Run (or skip, when done) every configured stage, then evaluate every stage's model."""
        from drivers.evaluate import run_eval

        prev, records = self.base, {}
        for stage in self.cfg.pipeline.stages:
            record = self.done(stage)
            if record is None:
                print(f"== stage {stage}", flush=True)
                (self.out / stage).mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                record = getattr(self, stage)(prev)
                record["seconds"] = round(time.perf_counter() - t0, 1)
                self.finish(stage, record)
            else:
                print(f"== stage {stage}: done already ({record['model']})", flush=True)
            records[stage] = record
            if stage != "distill":           # the student is a side branch; the teacher line goes on
                prev = record["model"]
        models = {"base": self.base, **{s: r["model"] for s, r in records.items()}}
        if "distill" in records:
            models["distill_no_teacher"] = records["distill"]["no_teacher_model"]
        table = {}
        for name, model in models.items():
            cached = self.out / "eval" / f"{name}.json"   # a model's evaluation is not repeated on resume
            if cached.exists():
                m = json.loads(cached.read_text())
            else:
                m = run_eval(model, str(self.out / "heldout.jsonl"), k=self.cfg.pipeline.eval_k,
                             max_tokens=self.cfg.rollout.max_tokens, max_model_len=self.cfg.rollout.max_model_len,
                             layout="cold_start" if name not in ("base", "zero") else "r1", seed=self.cfg.seed,
                             cpu_threads=self.cfg.rollout.cpu_threads, extraction=self.cfg.reward.extraction)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(m))
            table[name] = {k: m[k] for k in ("pass@1", f"cons@{self.cfg.pipeline.eval_k}", "format",
                                             "language", "mean_length")}
        (self.out / "pipeline.json").write_text(json.dumps({"stages": records, "eval": table}, indent=1))
        return {"stages": records, "eval": table}


def format_stage_table(table: dict) -> str:
    """Held-out metrics per stage as text."""
    cols = list(next(iter(table.values())))
    lines = [f"{'stage':<20s}" + "".join(f"{c:>13s}" for c in cols)]
    for name, row in table.items():
        lines.append(f"{name:<20s}" + "".join(f"{row[c]:>13.3f}" for c in cols))
    return "\n".join(lines)
