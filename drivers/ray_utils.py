"""Starting Ray and placing the workers on it."""
from __future__ import annotations

import os

# Worker processes inherit these (vLLM reads them at import time).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
              "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "1"}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    Locally, logical CPUs default to max(4, cores) so a rollout worker and two learner ranks can
    be placed on a 2-core machine (they time-share the cores).
    """
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=512 * 1024**2, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=True)


def rollout_worker_actor(model_path: str, cfg):
    """Start one RolloutWorker as a Ray actor from a Config and wait until its engine is up."""
    import ray
    import torch

    from actors.rollout import RolloutWorker

    gpus = cfg.rollout.tensor_parallel_size if torch.cuda.is_available() else 0
    threads = cfg.rollout.cpu_threads or os.cpu_count() or 1
    # threaded actor: concurrent generate() calls share one continuously batched engine
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_concurrency=16)(RolloutWorker).options(
        runtime_env={"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": str(threads)}})
    worker = actor_cls.remote(model_path, dtype=cfg.model.dtype, **cfg.rollout.model_dump())
    ray.get(worker.info.remote())  # surfaces engine start-up errors here
    return worker
