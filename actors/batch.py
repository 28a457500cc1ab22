"""Typed data of one RL step, from rollout to learner (pure: no Ray, vLLM or DeepSpeed).

    Group   one prompt and its G sampled answers, their rewards, and its id in the run
    Batch   the rows the learner trains on, each with its group id and policy version
    build_batch(groups, ...) -> (Batch, metrics): drops failed / stale / (dynamic sampling)
            flat groups, computes each group's advantages with the configured estimator.

Group ids are unique over a run: uid = step * GROUP_ID_STRIDE + the prompt's position in that
step's prompt list, so a row can always be traced back to the step and prompt it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

GROUP_ID_STRIDE = 1_000_000     # prompts per step stay far below this


def group_uid(step: int, index: int) -> int:
    """The run-wide id of the `index`-th prompt of step `step` (refill rounds continue the index)."""
    return step * GROUP_ID_STRIDE + index


@dataclass
class Group:
    """One prompt (an example: prompt, answer) with its sampled rollouts and their rewards."""

    uid: int
    example: dict
    rollouts: list = field(default_factory=list)   # actors.rollout.Rollout
    results: list = field(default_factory=list)    # actors.rewards.RewardResult, one per rollout

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]


@dataclass
class Batch:
    """Learner rows (one per sampled completion), column by column."""

    input_ids: list[list[int]] = field(default_factory=list)      # prompt + completion token ids
    prompt_lens: list[int] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    behavior_logp: list[list[float]] = field(default_factory=list)  # the engine's logprob per completion token
    group_ids: list[int] = field(default_factory=list)             # Group.uid of each row
    policy_versions: list[int] = field(default_factory=list)       # weights version that sampled each row

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, idx: list[int]) -> "Batch":
        """The rows idx, in that order."""
        return Batch(**{f.name: [getattr(self, f.name)[i] for i in idx] for f in fields(self)})

    def as_dict(self) -> dict:
        """Column name -> list (what the learner's tensor code indexes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def shard(self, n: int) -> list["Batch"]:
        """n shards balanced by tokens: rows in order of decreasing length, dealt round-robin;
        rows of advantage 0 last (the learner does not run them when beta is 0)."""
        order = sorted(range(len(self)), key=lambda i: (bool(self.advantages) and self.advantages[i] == 0,
                                                       -len(self.input_ids[i])))
        return [self.rows(order[r::n]) for r in range(n)]


def build_batch(groups: list[Group], *, version: int, max_staleness: int, advantage,
                dynamic_sampling: bool) -> tuple[Batch, dict]:
    """The learner batch of one step and its metrics.

    A group is dropped when a verifier item failed (status != ok: never a silent zero), when a
    sample's oldest token is more than max_staleness versions behind `version`, or, with dynamic sampling,
    when all its rewards are equal (no signal). `advantage(rewards [B], G) -> [B]` is the
    configured estimator; rows cut by a sync (finish_reason "abort") or empty are not trained on.
    """
    failed = [g for g in groups if any(r.status != "ok" for r in g.results)]
    live = [g for g in groups if all(r.status == "ok" for r in g.results)]
    stale = [g for g in live if any(version - r.policy_version > max_staleness for r in g.rollouts)]
    kept = [g for g in live if all(version - r.policy_version <= max_staleness for r in g.rollouts)]
    batch = Batch()
    flat = 0
    for g in kept:
        adv = advantage(torch.tensor(g.rewards, dtype=torch.float32), len(g.rewards)).tolist()
        if len(set(g.rewards)) <= 1:
            flat += 1
            if dynamic_sampling:
                continue
        for r, a in zip(g.rollouts, adv):
            if r.finish_reason == "abort" or not r.completion_ids:
                continue
            batch.input_ids.append(r.prompt_ids + r.completion_ids)
            batch.prompt_lens.append(len(r.prompt_ids))
            batch.advantages.append(a)
            batch.behavior_logp.append(r.logprobs)
            batch.group_ids.append(g.uid)
            batch.policy_versions.append(r.policy_version)
    staleness = [version - r.policy_version for g in kept for r in g.rollouts]
    token_staleness = [version - v for g in kept for r in g.rollouts for v in r.token_versions]
    spanning = [len(set(r.token_versions)) > 1 for g in kept for r in g.rollouts]
    metrics = {"train/failed_groups": len(failed), "train/stale_groups": len(stale),
               "train/zero_variance_groups": flat, "train/rows": len(batch),
               "train/groups": len({*batch.group_ids}),
               "async/staleness_mean": sum(staleness) / max(len(staleness), 1),
               "async/staleness_max": max(staleness, default=0),
               "async/token_staleness_mean": sum(token_staleness) / max(len(token_staleness), 1),
               "async/partial_frac": sum(spanning) / max(len(spanning), 1)}
    return batch, metrics

