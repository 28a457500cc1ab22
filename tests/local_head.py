"""A real local Ray head for tests: `ray start --head --block` from the project's venv.

It listens on free ports with its own temp dir, so it never touches another Ray on the machine.
With `auth_token`, the head runs Ray's token authentication (RAY_AUTH_MODE=token, the token in
RAY_AUTH_TOKEN) and this helper's own calls send it; without, authentication is off.
Every process it spawns (GCS, raylet, dashboard, workers, fake autoscaled nodes) is recorded by
PID while it runs, and only those PIDs are stopped at the end (nothing machine-wide).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalRayHead:
    """Context manager; `address` is the dashboard URL that `ray job submit --address` takes.

    autoscaling: a fake_multinode autoscaler config (dict) -> RAY_FAKE_CLUSTER=1 head whose
    autoscaler starts and stops extra raylets on this machine (Ray's "fake multi-node").
    """

    def __init__(self, num_cpus: int = 4, autoscaling: dict | None = None, start_timeout_s: float = 120,
                 auth_token: str | None = None):
        self.num_cpus, self.autoscaling, self.start_timeout_s = num_cpus, autoscaling, start_timeout_s
        self.tmp = Path(tempfile.mkdtemp(prefix="r1h", dir="/tmp"))  # short: unix socket paths
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.pids: set[int] = set()
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        for k in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(k, None)
        self.headers = {}
        if auth_token:
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
            self.headers = {"Authorization": f"Bearer {auth_token}"}
        self._stop = threading.Event()

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "LocalRayHead":
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
               f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={512 * 1024**2}", f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        # every other port free too: another Ray on this machine (the test session's own) holds the defaults
        cmd += [f"--{name}={_free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
        if self.autoscaling is not None:
            ip = _node_ip()
            config = json.loads(json.dumps(self.autoscaling))
            config["provider"]["gcs_address"] = f"{ip}:{self.gcs_port}"
            path = self.tmp / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.log = open(self.tmp / "ray_start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        self.pids.add(self.proc.pid)
        self._watcher = threading.Thread(target=self._record_pids, daemon=True)
        self._watcher.start()
        try:
            self._wait_until_up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_up(self) -> None:
        from ray.job_submission import JobSubmissionClient

        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.start_log()[-2000:]}")
            try:
                JobSubmissionClient(self.address, headers=self.headers).list_jobs()
                if self.nodes():
                    return
                time.sleep(0.5)
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() - t0 > self.start_timeout_s:
                    raise TimeoutError(f"Ray head not up after {self.start_timeout_s} s: "
                                       f"{self.start_log()[-2000:]}") from None
                time.sleep(1)

    def _record_pids(self) -> None:
        while not self._stop.is_set():
            self._snapshot()
            self._stop.wait(0.5)

    def _snapshot(self) -> None:
        try:
            self.pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def __exit__(self, *exc) -> None:
        """SIGTERM `ray start --block` (it stops what it started), then every recorded PID left."""
        self._snapshot()
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.alive_pids()]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while self.alive_pids() and time.time() < deadline:
                time.sleep(0.2)
        self.log.close()

    def alive_pids(self) -> list[int]:
        """Recorded PIDs still running (zombies do not count)."""
        alive = []
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    # ------------------------------------------------------------------ use
    def start_log(self) -> str:
        return (self.tmp / "ray_start.log").read_text(errors="replace")

    def submit(self, entrypoint: list[str], timeout_s: float, working_dir: str | None = None,
               env: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
        """`ray job submit` (blocking, tails the logs); returns (job id, the CLI's result).
        env: the CLI's environment (default: the head's, with its token if any).

        The head's job agent registers a little after the dashboard answers; until then the
        submit is refused ("No available agent"), so that refusal is retried for up to a minute.
        """
        deadline = time.time() + 60
        while True:
            job_id = f"r1ray_test_{int(time.time() * 1000)}"
            cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--submission-id", job_id,
                   *(["--working-dir", working_dir] if working_dir else []), "--", *entrypoint]
            result = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
            if "No available agent" not in result.stderr + result.stdout or time.time() > deadline:
                return job_id, result
            time.sleep(2)

    def job(self, job_id: str) -> tuple[str, str]:
        """(status, logs) of a submitted job."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address, headers=self.headers)
        return str(client.get_job_status(job_id).value), client.get_job_logs(job_id)

    def nodes(self) -> list[dict]:
        """Alive nodes as the dashboard's state API lists them."""
        import urllib.request

        request = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=100", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            data = json.load(r)
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()
