"""`ray job submit` against a real local head, and autoscaling with Ray's fake multi-node provider.

The head is started from the project's venv with `ray start --head` (tests/local_head.py), its
PIDs recorded and only those stopped.
"""
import json
import time

import pytest

from local_head import ROOT, LocalRayHead


def test_ray_job_submit_runs_r1ray_train_to_success(tmp_path):
    out = tmp_path / "run"
    # as the README submits it: the repository as working dir, the config by relative path
    entry = ["r1ray", "train", "configs/tiny.yaml", f"run.output_dir={out}",
             "train.steps=2", "train.sft_steps=5", "train.prompts_per_step=4", "task.heldout=8",
             "train.eval_every=0", "train.checkpoint_every=2", "rollout.max_tokens=24"]
    with LocalRayHead(num_cpus=4) as head:
        job_id, cli = head.submit(entry, timeout_s=600, working_dir=str(ROOT))
        assert cli.returncode == 0, (cli.stdout[-3000:], cli.stderr[-3000:])
        status, logs = head.job(job_id)
        assert cli.returncode == 0 and status == "SUCCEEDED", (status, cli.stdout[-3000:], cli.stderr[-3000:])
        pids = set(head.pids)
    assert not [p for p in pids if _alive(p)], "processes of the test head outlived it"
    # the job joined this head (not a new local Ray) and ran the whole loop
    assert "Connecting to existing Ray cluster" in logs
    assert "start of RL" in logs and "end of RL" in logs and "accuracy" in logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["train/step"] for r in rows) == 2
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    # versions: 1 after the cold-start SFT, +1 per RL step; 2 steps x 4 prompts x G=8 samples
    assert state["step"] == 2 and state["version"] == 3 and state["samples"] == 64
    assert max(r.get("train/policy_version", 0) for r in rows) == 3
    assert (out / "curves.png").stat().st_size > 0


def test_the_jobs_api_refuses_a_submission_without_the_token(tmp_path):
    """Token authentication (RAY_AUTH_MODE=token) on a real head: the jobs API runs arbitrary code
    (ShadowRay, CVE-2023-48022), so a stranger's `ray job submit` (no token, or a wrong one) and a
    bare POST to /api/jobs/ are refused and run nothing; with the token the job runs and its own
    ray.init() joins the cluster."""
    import secrets
    import urllib.error
    import urllib.request

    token = secrets.token_hex(32)
    marker = tmp_path / "job_ran"
    entry = ["python", "-c", "import ray; ray.init(); print('CPUs', ray.cluster_resources()['CPU']); "
             f"open({str(marker)!r}, 'w').write('ran')"]
    home = tmp_path / "home"      # a client without ~/.ray/auth_token
    home.mkdir()
    with LocalRayHead(num_cpus=1, auth_token=token) as head:
        stranger = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
        _, cli = head.submit(entry, timeout_s=120, env=stranger)
        out = cli.stdout + cli.stderr
        assert cli.returncode != 0 and "Unauthorized: Missing authentication token" in out, out[-2000:]
        wrong = stranger | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        _, cli = head.submit(entry, timeout_s=120, env=wrong)
        out = cli.stdout + cli.stderr
        assert cli.returncode != 0 and "Invalid authentication token" in out, out[-2000:]
        # the REST call an attacker would make, without the CLI
        request = urllib.request.Request(f"{head.address}/api/jobs/", method="POST",
                                         data=json.dumps({"entrypoint": "touch /tmp/pwned"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
        assert not marker.exists()

        owner_home = tmp_path / "owner"       # the token where `ray get-auth-token --generate` puts it
        (owner_home / ".ray").mkdir(parents=True)
        (owner_home / ".ray" / "auth_token").write_text(token)
        owner = stranger | {"RAY_AUTH_MODE": "token", "HOME": str(owner_home)}
        job_id, cli = head.submit(entry, timeout_s=300, env=owner)
        assert cli.returncode == 0, (cli.stdout[-3000:], cli.stderr[-3000:])
        status, logs = head.job(job_id)
        assert status == "SUCCEEDED" and "CPUs 1.0" in logs, (status, logs[-2000:])
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(head.address, headers=head.headers).list_jobs()
        assert [j.submission_id for j in jobs] == [job_id]     # the refused ones never existed
        pids = set(head.pids)
    assert marker.read_text() == "ran"
    assert not [p for p in pids if _alive(p)], "processes of the test head outlived it"


FAKE_CLUSTER = {
    "cluster_name": "r1ray-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        # stands in for cluster.yaml's GPU node types: a node with GPUs the driver's groups need
        "gpu_node": {"resources": {"CPU": 2, "GPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "auth": {"ssh_user": "ubuntu"},
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}

# The job places a 2-rank group with one GPU per bundle through the driver's ActorGroup (the same
# placement-group path the learner and rollout groups use); the head has no GPU.
GPU_JOB = """
import json, time, ray
from drivers.ray_utils import ActorGroup, init_ray
class Probe:
    def __init__(self, rank):
        self.rank = rank
    def where(self):
        return {"rank": self.rank, "node": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids()}
init_ray()
head = ray.get_runtime_context().get_node_id()
t0 = time.perf_counter()
group = ActorGroup(Probe, 2, num_gpus=1, kwargs_fn=lambda r, a, p: {"rank": r}, name="gpu-probe")
seconds = time.perf_counter() - t0
print("PLACED " + json.dumps({"head": head, "seconds": seconds, "where": group.get(group.call("where"))}), flush=True)
group.kill()
"""


def test_autoscaler_adds_a_gpu_node_for_a_job_and_removes_it_when_idle():
    with LocalRayHead(num_cpus=2, autoscaling=FAKE_CLUSTER) as head:
        assert len(head.nodes()) == 1
        job_id, cli = head.submit(["python", "-c", GPU_JOB], timeout_s=300)
        assert cli.returncode == 0, (cli.stdout[-3000:], cli.stderr[-3000:], head.start_log()[-2000:])
        status, logs = head.job(job_id)
        assert cli.returncode == 0 and status == "SUCCEEDED", (status, logs[-3000:], head.start_log()[-2000:])
        placed = json.loads(next(line[len("PLACED "):] for line in logs.splitlines()
                                 if line.startswith("PLACED {")))
        nodes = {w["node"] for w in placed["where"]}
        assert len(nodes) == 1 and placed["head"] not in nodes  # both ranks on the added GPU node
        assert sorted(g for w in placed["where"] for g in w["gpus"]) == [0, 1]
        if placed["seconds"] > 3.0:  # the first progress line comes after 2 s (a fast node may beat it)
            assert "waiting for 2 x {'CPU': 1, 'GPU': 1} for gpu-probe" in logs, placed
        # idle_timeout_minutes=0.1: the GPU node goes away again
        deadline = time.time() + 120
        while len(head.nodes()) > 1 and time.time() < deadline:
            time.sleep(2)
        assert len(head.nodes()) == 1, head.nodes()
        assert head.nodes()[0]["node_id"] == placed["head"]
        pids = set(head.pids)
    assert not [p for p in pids if _alive(p)], "processes of the test head outlived it"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_placement_wait_prints_progress_and_times_out_with_the_cluster_state(ray_session, capsys):
    from ray.util.placement_group import placement_group, remove_placement_group

    from drivers.ray_utils import wait_for_placement

    ray = ray_session
    pg = placement_group([{"CPU": 1, "GPU": 1}])   # no GPU on this machine: never placed
    try:
        with pytest.raises(TimeoutError, match=r"resources for probe not available after 3 s; cluster has"):
            wait_for_placement(pg, "probe", timeout_s=3.0)
    finally:
        remove_placement_group(pg)
    assert "waiting for probe (2 s; cluster has" in capsys.readouterr().out
    assert ray.is_initialized()

