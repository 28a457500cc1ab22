"""The GRPO driver: rollout pool -> reward pool -> learner ranks -> weight push, on Ray.

    r1ray train configs/tiny.yaml [a.b=value ...] [--resume]
    ray job submit -- r1ray train configs/tiny.yaml        # unchanged on a cluster

`Run.train` is the step loop: generate -> score -> build the batch (actors.batch.build_batch,
pure) -> train -> push weights; the judge, evaluation and checkpoints are hooks beside it. The
pools (drivers/pools.py) shard every call over their workers and own the one recovery path.
Sync mode runs the steps in lock-step. Async mode keeps generation train.max_staleness steps
ahead with the weights the workers hold; each sample carries its policy version and is admitted
only while learner_version - sample_version <= max_staleness; the loss corrects the lag with
the configured rollout correction (docs/algorithms.md; algo.old_logp = "learner": the learner's
proximal logprobs against the rollout's behaviour logprobs).
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch

from actors.batch import Batch, Group, build_batch, group_uid
from actors.grpo import group_advantages
from drivers.config import Config
from drivers.pools import JudgePool, Pool, RolloutPool, RunState
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
    """One training run: its role pools (rollout, reward, judge, evaluator), the learner ranks,
    and RunState. `train()` is the step loop; judge, evaluation and checkpoints are hooks."""

    def __init__(self, cfg: Config, resume: bool = False):
        from transformers import AutoTokenizer

        from actors.prompts import prompt_ids
        from drivers.models import ensure_model
        from drivers.ray_utils import init_ray
        from drivers.tracking import RunLogger, Timeline

        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = RunState()
        if resume:
            self.state = self._read_state()
            if self.state.dtype and self.state.dtype != cfg.model.dtype:
                raise ValueError(f"--resume: the run trained in {self.state.dtype}, but this config's model.dtype "
                                 f"is {cfg.model.dtype} here (auto decides by the machine): pass "
                                 f"model.dtype={self.state.dtype}")
        elif (self.ckpt_dir / "state.json").exists():
            raise FileExistsError(f"{self.run_dir} holds a run already: pass --resume, or set run.output_dir")
        self.state.dtype = cfg.model.dtype
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
        import ray

        self.ray = ray
        self.pending_evals: list = []
        self.timeline = Timeline(self.run_dir)
        # colocated on GPU: vLLM sleeps while the learner trains (rollout.colocate)
        self.sleep_between_phases, self.asleep = cfg.rollout.colocate and torch.cuda.is_available(), False
        self._start_actors()
        if resume:
            self.learner.get(self.learner.call("load_checkpoint", str(self.ckpt_dir), self.state.tag))
            self.push_weights(self.state.version)
        self.logger = RunLogger(self.run_dir, mode=cfg.run.wandb_mode, project=cfg.run.wandb_project,
                                name=cfg.run.name, config=cfg.model_dump())

    @property
    def rl_decay_steps(self) -> int:
        """The GRPO phase's linear lr-decay horizon in optimizer steps (0: constant lr after the warmup)."""
        cfg = self.cfg
        return cfg.train.steps * cfg.algo.mini_batches if cfg.learner.lr_decay == "linear" else 0

    def _start_actors(self) -> None:
        """The learner ranks, then the pools; each built from its own config section."""
        from actors.learner import Learner, attention_backend
        from actors.rewards import RewardWorker
        from actors.rollout import CPU_BLOCK_SIZE
        from drivers.placement import config_plan, cpu_threads
        from drivers.ray_utils import ActorGroup, rollout_group, rollout_worker_actor, visible_gpus

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        plan = config_plan(cfg, os.cpu_count() or 1, visible_gpus())
        lp = plan["learner"]
        split = cpu_threads(cfg, os.cpu_count() or 1)
        threads = split["learner"]
        if not cuda:
            print(f"CPU threads ({cfg.train.mode}, {os.cpu_count()} cores): {cfg.rollout.num_workers} rollout engine(s) x "
                  f"{split['rollout']}, {cfg.learner.num_ranks} learner rank(s) x {threads}"
                  + (" (phases take turns)" if cfg.train.mode == "sync" else " (at the same time)")
                  + f"; {cfg.model.dtype}, learner attention "
                  f"{attention_backend(cfg.learner.attn_implementation, getattr(torch, cfg.model.dtype), False)}, "
                  f"KV-cache blocks of {cfg.rollout.block_size or CPU_BLOCK_SIZE} tokens", flush=True)
        self.learner = ActorGroup(Learner, cfg.learner.num_ranks, num_cpus=lp.num_cpus, num_gpus=lp.num_gpus,
                                  name="learner", env={"OMP_NUM_THREADS": str(threads)},
                                  kwargs_fn=lambda r, addr, port: dict(
                                      model_path=self.model_path, learner=cfg.learner, algo=cfg.algo, rank=r,
                                      world_size=cfg.learner.num_ranks, master_addr=addr, master_port=port,
                                      cpu_threads=threads, seed=cfg.seed, dtype=cfg.model.dtype,
                                      temperature=cfg.rollout.temperature, max_len=cfg.rollout.max_tokens,
                                      decay_steps=self.rl_decay_steps))
        base = rollout_group(self.model_path, cfg)
        self.rollout = RolloutPool(base, self.state, prepare=self._load_policy,
                                   max_workers=max(cfg.rollout.max_workers or 0, cfg.rollout.num_workers),
                                   new_worker=lambda pg: rollout_worker_actor(self.model_path, cfg, pg))
        rewards = ActorGroup(RewardWorker, cfg.reward.num_workers, num_cpus=plan["reward"].num_cpus, name="reward",
                             kwargs_fn=lambda r, a, p: reward_kwargs(cfg))
        self.rewards = Pool("reward", rewards, self.state, prepare=self._ready)
        self.judges = None
        if cfg.judge.enabled:
            from actors.agser import JudgeWorker

            judges = ActorGroup(JudgeWorker, cfg.judge.num_workers, name="judge",     # one call at a time
                                kwargs_fn=lambda r, a, p: dict(
                                    model_path=cfg.judge.model_path or self.model_path, dtype=cfg.model.dtype,
                                    max_tokens=cfg.judge.max_tokens, unit=cfg.judge.unit,
                                    max_model_len=cfg.rollout.max_model_len, kv_cache_gib=cfg.rollout.kv_cache_gib))
            policy_judge = not cfg.judge.model_path    # the policy judges itself: weights synced
            self.judges = JudgePool(judges, self.state, cfg.judge, prepare=self._load_policy if policy_judge else self._ready)
        self.evaluator = None
        if cfg.train.async_eval:
            from actors.evaluator import CheckpointEvaluator

            self.evaluator = ActorGroup(CheckpointEvaluator, 1, name="evaluator",
                                        env={"OMP_NUM_THREADS": str(cfg.rollout.cpu_threads or os.cpu_count() or 1)},
                                        kwargs_fn=lambda r, a, p: dict(
                                            model_path=self.model_path, rollout=cfg.rollout, dtype=cfg.model.dtype,
                                            eval_k=cfg.train.eval_k, eval_temperature=cfg.train.eval_temperature,
                                            reward=reward_kwargs(cfg, scoring_only=True)))
            self.ray.get(self.evaluator.actors[0].info.remote())

    # ---------------------------------------------------------------- state
    def _read_state(self) -> RunState:
        path = self.ckpt_dir / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint state at {path}")
        try:
            return RunState.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume: checkpoint state {path} is corrupt ({err})") from None

    def checkpoint(self) -> None:
        """Learner state + HF export + driver state (step, version, counters); see save_checkpoint."""
        tag = f"step{self.state.step}"
        self.state.tag = tag
        with self.timeline.span("learner", "checkpoint"):
            save_checkpoint(self.learner, self.ckpt_dir, tag, self.state.to_dict(), keep=self.cfg.run.keep_checkpoints)
        self.plot()

    def plot(self) -> Path | None:
        """curves.png (reward, accuracy, length) and timeline.png (who did what, when); returns the first."""
        self.timeline.plot(self.run_dir / "timeline.png")
        return self.logger.plot()

    # ---------------------------------------------------------------- weights
    def _ready(self, actor, timeout_s: float = 600.0) -> None:
        """Wait until a fresh actor is up (its engine started), where it can say so; a TimeoutError
        (not a hang) when the cluster has no room for it."""
        if hasattr(actor, "info"):
            try:
                self.ray.get(actor.info.remote(), timeout=timeout_s)
            except self.ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"a replacement worker was not up within {timeout_s:g} s "
                                   f"(cluster has {self.ray.available_resources()})") from None

    def _load_policy(self, actor) -> None:
        """Prepare a fresh rollout worker or policy judge: engine up, current policy version loaded."""
        self._ready(actor)
        handles = self.learner.get(self.learner.call("export_weights"))[0]
        self.ray.get(actor.update_weights.remote(handles, self.state.version))

    def sleep_engines(self) -> dict:
        """Colocated on GPU: the engines release the device (weights to host memory, KV cache
        freed) until push_weights wakes them; sync mode, so nothing is in flight."""
        with self.timeline.span("rollout", "sleep"):
            slept = self.rollout.broadcast("sleep")
        self.asleep = True
        return {"perf/sleep_seconds": max(x["seconds"] for x in slept),
                "perf/sleep_freed_gib": min(x["freed_gib"] for x in slept)}

    def push_weights(self, version: int) -> float:
        """Learner -> every rollout worker (and policy judge), bucketed through the object store.

        A dead worker is refilled (the pools' recovery path) and loaded; a transfer not done
        within train.sync_timeout_s raises TimeoutError instead of hanging. Returns seconds.
        """
        t0 = time.perf_counter()
        with self.timeline.span("learner", "export"):
            handles = self.learner.get(self.learner.call("export_weights", release_cache=self.asleep))[0]
        limit = self.cfg.train.sync_timeout_s
        if self.asleep:            # colocated: the weights' memory back first, the KV cache after the push
            with self.timeline.span("rollout", "wake"):
                self.rollout.broadcast("wake_up", ["weights"])
        with self.timeline.span("rollout", "update"):
            self.rollout.broadcast("update_weights", handles, version, timeout_s=limit - (time.perf_counter() - t0),
                                   mode="partial" if self.cfg.train.partial_rollouts else "finish",
                                   what=f"weight sync (version {version}) to the rollout pool "
                                        f"(train.sync_timeout_s={limit})")
        if self.asleep:
            with self.timeline.span("rollout", "wake"):
                self.rollout.broadcast("wake_up", ["kv_cache"])
            self.asleep = False
        if self.judges and not self.cfg.judge.model_path:    # a busy policy judge takes them later
            self.judges.sync(handles, version, timeout_s=limit,
                             what=f"weight sync (version {version}) to the judge pool (train.sync_timeout_s={limit})")
        self.state.version = version
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- rollouts and rewards
    def launch_rollouts(self, examples: list[dict], seed: int, uids: list[int] | None = None,
                        phase: str = "generate", **sampling):
        """Generation of `examples` on the rollout pool; prompt j samples with seed + j, whichever
        worker gets it. gather_groups() collects it."""
        n = sampling.pop("n", self.cfg.rollout.group_size)
        pending = self.rollout.launch("generate_groups", examples, lambda chunk, idx: ((), dict(
            prompts=[e["prompt"] for e in chunk], n=n, seeds=[seed + j for j in idx], **sampling)))
        pending.uids = uids or list(range(len(examples)))
        self.timeline.begin(id(pending), "rollout", phase)
        return pending

    def gather_groups(self, pending) -> list[Group]:
        """The launched examples as Groups, in launch order (a dead worker's share is redone)."""
        rollouts = self.rollout.gather(pending)
        self.timeline.end(id(pending))
        return [Group(uid, ex, rs) for uid, ex, rs in zip(pending.uids, pending.items, rollouts)]

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill every group's results: rule rewards on the reward pool, plus (all-scenario RL) the
        judge's score of general prompts' answers."""
        flat = [(r.text, g.example["answer"], len(r.completion_ids)) for g in groups for r in g.rollouts]
        with self.timeline.span("reward", "score"):
            results = self.rewards.map_sharded("score", flat, lambda chunk, idx: (
                ([c for c, _, _ in chunk], [a for _, a, _ in chunk], [n for _, _, n in chunk]), {}))
        for g in groups:
            g.results, results = results[:len(g.rollouts)], results[len(g.rollouts):]
        general = [(g.example["prompt"], r.text, res) for g in groups if g.example["answer"] is None
                   for r, res in zip(g.rollouts, g.results)]
        if general:
            self.judge_rewards(general)
        return groups

    def judge_rewards(self, general: list[tuple]) -> None:
        """All-scenario RL: each (question, completion, RewardResult) of a general prompt (no
        verifiable answer) earns judge.reward_weight x its AGSER score, added to its rule rewards
        as the "judge" component (a failed rule score stays failed)."""
        scores = self.judges.scores([(q, text) for q, text, _ in general])
        for (_, _, res), score in zip(general, scores):
            if res.status == "ok":
                res.components["judge"] = score
                res.reward += self.cfg.judge.reward_weight * score

    def step_seed(self, step: int, rnd: int = 0) -> int:
        return (self.cfg.seed * 1_000_003 + step * 7919 + rnd * 104_729) % (2**31 - 1)

    def launch_step(self, step: int):
        """Launch the generation of RL step `step` (its prompts and seeds depend on step only)."""
        P = self.cfg.train.prompts_per_step
        examples = step_prompts(self.train_set, step, P, self.cfg.seed)
        return self.launch_rollouts(examples, self.step_seed(step), [group_uid(step, j) for j in range(P)])

    def gather_step(self, step: int, pending) -> tuple[list[Group], dict]:
        """Collect and score; with dynamic sampling, refill until enough groups have variance."""
        cfg = self.cfg
        groups = self.gather_groups(pending)
        t0 = time.perf_counter()
        self.score(groups)
        score_s, rounds, P = time.perf_counter() - t0, 0, cfg.train.prompts_per_step
        while (cfg.algo.dynamic_sampling and rounds < cfg.train.max_refill_rounds
               and sum(len(set(g.rewards)) > 1 for g in groups) < P):
            rounds += 1
            extra = step_prompts(self.train_set, step * (cfg.train.max_refill_rounds + 1) + rounds, P, cfg.seed + 1)
            more = self.gather_groups(self.launch_rollouts(
                extra, self.step_seed(step, rounds), [group_uid(step, rounds * P + j) for j in range(P)]))
            t0 = time.perf_counter()
            groups += self.score(more)
            score_s += time.perf_counter() - t0
        return groups, {"train/refill_rounds": rounds, "perf/score_seconds": score_s}

    def train_on(self, batch: Batch) -> dict:
        """One update of the learner ranks, the batch split between them by tokens."""
        shards = batch.shard(len(self.learner.actors))
        with self.timeline.span("learner", "learn"):
            return self.learner.get(self.learner.call_each("train_step", [(s.as_dict(),) for s in shards]))[0]

    # ---------------------------------------------------------------- hooks: judge, evaluation
    def judge_hook(self, step: int, groups: list[Group]) -> dict:
        """AGSER on one answer of a share of this step's groups, judged while the next steps run
        (agser/* metrics logged at step s describe an earlier step: agser/of_step; while the judge
        is busy a step's answers are skipped: agser/skipped_steps)."""
        t0 = time.perf_counter()
        k = max(1, math.ceil(self.cfg.judge.share * len(groups)))
        metrics = self.judges.monitor(step, [(g.example["prompt"], g.rollouts[0].text) for g in groups[:k] if g.rollouts])
        return {**metrics, "agser/wait_seconds": time.perf_counter() - t0}    # what the step spent on the judge

    def evaluate(self, examples: list[dict] | None = None) -> dict:
        """Held-out accuracy (pass@1: the mean over train.eval_k samples at train.eval_temperature;
        greedy by default), format rate and mean length."""
        from actors.evaluator import eval_metrics

        examples = examples or self.heldout
        t = self.cfg.train
        groups = self.score(self.gather_groups(self.launch_rollouts(examples, seed=0, n=t.eval_k, phase="evaluate",
                                                                     temperature=t.eval_temperature)))
        return eval_metrics([r for g in groups for r in g.rollouts], [x for g in groups for x in g.results],
                            len(examples))

    def eval_hook(self, step: int) -> dict:
        """Every train.eval_every steps: evaluate here, or (async_eval) hand a checkpoint to the
        evaluator; plus any asynchronous evaluation that has finished."""
        t, metrics = self.cfg.train, {}
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            if not self.evaluator:
                return self.evaluate()
            path = self.run_dir / "eval_checkpoints" / f"step{step}"
            self.learner.get(self.learner.call("save_hf", str(path)))
            self.pending_evals.append(self.evaluator.actors[0].evaluate.remote(
                str(path), step, [e["prompt"] for e in self.heldout], [e["answer"] for e in self.heldout]))
        if self.evaluator:
            metrics.update(self.finished_eval())
        return metrics

    def finished_eval(self, wait: bool = False) -> dict:
        """The oldest pending asynchronous evaluation if it is done (or, with wait, once it is)."""
        if not self.pending_evals:
            return {}
        ready, _ = self.ray.wait(self.pending_evals[:1], timeout=None if wait else 0)
        return self.ray.get(self.pending_evals.pop(0)) if ready else {}

    # ---------------------------------------------------------------- cold start
    def cold_start(self) -> dict:
        """Brief SFT on worked examples of the training prompts (R1 format); checkpointed as step0,
        so a crash in the GRPO phase resumes without repeating it."""
        from tqdm import tqdm

        cfg = self.cfg
        self.learner.get(self.learner.call("set_lr", cfg.learner.sft_lr or cfg.learner.lr))
        last, verifiable = {}, [ex for ex in self.train_set if ex["answer"] is not None]
        n = len(self.learner.actors)
        for s in tqdm(range(cfg.train.sft_steps), desc="cold-start SFT", unit="step"):
            examples = step_prompts(verifiable, s, cfg.train.sft_batch_size, cfg.seed + 7)
            rows, plens = sft_rows(self.tokenizer, [{"prompt": ex["prompt"], "completion": worked_example(ex)}
                                                    for ex in examples])
            last = self.learner.get(self.learner.call_each(
                "sft_step", [({"input_ids": rows[i::n], "prompt_lens": plens[i::n]},) for i in range(n)]))[0]
        self.learner.get(self.learner.call("set_lr", cfg.learner.lr, self.rl_decay_steps))
        self.push_weights(self.state.version + 1)
        self.state.sft_done = True
        self.checkpoint()
        return last

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Cold start (optional), then the GRPO steps: generate -> score -> build batch -> train
        -> push weights. Async mode keeps generation train.max_staleness steps ahead."""
        from tqdm import tqdm

        cfg, st = self.cfg, self.state
        summary = {}
        if cfg.train.sft_steps and not st.sft_done:
            summary["base"] = self.evaluate()
            summary["sft"] = self.cold_start()
        if st.step == 0:
            summary["start"] = self.evaluate()
            self.logger.log(summary["start"], step=0)
        ahead = cfg.train.max_staleness if cfg.train.mode == "async" else 0
        first = range(st.step, min(st.step + max(ahead, 1), cfg.train.steps))
        if st.step and ahead:
            print(f"resumed at step {st.step}: generating steps {list(first)} again (rollouts in flight "
                  "at the checkpoint are not part of it; their prompts are not lost)", flush=True)
        pending = {s: self.launch_step(s) for s in first}
        bar = tqdm(range(st.step, cfg.train.steps), desc=f"GRPO ({cfg.train.mode})", unit="step",
                   initial=st.step, total=cfg.train.steps)
        for step in bar:
            t0, t_wall = time.perf_counter(), time.time()
            metrics = self.rollout.refresh()                       # elastic pool: join / leave between steps
            groups, extra = self.gather_step(step, pending.pop(step))
            gen_s = time.perf_counter() - t0 - extra["perf/score_seconds"]
            if ahead and step + ahead < cfg.train.steps:           # generates while the learner trains
                pending[step + ahead] = self.launch_step(step + ahead)
            batch, batch_metrics = build_batch(groups, version=st.version, max_staleness=cfg.train.max_staleness,
                                               advantage=self.advantage, dynamic_sampling=cfg.algo.dynamic_sampling)
            metrics.update({**extra, **batch_metrics, "train/prompt_digest": prompt_digest(groups)})
            st.stale_dropped += batch_metrics["train/stale_groups"]
            if self.judges:
                metrics.update(self.judge_hook(step, groups))
            if len(batch):
                if self.sleep_between_phases:     # colocated on GPU: the learner's turn; the push wakes them
                    metrics.update(self.sleep_engines())
                metrics.update({k if "/" in k else f"train/{k}": v for k, v in self.train_on(batch).items()})
                metrics["sync/seconds"] = self.push_weights(st.version + 1)
            if not ahead and step + 1 < cfg.train.steps:
                pending[step + 1] = self.launch_step(step + 1)
            st.step = step + 1
            metrics.update(self._rollout_metrics(groups, time.perf_counter() - t0, gen_s))
            metrics.update(self.eval_hook(st.step))
            t_end = time.time()
            metrics.update({"perf/step_started": t_wall, "perf/step_finished": t_end,
                            **self.timeline.close_step(st.step, t_wall, t_end)})
            self.logger.log(metrics, step=st.step)
            bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                            acc=f"{metrics.get('reward/accuracy', float('nan')):.2f}")
            if st.step % cfg.train.checkpoint_every == 0 or st.step == cfg.train.steps:
                self.checkpoint()
        bar.close()
        while self.pending_evals:  # the asynchronous evaluations still running: log them too
            self.logger.log(self.finished_eval(wait=True), step=st.step)
        summary["end"] = self.evaluate()
        self.timeline.flush(st.step)
        self.logger.log({**summary["end"], **(self.judges.collect() if self.judges else {})}, step=st.step)
        summary.update(curves=str(self.plot()), eval_k=cfg.train.eval_k,
                       eval_temperature=cfg.train.eval_temperature, samples=st.samples,
                       stale_dropped=st.stale_dropped)
        return summary

    def advantage(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """The configured advantage estimator on one group's rewards."""
        return group_advantages(rewards, group_size, self.cfg.algo.advantage)

    def _rollout_metrics(self, groups: list[Group], step_s: float, gen_s: float) -> dict:
        from actors.rewards import summarize

        rs = [r for g in groups for r in g.rollouts]
        lengths = [len(r.completion_ids) for r in rs]
        self.state.samples += len(rs)
        return {**summarize([x for g in groups for x in g.results]),
                "rollout/length_mean": sum(lengths) / max(len(lengths), 1),
                "rollout/length_max": max(lengths, default=0), "rollout/samples": len(rs),
                "rollout/length_median": statistics.median(lengths) if lengths else 0,
                "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rs) / max(len(rs), 1),
                "perf/step_seconds": step_s, "perf/generate_seconds": gen_s,
                "perf/samples_per_s": len(rs) / step_s, "perf/tokens_per_s": sum(lengths) / step_s,
                "train/policy_version": self.state.version, "train/samples_total": self.state.samples,
                "fault/restarts": self.state.restarts, "fault/requeued_prompts": self.state.requeued_prompts}

    def close(self) -> None:
        """Finish wandb, stop this run's actors (nothing else)."""
        self.logger.finish()
        for pool in (self.rollout, self.rewards, self.judges):
            if pool:
                pool.kill()
        for group in (self.evaluator, self.learner):
            if group:
                group.kill()


def prompt_digest(groups: list[Group]) -> int:
    """A checksum of the prompts of a step's groups (order-free): two runs trained on the same
    prompts at a step log the same value (the async resume test compares them)."""
    import zlib

    return sum(zlib.crc32(g.example["prompt"].encode()) for g in groups) % (2**31 - 1)


def reward_kwargs(cfg: Config, scoring_only: bool = False) -> dict:
    """RewardWorker's keyword arguments from the reward section (scoring_only: evaluation, no
    length shaping and one verifier process)."""
    r = cfg.reward
    kw = dict(timeout_s=r.timeout_s, weights=r.weights, layout=r.layout, target_language=r.target_language,
              extraction=r.extraction)
    if scoring_only:
        return kw
    return dict(kw, num_procs=r.procs_per_worker, max_len=cfg.rollout.max_tokens if r.overlong_cache_len else None,
                cache_len=r.overlong_cache_len or None)


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
