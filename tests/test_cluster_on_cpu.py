"""cluster.yaml: valid for Ray's own autoscaler schema, and consistent with the project."""
import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _prepared(config: dict) -> dict:
    # Ray's offline validation (private API, so only here in a test).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_autoscaler_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = _prepared(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    assert prepared["idle_timeout_minutes"] > 0


def test_cluster_yaml_installs_like_the_readme_and_starts_ray_from_the_venv():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any("scripts/setup.sh" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert config[key] and all(".venv/bin/ray start" in c for c in config[key]), key


def test_cluster_yaml_keeps_the_jobs_api_closed_to_strangers():
    """The dashboard (and its jobs API, which runs arbitrary code) listens on the head's localhost
    only, and every node runs Ray's token authentication with the token file copied to it."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token " in c for c in config[key] if "ray start" in c), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_a_broken_cluster_yaml_is_rejected():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(config)
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_8x"]["min_workers"] = 100
    with pytest.raises(ValueError, match="max_workers"):
        _prepared(config)


def test_the_placement_plan_of_a_full_node_fits_a_gpu_node_type():
    from drivers.placement import plan_placement

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    node = config["available_node_types"]["gpu_8x"]["resources"]
    plan = plan_placement(rollout_workers=2, tensor_parallel=2, learner_ranks=4, reward_workers=2,
                          gpus_per_node=node["GPU"], cores=node["CPU"])
    assert plan["gpu_nodes"] == 1 and plan["total_gpus"] <= node["GPU"]


def test_kuberay_rayjob_manifest_runs_the_tiny_recipe_with_autoscaling_gpu_workers():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("r1ray train configs/tiny.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    # the config the job names exists and validates
    from drivers.config import load_config

    load_config(ROOT / job["spec"]["entrypoint"].split()[2])
