"""The elastic rollout pool on a real multi-node Ray cluster (run as a script by
tests/test_pools_on_cpu.py, which needs a Ray of its own: the test session's is local).

A head with room for 1 rollout worker starts training (rollout.num_workers 1, max_workers 2);
a node is added: the pool starts a worker there, loads it with the current policy version and
gives it work; that node is removed while it holds half of a step's prompts: the pool drops
it and the other worker answers those prompts. Prints one JSON line (RESULT {...}).

    python tests/elastic_scenario.py MODEL_DIR OUT_DIR
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ports() -> dict:
    # every port free: the test session's own Ray on this machine holds the defaults
    return {name: _free_port() for name in (
        "node_manager_port", "object_manager_port", "dashboard_agent_listen_port", "metrics_agent_port",
        "metrics_export_port", "runtime_env_agent_port", "ray_client_server_port")}


def main(model_path: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # Cluster writes its address to /tmp/ray/ray_current_cluster (machine-wide): put back what was there
    address_file = "/tmp/ray/ray_current_cluster"
    saved = open(address_file).read() if os.path.exists(address_file) else None
    try:
        _scenario(model_path, out, ray, Cluster)
    finally:
        if saved is None:
            if os.path.exists(address_file):
                os.remove(address_file)
        else:
            with open(address_file, "w") as f:
                f.write(saved)


def _scenario(model_path: str, out: str, ray, Cluster) -> None:
    from drivers.config import build_config
    from drivers.train import Run

    # head: learner (1 CPU) + reward worker (0.5) + one rollout worker (1): no room for a second
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=3, gcs_server_port=_free_port(), include_dashboard=False, object_store_memory=512 * 1024**2,
        **_ports()))
    os.environ["RAY_ADDRESS"] = cluster.address
    cfg = build_config({
        "task": {"a_max": 20, "b_max": 3, "heldout": 8},
        "rollout": {"num_workers": 1, "max_workers": 2, "group_size": 4, "max_tokens": 24, "max_model_len": 256},
        "learner": {"lr": 1e-3},
        "train": {"prompts_per_step": 4, "steps": 2, "checkpoint_every": 1000, "eval_every": 0},
        "model": {"path": model_path},
        "run": {"name": "elastic", "output_dir": out, "wandb_mode": "disabled"},
    })
    events: dict = {}

    class NodeLoss(Run):
        """Removes the added node right after step `remove_at`'s prompts were sent to both workers."""

        remove_at = -1

        def gather_step(self, step, pending):
            if step == self.remove_at:
                events["workers_holding_prompts"] = len({id(s.actor) for s in pending.shares})
                cluster.remove_node(events.pop("node"))
            return super().gather_step(step, pending)

    run = NodeLoss(cfg)
    loads = []                   # (the run's policy version, the version the newcomer then holds)
    prepare = run.rollout.prepare

    def recording_prepare(actor):
        prepare(actor)
        loads.append((run.state.version, ray.get(actor.info.remote())["policy_version"]))
    run.rollout.prepare = recording_prepare
    try:
        run.train()                                            # steps 1-2 on the head's one worker
        events["node"] = cluster.add_node(num_cpus=1, object_store_memory=256 * 1024**2, **_ports())
        t0 = time.time()
        while len(run.rollout.slots) < 2 and time.time() - t0 < 300:
            run.cfg.train.steps = run.state.step + 1            # one step at a time until it joins
            run.train()
        events["join_seconds"] = round(time.time() - t0, 1)
        newcomer = run.rollout.slots[-1]
        events["version_when_joined"], events["newcomer_version"] = loads[-1]
        events["newcomer_node_is_new"] = newcomer.node_id != run.rollout.slots[0].node_id
        run.cfg.train.steps = run.state.step + 2                # two steps on both workers
        run.train()
        run.remove_at = run.state.step                          # the node goes mid-step,
        # with the newcomer kept busy so that its share of that step is still being generated
        newcomer.actor.generate.remote(["What is 1 + 1?"], n=64, max_tokens=150, ignore_eos=True)
        run.cfg.train.steps = run.state.step + 2
        run.train()
        events["workers_at_end"] = len(run.rollout.slots)
        events["requeued_prompts"] = run.state.requeued_prompts
        events["restarts"] = run.state.restarts
        rows = [r for r in run.logger.history() if "train/loss" in r]
        events["steps"] = [{k: r.get(k) for k in ("train/step", "pool/rollout_workers", "rollout/samples",
                                                  "train/groups", "async/staleness_max", "train/rows")}
                           for r in rows]
        events["removed_at"] = run.remove_at
    finally:
        run.close()
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(events), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
