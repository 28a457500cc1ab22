"""Placement arithmetic: how many CPUs/GPUs each actor group asks Ray for (pure, tested)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupPlan:
    """One actor group: `count` actors of `num_cpus` / `num_gpus` each, and CPU threads each."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_placement(*, rollout_workers: int, tensor_parallel: int, learner_ranks: int,
                   reward_workers: int, gpus_per_node: int, cores: int, colocate: bool = False) -> dict:
    """Resources per group.

    GPU (gpus_per_node > 0): a rollout worker takes `tensor_parallel` GPUs, a learner rank one.
    colocate=True shares GPUs between rollout workers and learner ranks (each takes half a GPU
    per device it uses); the total is then max(rollout GPUs, learner GPUs) instead of their sum.
    CPU: rollout engines get all cores as threads, learner ranks split the cores; Ray logical
    CPUs are 1 per rollout worker / rank. Reward workers need no GPU and half a logical CPU.
    """
    if min(rollout_workers, tensor_parallel, learner_ranks, reward_workers) < 1:
        raise ValueError("every group needs at least one actor and tensor_parallel >= 1")
    if gpus_per_node and tensor_parallel > gpus_per_node:
        raise ValueError(f"tensor_parallel ({tensor_parallel}) exceeds gpus_per_node ({gpus_per_node})")
    share = 0.5 if (colocate and gpus_per_node) else 1.0
    rollout_gpus = tensor_parallel * share if gpus_per_node else 0.0
    learner_gpus = share if gpus_per_node else 0.0
    plan = {
        "rollout": GroupPlan(rollout_workers, 1, rollout_gpus, max(1, cores)),
        "learner": GroupPlan(learner_ranks, 1, learner_gpus, max(1, cores // learner_ranks)),
        "reward": GroupPlan(reward_workers, 0.5, 0.0, 1),
    }
    if gpus_per_node:
        need_r = rollout_workers * tensor_parallel
        total = max(need_r, learner_ranks) if colocate else need_r + learner_ranks
        plan["total_gpus"] = total
        plan["gpu_nodes"] = -(-total // gpus_per_node)
    else:
        plan["total_gpus"] = 0
        plan["gpu_nodes"] = 0
    return plan
