"""Starting Ray and placing the workers on it."""
from __future__ import annotations

import os
import time

# Worker processes inherit these (vLLM reads them at import time).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR",
              "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "1"}


class RayAddressError(ConnectionError):
    """RAY_ADDRESS names no reachable Ray cluster."""


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    Without RAY_ADDRESS the run always starts its own local Ray (`address="local"`): a cluster
    file left by a stopped `ray start` head (/tmp/ray/ray_current_cluster) or another head on the
    machine is never joined by accident. With RAY_ADDRESS the address is checked first, so a
    cluster that is not there fails in seconds with its address in the message.

    Locally, the object store holds 2 GiB (/dev/shm, touched only when used): a 135M-parameter
    model's fp32 weight sync (538 MB) fits without spilling. Logical CPUs default to
    max(8, cores) so the whole actor set of a run (rollout worker, reward worker, learner ranks,
    judge, asynchronous evaluator) can be placed on a 2-core machine (they time-share the cores).
    """
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        check_ray_address(address)
        ray.init(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=2 * 1024**3, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=True)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError naming `address` unless something listens there (TCP, `timeout_s`).

    Takes what RAY_ADDRESS may hold: `host:port` (a GCS, as under `ray job submit`),
    `ray://host:port` (Ray client) or `auto` (the running cluster Ray finds on this machine).
    """
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        # Ray's own lookup of "auto" (a private helper; checked against the pinned ray 2.60)
        from ray._private.services import get_ray_address_from_environment

        try:
            found = get_ray_address_from_environment("auto", None)
        except ConnectionError as e:
            raise RayAddressError(f"RAY_ADDRESS=auto: no running Ray cluster found on this machine ({e})") from e
        return check_ray_address(found, timeout_s) if found and found != "auto" else None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("http", "https"):
        raise RayAddressError(f"RAY_ADDRESS={address!r} is a dashboard (job API) URL; a driver joins the "
                              "cluster's GCS (host:6379) or a Ray client (ray://host:10001)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise RayAddressError(f"RAY_ADDRESS={address!r} is not host:port ({e})") from e
    if not host or not port:
        raise RayAddressError(f"RAY_ADDRESS={address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise RayAddressError(
            f"RAY_ADDRESS={address!r}: no Ray cluster answers at {host}:{port} ({e}). Start the head "
            "(or fix the address) to join a cluster; unset RAY_ADDRESS to run on a local Ray.") from e


def rollout_resources(cfg) -> dict:
    """A rollout worker's Ray options from a Config: 1 logical CPU, tensor_parallel_size GPUs on
    GPU machines (half each when rollout.colocate), its engine's OpenMP threads (drivers.placement.cpu_threads), and a threaded
    actor (concurrent generate() calls share one continuously batched engine)."""
    from drivers.placement import config_plan, cpu_threads

    cores = os.cpu_count() or 1
    gpus = config_plan(cfg, cores, visible_gpus())["rollout"].num_gpus
    threads = cpu_threads(cfg, cores)["rollout"]
    return dict(num_cpus=1, num_gpus=gpus, max_concurrency=16, env={"OMP_NUM_THREADS": str(threads)})


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _rollout_kwargs(model_path: str, cfg) -> dict:
    return dict(model_path=model_path, rollout=cfg.rollout, dtype=cfg.model.dtype)


def rollout_worker_actor(model_path: str, cfg, placement_group=None):
    """One RolloutWorker actor from a Config (in bundle 0 of `placement_group` if given); with
    no placement group, waits until its engine is up (surfacing start-up errors here)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.rollout import RolloutWorker

    res = rollout_resources(cfg)
    options = dict(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_concurrency=res["max_concurrency"],
                   runtime_env={"env_vars": {**WORKER_ENV, **res["env"]}})
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=0)
    worker = ray.remote(RolloutWorker).options(**options).remote(**_rollout_kwargs(model_path, cfg))
    if placement_group is None:
        ray.get(worker.info.remote())
    return worker


def rollout_group(model_path: str, cfg) -> "ActorGroup":
    """cfg.rollout.num_workers RolloutWorkers in one placement group (SPREAD over nodes), engines up.

    Each bundle is {"CPU": 1, "GPU": tensor_parallel_size} on GPU machines, so an autoscaling
    cluster sees the whole rollout demand at once and adds GPU nodes for it.
    """
    import ray

    from actors.rollout import RolloutWorker

    group = ActorGroup(RolloutWorker, cfg.rollout.num_workers, strategy="SPREAD", name="rollout",
                       kwargs_fn=lambda r, a, p: _rollout_kwargs(model_path, cfg), **rollout_resources(cfg))
    ray.get([w.info.remote() for w in group.actors])  # surfaces engine start-up errors here
    return group


def _node_ip_and_free_port() -> tuple[str, int]:
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class ActorGroup:
    """N actors of one class, placed in one placement group, called all together.

        group = ActorGroup(Learner, 2, kwargs_fn=lambda rank, addr, port: {...})
        metrics = group.get(group.call("train_step", batch))          # same args to all
        metrics = group.get(group.call_each("train_step", shards))    # one arg list each

    kwargs_fn(rank, master_addr, master_port) gives each actor's constructor kwargs; the
    address and a free port are read on the node of bundle 0 (rank 0), so multi-node works.
    The wait for resources shows a message, so an autoscaling cluster has time to add nodes.
    """

    def __init__(self, cls, n: int, *, kwargs_fn, num_cpus: float = 1, num_gpus: float = 0,
                 strategy: str = "PACK", env: dict | None = None, max_concurrency: int = 1,
                 ready_timeout_s: float = 600.0, name: str = ""):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = name or cls.__name__
        self.bundle = bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        wait_for_placement(self.pg, f"{n} x {bundle} for {self.name}", ready_timeout_s)
        on = [PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i) for i in range(n)]
        addr, port = ray.get(ray.remote(num_cpus=0)(_node_ip_and_free_port)
                             .options(scheduling_strategy=on[0]).remote())
        remote_cls = ray.remote(cls)
        self._options = [dict(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=on[i],
                              max_concurrency=max_concurrency,
                              runtime_env={"env_vars": {**WORKER_ENV, **(env or {})}}) for i in range(n)]
        self._kwargs = [kwargs_fn(i, addr, port) for i in range(n)]
        self._remote_cls = remote_cls
        self.actors = [remote_cls.options(**self._options[i]).remote(**self._kwargs[i]) for i in range(n)]
        self.restarts = 0

    def restart(self, i: int):
        """Replace actor i (dead or alive) by a fresh one in the same bundle; returns the new handle.

        For stateless workers and rollout workers (the caller re-syncs weights); not for ranks
        of a collective group, whose peers would wait for the old rank.
        """
        import ray

        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._remote_cls.options(**self._options[i]).remote(**self._kwargs[i])
        self.restarts += 1
        return self.actors[i]

    def call(self, method: str, *args, **kwargs) -> list:
        """Call `method` with the same arguments on every actor; returns ObjectRefs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_actor_args: list[tuple], **kwargs) -> list:
        """Call `method` on actor i with per_actor_args[i]; returns ObjectRefs."""
        if len(per_actor_args) != len(self.actors):
            raise ValueError(f"{len(per_actor_args)} argument sets for {len(self.actors)} actors")
        return [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.actors, per_actor_args)]

    @staticmethod
    def get(refs: list, timeout: float | None = None) -> list:
        """ray.get of the refs that call() or call_each() returned (optional timeout in seconds)."""
        import ray

        return ray.get(refs, timeout=timeout)

    def kill(self) -> None:
        """Kill this group's actors and remove its placement group (nothing else)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def wait_for_placement(pg, what: str, timeout_s: float) -> None:
    """Wait for a placement group, printing progress while the cluster (auto)scales."""
    import ray

    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        step = 2.0 if elapsed < 1 else 10.0   # the first progress line soon, then every 10 s
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(step, timeout_s - elapsed)))
        if ready:
            return
        waited = time.perf_counter() - t0
        if waited >= timeout_s:
            raise TimeoutError(f"resources for {what} not available after {waited:.0f} s; "
                               f"cluster has {ray.cluster_resources()}")
        print(f"waiting for {what} ({waited:.0f} s; cluster has {ray.available_resources()})", flush=True)
