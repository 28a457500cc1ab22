"""The GRPO driver: rollout workers -> reward workers -> learner ranks -> weight sync, on Ray.

    r1ray train configs/tiny.yaml [a.b=value ...] [--resume]
    ray job submit -- r1ray train configs/tiny.yaml        # unchanged on a cluster

Sync mode: generate -> score -> update -> sync, in lock-step. Async mode: the rollout workers
generate the next batch(es) with the weights they hold while the learner trains; each sample
carries its policy version and is admitted only while learner_version - sample_version <=
max_staleness; the loss corrects the lag with truncated importance weights (algo.old_logp =
"learner": the learner's proximal logprobs against the rollout's behaviour logprobs).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from actors.grpo import group_advantages, zero_variance_groups
from drivers.config import Config
from drivers.sft import sft_rows
from drivers.tasks import (arithmetic_examples, load_jsonl, split_heldout, step_prompts,
                           worked_example)


# ----------------------------------------------------------------------------- data
def load_task(cfg: Config) -> tuple[list[dict], list[dict], list]:
    """(train examples, held-out examples, skipped rows) of the configured task."""
    t = cfg.task
    general, skipped = [], []
    if t.general_path:     # prompts without a verifiable answer join the training set (never held out)
        data = load_jsonl(t.general_path, general=True)
        general, skipped = data.examples, list(data.skipped)
    if t.kind == "arithmetic":
        train, held = split_heldout(arithmetic_examples(t.a_max, t.b_max, t.ops, t.a_min, t.b_min), t.heldout, cfg.seed)
        return train + general, held, skipped
    data = load_jsonl(t.path)
    skipped += data.skipped
    if t.eval_path:
        held_data = load_jsonl(t.eval_path)
        skipped += held_data.skipped
        return data.examples + general, held_data.examples[:t.heldout], skipped
    train, held = split_heldout(data.examples, t.heldout, cfg.seed)
    return train + general, held, skipped


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(learner, ckpt_dir: Path, tag: str, state: dict, keep: int) -> None:
    """One checkpoint of a run, in an order that a crash at any point leaves loadable:

    1. every learner rank writes its DeepSpeed state under ckpt_dir/tag, rank 0 an HF export of
       the same weights under ckpt_dir/tag/hf (into a temporary folder, then renamed);
    2. state.json names the tag (written to state.json.tmp, then renamed): resume reads it;
    3. ckpt_dir/hf, the export to load (and the next pipeline stage's model), is switched to
       tag/hf (a symlink, replaced atomically); then all but the newest `keep` step tags are
       deleted, each with its own export.
    A crash in 1 leaves state.json and hf on the previous tag; in 3, an extra tag until the next one.
    `learner` is the learner ActorGroup; `state` gets "tag".
    """
    state["tag"] = tag          # the learner's client state names its own tag
    learner.get(learner.call("save_checkpoint", str(ckpt_dir), tag, {"driver": state}))
    tmp = ckpt_dir / "state.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(ckpt_dir / "state.json")
    learner.get(learner.call("publish_checkpoint", str(ckpt_dir), tag, keep))


# ----------------------------------------------------------------------------- the run
class Run:
    """Owns the actor groups and the state of one training run."""

    def __init__(self, cfg: Config, resume: bool = False):
        import ray
        from transformers import AutoTokenizer

        from actors.learner import Learner
        from actors.prompts import prompt_ids
        from actors.rewards import RewardWorker
        from drivers.models import ensure_model
        from drivers.placement import plan_placement
        from drivers.ray_utils import ActorGroup, init_ray, rollout_group
        from drivers.tracking import RunLogger

        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = {"step": 0, "version": 0, "sft_done": False, "samples": 0, "stale_dropped": 0}
        if resume:
            self.state = self._read_state()
        elif (self.ckpt_dir / "state.json").exists():
            raise FileExistsError(f"{self.run_dir} holds a run already: pass --resume, or set run.output_dir")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train_set, self.heldout, skipped = load_task(cfg)
        for lineno, why in skipped[:20]:
            print(f"skipped data row {lineno}: {why}")
        if skipped:
            print(f"skipped {len(skipped)} bad data rows in all")
        self.model_path = str(ensure_model(cfg.model, self.run_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        prompt_ids(self.tokenizer, self.train_set[0]["prompt"])  # a template that cannot render fails here

        init_ray()
        cuda = torch.cuda.is_available()
        plan = plan_placement(rollout_workers=cfg.rollout.num_workers,
                              tensor_parallel=cfg.rollout.tensor_parallel_size,
                              learner_ranks=cfg.learner.num_ranks, reward_workers=cfg.reward.num_workers,
                              gpus_per_node=torch.cuda.device_count() if cuda else 0,
                              cores=os.cpu_count() or 1)
        self.rollout_group = rollout_group(self.model_path, cfg)
        self.rollouts = self.rollout_group.actors
        self.rewards = ActorGroup(RewardWorker, cfg.reward.num_workers, num_cpus=plan["reward"].num_cpus,
                                  name="reward", kwargs_fn=lambda r, a, p: dict(
                                      timeout_s=cfg.reward.timeout_s, num_procs=cfg.reward.procs_per_worker,
                                      weights=cfg.reward.weights, layout=cfg.reward.layout,
                                      target_language=cfg.reward.target_language, extraction=cfg.reward.extraction,
                                      max_len=cfg.rollout.max_tokens if cfg.reward.overlong_cache_len else None,
                                      cache_len=cfg.reward.overlong_cache_len or None))
        lp = plan["learner"]
        threads = cfg.learner.cpu_threads or lp.threads
        self.learner = ActorGroup(Learner, cfg.learner.num_ranks, num_cpus=lp.num_cpus, num_gpus=lp.num_gpus,
                                  name="learner", env={"OMP_NUM_THREADS": str(threads)},
                                  kwargs_fn=lambda r, addr, port: dict(
                                      model_path=self.model_path, rank=r, world_size=cfg.learner.num_ranks,
                                      master_addr=addr, master_port=port, cpu_threads=threads,
                                      seed=cfg.seed, dtype=cfg.model.dtype, temperature=cfg.rollout.temperature,
                                      max_len=cfg.rollout.max_tokens,
                                      **cfg.learner.model_dump(exclude={"num_ranks", "cpu_threads", "sft_lr"}),
                                      **cfg.algo.model_dump(exclude={"adv_scale", "dynamic_sampling"})))
        self.judges, self.judging = None, None
        if cfg.judge.enabled:
            from actors.agser import JudgeWorker

            self.judges = ActorGroup(JudgeWorker, cfg.judge.num_workers, name="judge", max_concurrency=2,
                                     kwargs_fn=lambda r, a, p: dict(
                                         model_path=cfg.judge.model_path or self.model_path, dtype=cfg.model.dtype,
                                         max_tokens=cfg.judge.max_tokens, unit=cfg.judge.unit,
                                         max_model_len=cfg.rollout.max_model_len, kv_cache_gib=cfg.rollout.kv_cache_gib))
        self.evaluator, self.pending_evals = None, []
        if cfg.train.async_eval:
            from actors.evaluator import CheckpointEvaluator

            self.evaluator = ActorGroup(CheckpointEvaluator, 1, name="evaluator",
                                        env={"OMP_NUM_THREADS": str(cfg.rollout.cpu_threads or os.cpu_count() or 1)},
                                        kwargs_fn=lambda r, a, p: dict(
                                            model_path=self.model_path, **cfg.rollout.model_dump(), dtype=cfg.model.dtype,
                                            eval_k=cfg.train.eval_k, eval_temperature=cfg.train.eval_temperature,
                                            reward=dict(timeout_s=cfg.reward.timeout_s, weights=cfg.reward.weights,
                                                        layout=cfg.reward.layout, extraction=cfg.reward.extraction,
                                                        target_language=cfg.reward.target_language)))
            ray.get(self.evaluator.actors[0].info.remote())
        self.ray = ray
        if resume:
            tag = self.state["tag"]
            self.learner.get(self.learner.call("load_checkpoint", str(self.ckpt_dir), tag))
            self.sync_weights(self.state["version"])
        self.logger = RunLogger(self.run_dir, mode=cfg.run.wandb_mode, project=cfg.run.wandb_project,
                                name=cfg.run.name, config=cfg.model_dump())

    # ---------------------------------------------------------------- state
    def _read_state(self) -> dict:
        path = self.ckpt_dir / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint state at {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume: checkpoint state {path} is corrupt ({err})") from None

    def checkpoint(self) -> None:
        """Learner state + HF export + driver state (step, version, counters); see save_checkpoint."""
        save_checkpoint(self.learner, self.ckpt_dir, f"step{self.state['step']}", self.state,
                        keep=self.cfg.run.keep_checkpoints)
        self.logger.plot()

    # ---------------------------------------------------------------- weights
    def sync_weights(self, version: int) -> float:
        """Learner -> every rollout worker (and policy judge), bucketed through the object store.

        A worker that died is replaced and loaded with the same weights; a transfer that does not
        finish within train.sync_timeout_s raises TimeoutError instead of hanging. Returns seconds.
        """
        t0 = time.perf_counter()
        handles = self.learner.get(self.learner.call("export_weights"))[0]
        groups = [self.rollout_group] + ([self.judges] if self.judges and not self.cfg.judge.model_path else [])
        calls = [(g, i, g.actors[i].update_weights.remote(handles, version))
                 for g in groups for i in range(len(g.actors))]
        for g, i, ref in calls:
            try:
                self._get_within(ref, t0, f"weight sync (version {version}) to {g.name} worker {i}")
            except self.ray.exceptions.RayActorError:
                self._restart(g, i)
                self._get_within(g.actors[i].update_weights.remote(handles, version), t0,
                                 f"weight sync (version {version}) to restarted {g.name} worker {i}")
        self.state["version"] = version
        return time.perf_counter() - t0

    def _get_within(self, ref, t0: float, what: str):
        limit = self.cfg.train.sync_timeout_s
        try:
            return self.ray.get(ref, timeout=max(0.0, limit - (time.perf_counter() - t0)))
        except self.ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{what} did not finish within train.sync_timeout_s={limit} s") from None

    def _restart(self, group, i: int):
        """Replace a dead worker of `group` and wait until it is up (its engine started)."""
        print(f"{group.name} worker {i} died: restarting it", flush=True)
        actor = group.restart(i)
        self.state["restarts"] = self.state.get("restarts", 0) + 1
        if hasattr(actor, "info"):
            self.ray.get(actor.info.remote())
        return actor

    def _restart_rollout(self, i: int):
        """A fresh rollout worker i, loaded with the current policy version's weights."""
        actor = self._restart(self.rollout_group, i)
        handles = self.learner.get(self.learner.call("export_weights"))[0]
        self.ray.get(actor.update_weights.remote(handles, self.state["version"]))
        return actor

    # ---------------------------------------------------------------- rollouts and rewards
    def launch_generation(self, examples: list[dict], seed: int, **sampling) -> list:
        """Split prompts over the rollout workers; returns (refs, shards, call kwargs, workers) for collect()."""
        n = sampling.pop("n", self.cfg.rollout.group_size)
        k = len(self.rollouts)
        shards = [examples[i::k] for i in range(k)]
        calls = [dict(prompts=[e["prompt"] for e in shard], n=n, seed=seed + 100_003 * i, **sampling)
                 for i, shard in enumerate(shards)]
        refs = [w.generate.remote(**c) if shard else None
                for w, c, shard in zip(self.rollouts, calls, shards)]
        return refs, shards, calls, list(self.rollouts)

    def collect(self, launched) -> list[tuple[dict, list]]:
        """[(example, its group of rollouts)] in launch order.

        If a rollout worker died, it is replaced (current weights) and its prompts are generated
        again with the same seeds: no group is lost and none is counted twice.
        """
        refs, shards, calls, used = launched
        groups = []
        for i, (ref, shard, call) in enumerate(zip(refs, shards, calls)):
            if ref is None:
                continue
            try:
                rollouts = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                self.state["requeued_prompts"] = self.state.get("requeued_prompts", 0) + len(shard)
                # replaced already (a weight sync found it dead)? then it holds the current weights
                worker = self.rollouts[i] if self.rollouts[i] is not used[i] else self._restart_rollout(i)
                rollouts = self.ray.get(worker.generate.remote(**call))
            per = len(rollouts) // max(len(shard), 1)
            groups += [(ex, rollouts[j * per:(j + 1) * per]) for j, ex in enumerate(shard)]
        return groups

    def score(self, groups: list[tuple[dict, list]]) -> list:
        """RewardResults for every rollout, sharded over the reward workers."""
        flat = [(r.text, ex["answer"], len(r.completion_ids)) for ex, rs in groups for r in rs]
        k = len(self.rewards.actors)
        shards = [flat[i::k] for i in range(k)]
        args = [([c for c, _, _ in s], [a for _, a, _ in s], [n for _, _, n in s]) for s in shards]
        refs = self.rewards.call_each("score", args)
        outs = []
        for i, ref in enumerate(refs):
            try:
                outs.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError:  # a dead verifier: replace it, score its shard again
                outs.append(self.ray.get(self._restart(self.rewards, i).score.remote(*args[i])))
        results = [None] * len(flat)
        for i, out in enumerate(outs):
            results[i::k] = out
        general = [(i, ex["prompt"], r.text) for i, (ex, r) in enumerate((ex, r) for ex, rs in groups for r in rs)
                   if ex["answer"] is None]
        if general:
            self.judge_rewards(general, results)
        return results

    def judge_rewards(self, general: list[tuple[int, str, str]], results: list) -> None:
        """All-scenario RL: a general prompt's completion (no verifiable answer) earns
        judge.reward_weight x its AGSER score (the answer part judged against the judge's
        re-queries), added to its rule rewards as the "judge" component. Blocks the step."""
        n = len(self.judges.actors)
        shards = [general[i::n] for i in range(n)]
        args = [([q for _, q, _ in s], [t for _, _, t in s], (self.cfg.judge.variant,)) for s in shards]
        used = list(self.judges.actors)
        refs = [a.score.remote(*arg) if arg[0] else None for a, arg in zip(used, args)]
        w = self.cfg.judge.reward_weight
        for i, ref in enumerate(refs):
            if ref is None:
                continue
            try:
                judged = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:   # a dead judge: replace it, judge its shard again
                self.state["requeued_prompts"] = self.state.get("requeued_prompts", 0) + len(args[i][0])
                judged = self.ray.get(self._judge_again(i, used[i]).score.remote(*args[i]))
            for (row, _, _), j in zip(shards[i], judged):
                res, score = results[row], j[self.cfg.judge.variant]["score"]
                if res.status == "ok":
                    res.components["judge"] = score
                    res.reward += w * score

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, examples: list[dict] | None = None) -> dict:
        """Held-out accuracy (pass@1: the mean over train.eval_k samples at train.eval_temperature;
        greedy by default), format rate and mean length."""
        from actors.evaluator import eval_metrics

        examples = examples or self.heldout
        t = self.cfg.train
        groups = self.collect(self.launch_generation(examples, seed=0, n=t.eval_k, temperature=t.eval_temperature))
        return eval_metrics([r for _, rs in groups for r in rs], self.score(groups), len(examples))

    def launch_eval(self, step: int) -> None:
        """Asynchronous evaluation: save the current weights, hand the checkpoint to the evaluator."""
        path = self.run_dir / "eval_checkpoints" / f"step{step}"
        self.learner.get(self.learner.call("save_hf", str(path)))
        self.pending_evals.append(self.evaluator.actors[0].evaluate.remote(
            str(path), step, [e["prompt"] for e in self.heldout], [e["answer"] for e in self.heldout]))

    def finished_eval(self, wait: bool = False) -> dict:
        """The oldest pending asynchronous evaluation if it is done (or, with wait, once it is)."""
        if not self.pending_evals:
            return {}
        ready, _ = self.ray.wait(self.pending_evals[:1], timeout=None if wait else 0)
        return self.ray.get(self.pending_evals.pop(0)) if ready else {}

    # ---------------------------------------------------------------- cold start
    def cold_start(self) -> dict:
        """Brief SFT on worked examples of the training prompts (R1 format)."""
        cfg = self.cfg
        if cfg.learner.sft_lr:
            self.learner.get(self.learner.call("set_lr", cfg.learner.sft_lr))
        from tqdm import tqdm

        last, verifiable = {}, [ex for ex in self.train_set if ex["answer"] is not None]
        for s in tqdm(range(cfg.train.sft_steps), desc="cold-start SFT", unit="step"):
            examples = step_prompts(verifiable, s, cfg.train.sft_batch_size, cfg.seed + 7)
            rows, plens = sft_rows(self.tokenizer, [{"prompt": ex["prompt"], "completion": worked_example(ex)}
                                                    for ex in examples])
            last = self.learner.get(self.learner.call_each(
                "sft_step", [({"input_ids": rows[i::len(self.learner.actors)],
                               "prompt_lens": plens[i::len(self.learner.actors)]},)
                             for i in range(len(self.learner.actors))]))[0]
        if cfg.learner.sft_lr:
            self.learner.get(self.learner.call("set_lr", cfg.learner.lr))
        self.sync_weights(self.state["version"] + 1)
        self.state["sft_done"] = True
        return last

    # ---------------------------------------------------------------- one RL step
    def build_batch(self, groups, results) -> tuple[dict, dict]:
        """Advantages per group; drops groups with a failed verifier item or (dynamic sampling)
        zero variance. Returns (learner batch, metrics)."""
        G = self.cfg.rollout.group_size
        version = self.state["version"]
        keep_rows, rewards_all, metrics = [], [], {}
        failed_groups = stale_groups = 0
        for gi, (ex, rs) in enumerate(groups):
            res = results[gi * G:(gi + 1) * G]
            if any(r.status != "ok" for r in res):
                failed_groups += 1
                continue
            if any(version - r.policy_version > self.cfg.train.max_staleness for r in rs):
                stale_groups += 1
                continue
            keep_rows.append((rs, [r.reward for r in res]))
        rewards = torch.tensor([x for _, rw in keep_rows for x in rw])
        adv = group_advantages(rewards, G, self.cfg.algo.advantage) if len(rewards) else rewards
        zero_var = zero_variance_groups(rewards, G) if len(rewards) else 0
        batch = {"input_ids": [], "prompt_lens": [], "advantages": [], "behavior_logp": []}
        for gi, (rs, _) in enumerate(keep_rows):
            group_adv = adv[gi * G:(gi + 1) * G]
            if self.cfg.algo.dynamic_sampling and bool((group_adv == 0).all()):
                continue
            for r, a in zip(rs, group_adv.tolist()):
                if r.finish_reason == "abort" or not r.completion_ids:
                    continue
                batch["input_ids"].append(r.prompt_ids + r.completion_ids)
                batch["prompt_lens"].append(len(r.prompt_ids))
                batch["advantages"].append(a)
                batch["behavior_logp"].append(r.logprobs)
        staleness = [version - r.policy_version for rs, _ in keep_rows for r in rs]
        metrics.update({"train/failed_groups": failed_groups, "train/stale_groups": stale_groups,
                        "train/zero_variance_groups": zero_var, "train/rows": len(batch["input_ids"]),
                        "async/staleness_mean": sum(staleness) / max(len(staleness), 1),
                        "async/staleness_max": max(staleness, default=0)})
        self.state["stale_dropped"] += stale_groups
        return batch, metrics

    def train_on(self, batch: dict) -> dict:
        """Shard rows over learner ranks by tokens (round-robin over length order) and update."""
        n = len(self.learner.actors)
        order = sorted(range(len(batch["input_ids"])), key=lambda i: -len(batch["input_ids"][i]))
        shards = [order[r::n] for r in range(n)]
        per_rank = [({k: [v[i] for i in idx] for k, v in batch.items()},) for idx in shards]
        return self.learner.get(self.learner.call_each("train_step", per_rank))[0]

    def step_seed(self, step: int, rnd: int = 0) -> int:
        return (self.cfg.seed * 1_000_003 + step * 7919 + rnd * 104_729) % (2**31 - 1)

    def generate_step(self, step: int):
        """Launch the generation of RL step `step` (its prompts and seeds depend on step only)."""
        examples = step_prompts(self.train_set, step, self.cfg.train.prompts_per_step, self.cfg.seed)
        return self.launch_generation(examples, seed=self.step_seed(step))

    def gather_step(self, step: int, launched) -> tuple[list, list, dict]:
        """Collect, score, and (dynamic sampling) refill until enough groups have variance."""
        cfg = self.cfg
        groups = self.collect(launched)
        t0 = time.perf_counter()
        results = self.score(groups)
        score_s = time.perf_counter() - t0
        rounds = 0
        if cfg.algo.dynamic_sampling:
            G = cfg.rollout.group_size

            def varied(gs, rs):
                return sum(1 for gi in range(len(gs))
                           if len({r.reward for r in rs[gi * G:(gi + 1) * G]}) > 1)
            while varied(groups, results) < cfg.train.prompts_per_step and rounds < cfg.train.max_refill_rounds:
                rounds += 1
                extra = step_prompts(self.train_set, step * (cfg.train.max_refill_rounds + 1) + rounds,
                                     cfg.train.prompts_per_step, cfg.seed + 1)
                more = self.collect(self.launch_generation(extra, seed=self.step_seed(step, rounds)))
                groups += more
                t0 = time.perf_counter()
                results += self.score(more)
                score_s += time.perf_counter() - t0
        return groups, results, {"train/refill_rounds": rounds, "perf/score_seconds": score_s}

    # ---------------------------------------------------------------- AGSER judge pool
    def judge_step(self, step: int, groups) -> dict:
        """Launch AGSER on a share of this step's groups (one answer each); return the last launch's metrics.

        The judges work while the next step runs, so agser/* metrics logged at step s describe the
        rollouts of step s - 1 (agser/of_step says which); training never waits on them.
        """
        metrics = self.collect_judging()
        k = max(1, math.ceil(self.cfg.judge.share * len(groups)))
        picked = [(ex["prompt"], rs[0].text) for ex, rs in groups[:k] if rs]
        n = len(self.judges.actors)
        shards = [([q for q, _ in picked[i::n]], [t for _, t in picked[i::n]], (self.cfg.judge.variant,))
                  for i in range(n)]
        self.judging = (step + 1, [a.score.remote(*sh) if sh[0] else None for a, sh in zip(self.judges.actors, shards)],
                        shards, list(self.judges.actors))
        return metrics

    def _judge_again(self, i: int, used):
        """Judge i died while `used` was in its place: its replacement, holding the current policy
        when the judge is the policy (a weight sync may have replaced and loaded it already)."""
        if self.judges.actors[i] is not used:
            return self.judges.actors[i]
        judge = self._restart(self.judges, i)
        if not self.cfg.judge.model_path:
            handles = self.learner.get(self.learner.call("export_weights"))[0]
            self.ray.get(judge.update_weights.remote(handles, self.state["version"]))
        return judge

    def collect_judging(self) -> dict:
        """Wait for the judges' last launch (if any) and summarise it as agser/* metrics."""
        if self.judging is None:
            return {}
        (of_step, refs, shards, used), self.judging = self.judging, None
        judged = []
        for i, (ref, shard) in enumerate(zip(refs, shards)):
            if ref is None:
                continue
            try:
                judged += self.ray.get(ref)
            except self.ray.exceptions.RayActorError:  # a dead judge: replace it, judge its shard again
                self.state["requeued_prompts"] = self.state.get("requeued_prompts", 0) + len(shard[0])
                judged += self.ray.get(self._judge_again(i, used[i]).score.remote(*shard))
        v = self.cfg.judge.variant
        scores = [j[v]["score"] for j in judged]
        return {"agser/score_mean": sum(scores) / len(scores),
                "agser/r_att_mean": sum(j[v]["r_att"] for j in judged) / len(judged),
                "agser/r_non_att_mean": sum(j[v]["r_non_att"] for j in judged) / len(judged),
                "agser/low_score_frac": sum(sc <= 0 for sc in scores) / len(scores),
                "agser/judged": len(judged), "agser/of_step": of_step}

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Cold start (optional), then GRPO steps; evaluates at the start and the end."""
        from tqdm import tqdm

        cfg = self.cfg
        summary = {}
        if cfg.train.sft_steps and not self.state["sft_done"]:
            summary["base"] = self.evaluate()
            summary["sft"] = self.cold_start()
        start = self.state["step"]
        if start == 0:
            summary["start"] = self.evaluate()
            self.logger.log(summary["start"], step=0)
        # async: generation runs `ahead` steps in front of the learner, so a sample made with
        # version v is trained on at version v + ahead at most (max_staleness)
        ahead = cfg.train.max_staleness if cfg.train.mode == "async" else 0
        pending = {s: self.generate_step(s) for s in range(start, min(start + max(ahead, 1), cfg.train.steps))}
        bar = tqdm(range(start, cfg.train.steps), desc=f"GRPO ({cfg.train.mode})", unit="step",
                   initial=start, total=cfg.train.steps)
        for step in bar:
            t0, t_wall = time.perf_counter(), time.time()
            groups, results, extra = self.gather_step(step, pending.pop(step))
            gen_s = time.perf_counter() - t0 - extra["perf/score_seconds"]
            if ahead and step + ahead < cfg.train.steps:  # generates while the learner trains
                pending[step + ahead] = self.generate_step(step + ahead)
            batch, metrics = self.build_batch(groups, results)
            metrics.update(extra)
            if self.judges:
                metrics.update(self.judge_step(step, groups))
            if batch["input_ids"]:
                metrics.update({k if "/" in k else f"train/{k}": v for k, v in self.train_on(batch).items()})
                metrics["sync/seconds"] = self.sync_weights(self.state["version"] + 1)
            if not ahead and step + 1 < cfg.train.steps:
                pending[step + 1] = self.generate_step(step + 1)
            self.state["step"] = step + 1
            metrics.update(self._rollout_metrics(groups, results, time.perf_counter() - t0, gen_s))
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                if self.evaluator:
                    self.launch_eval(step + 1)
                else:
                    metrics.update(self.evaluate())
            if self.evaluator:
                metrics.update(self.finished_eval())
            metrics.update({"perf/step_started": t_wall, "perf/step_finished": time.time()})
            self.logger.log(metrics, step=step + 1)
            bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                            acc=f"{metrics.get('reward/accuracy', float('nan')):.2f}")
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps:
                self.checkpoint()
        bar.close()
        while self.pending_evals:  # the asynchronous evaluations still running: log them too
            self.logger.log(self.finished_eval(wait=True), step=self.state["step"])
        summary["end"] = self.evaluate()
        self.logger.log({**summary["end"], **self.collect_judging()}, step=self.state["step"])
        summary["curves"] = str(self.logger.plot())
        summary.update(eval_k=cfg.train.eval_k, eval_temperature=cfg.train.eval_temperature)
        summary["samples"] = self.state["samples"]
        summary["stale_dropped"] = self.state["stale_dropped"]
        return summary

    def _rollout_metrics(self, groups, results, step_s: float, gen_s: float) -> dict:
        from actors.rewards import summarize

        rs = [r for _, g in groups for r in g]
        lengths = [len(r.completion_ids) for r in rs]
        self.state["samples"] += len(rs)
        return {**summarize(results), "rollout/length_mean": sum(lengths) / max(len(lengths), 1),
                "rollout/length_max": max(lengths, default=0), "rollout/samples": len(rs),
                "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rs) / max(len(rs), 1),
                "perf/step_seconds": step_s, "perf/generate_seconds": gen_s,
                "perf/samples_per_s": len(rs) / step_s, "perf/tokens_per_s": sum(lengths) / step_s,
                "train/policy_version": self.state["version"], "train/samples_total": self.state["samples"],
                "fault/restarts": self.state.get("restarts", 0),
                "fault/requeued_prompts": self.state.get("requeued_prompts", 0)}

    def close(self) -> None:
        """Finish wandb, stop this run's actors and Ray session (nothing else)."""
        self.logger.finish()
        self.rollout_group.kill()
        if self.judges:
            self.judges.kill()
        if self.evaluator:
            self.evaluator.kill()
        self.rewards.kill()
        self.learner.kill()


def format_table(summary: dict) -> str:
    """The before/after table printed at the end of a run."""
    cols = [k for k in ("base", "start", "end") if k in summary]
    names = {"base": "base model", "start": "start of RL", "end": "end of RL"}
    k, temp = summary.get("eval_k", 1), summary.get("eval_temperature", 0.0)
    how = "greedy" if temp == 0 else f"pass@1, k {k}, T {temp:g}"
    title = f"held-out ({how})"
    width = max(22, len(title) + 2)
    lines = [f"{title:<{width}}" + "".join(f"{names[c]:>14}" for c in cols)]
    for key, label in [("eval/accuracy", "accuracy"), ("eval/format", "format"), ("eval/length", "length")]:
        lines.append(f"{label:<{width}}" + "".join(f"{summary[c][key]:>14.3f}" for c in cols))
    return "\n".join(lines)


def run_training(cfg: Config, resume: bool = False, shutdown: bool = True) -> dict:
    """Build the run, train, print the table, clean up; returns the summary.

    shutdown=False leaves the Ray session up (callers that run several stages in one session).
    """
    import ray

    run = Run(cfg, resume=resume)
    try:
        summary = run.train()
    finally:
        run.close()
        if shutdown:
            ray.shutdown()
    print(format_table(summary))
    print(json.dumps({k: v for k, v in summary.items() if k in ("start", "end", "curves", "samples",
                                                                "stale_dropped")}, default=str))
    return summary
