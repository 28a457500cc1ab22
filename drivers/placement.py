"""Placement arithmetic: how many CPUs/GPUs each actor group asks Ray for (pure, tested); and the
machine's native precision (`native_dtype`, for `model.dtype: auto`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GroupPlan:
    """One actor group: `count` actors of `num_cpus` / `num_gpus` each, and CPU threads each."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_placement(*, rollout_workers: int, tensor_parallel: int, learner_ranks: int,
                   reward_workers: int, gpus_per_node: int, cores: int, colocate: bool = False,
                   mode: str = "sync", rollout_share: float = 0.5) -> dict:
    """Resources per group.

    GPU (gpus_per_node > 0): a rollout worker takes `tensor_parallel` GPUs, a learner rank one.
    colocate=True shares GPUs between rollout workers and learner ranks (each takes half a GPU
    per device it uses); the total is then max(rollout GPUs, learner GPUs) instead of their sum.
    CPU threads: in sync mode generation and learning take turns, so each phase gets every core
    (the engines split them, as do the ranks); in async mode they run at the same time on
    separate cores: the engines get `rollout_share` of them (at least one, and one is left for the
    learner), the ranks the rest. Ray logical CPUs are 1 per rollout worker / rank. Reward workers
    need no GPU and half a logical CPU.
    """
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    if not 0 < rollout_share < 1:
        raise ValueError(f"rollout_share must be in (0, 1), got {rollout_share}")
    if min(rollout_workers, tensor_parallel, learner_ranks, reward_workers) < 1:
        raise ValueError("every group needs at least one actor and tensor_parallel >= 1")
    if gpus_per_node and tensor_parallel > gpus_per_node:
        raise ValueError(f"tensor_parallel ({tensor_parallel}) exceeds gpus_per_node ({gpus_per_node})")
    share = 0.5 if (colocate and gpus_per_node) else 1.0
    rollout_gpus = tensor_parallel * share if gpus_per_node else 0.0
    learner_gpus = share if gpus_per_node else 0.0
    cores = max(1, cores)
    rollout_cores = learner_cores = cores
    if mode == "async" and cores > 1:
        rollout_cores = min(cores - 1, max(1, int(cores * rollout_share + 0.5)))
        learner_cores = cores - rollout_cores
    plan = {
        "rollout": GroupPlan(rollout_workers, 1, rollout_gpus, max(1, rollout_cores // rollout_workers)),
        "learner": GroupPlan(learner_ranks, 1, learner_gpus, max(1, learner_cores // learner_ranks)),
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


def config_plan(cfg, cores: int, gpus_per_node: int = 0) -> dict:
    """plan_placement for a Config: its group sizes, mode, async split and colocation."""
    return plan_placement(rollout_workers=cfg.rollout.num_workers, tensor_parallel=cfg.rollout.tensor_parallel_size,
                          learner_ranks=cfg.learner.num_ranks, reward_workers=cfg.reward.num_workers,
                          gpus_per_node=gpus_per_node, cores=cores, colocate=cfg.rollout.colocate,
                          mode=cfg.train.mode, rollout_share=cfg.train.async_rollout_share)


def cpu_threads(cfg, cores: int) -> dict[str, int]:
    """CPU threads of each rollout engine and learner rank for a Config: plan_placement's split
    for its mode, unless rollout.cpu_threads / learner.cpu_threads set them by hand (in async mode
    the learner then gets the cores the engines leave). Counts the driver node's cores."""
    plan = config_plan(cfg, cores)
    rollout = cfg.rollout.cpu_threads or plan["rollout"].threads
    learner = plan["learner"].threads
    if cfg.train.mode == "async" and cfg.rollout.cpu_threads:
        learner = max(1, (cores - rollout * cfg.rollout.num_workers) // cfg.learner.num_ranks)
    return {"rollout": rollout, "learner": cfg.learner.cpu_threads or learner}


def native_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'bfloat16' where the hardware computes it natively, else 'float32' (`model.dtype: auto`).

    Native: a CUDA GPU of compute capability 8 or more, or a CPU whose flags list avx512_bf16 or
    amx_bf16 (there oneDNN runs bf16 matrix multiplies in hardware; elsewhere it emulates them,
    slower than fp32). Decided on the machine that calls it: the driver's, when a config is built.
    """
    import torch

    if torch.cuda.is_available():   # compute capability 8 (Ampere) on; older GPUs emulate bf16 and vLLM refuses it
        return "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float32"
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "float32"
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
