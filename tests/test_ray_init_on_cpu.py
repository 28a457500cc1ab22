"""Which Ray a command runs on: its own local Ray unless RAY_ADDRESS says otherwise.

A stopped `ray start` head leaves `<ray temp>/ray_current_cluster` behind; `ray.init()` without
an address would try to join it. Each test gives its subprocess a Ray temp dir of its own
(RAY_TMPDIR), so the stale file it writes touches no other Ray on the machine.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from drivers.ray_utils import RayAddressError, check_ray_address

ROOT = Path(__file__).resolve().parents[1]
R1RAY = str(Path(sys.executable).parent / "r1ray")


def _dead_address() -> str:
    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmpdir():
    path = Path(tempfile.mkdtemp(prefix="r1t", dir="/tmp"))  # short: Ray's unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmpdir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    return {**env, "RAY_TMPDIR": str(ray_tmpdir), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _sample_cmd(model: str, out: Path) -> list[str]:
    return [R1RAY, "sample", "configs/tiny.yaml", f"model.path={model}", f"run.output_dir={out}",
            "rollout.group_size=2", "rollout.max_tokens=8"]


def test_a_stale_cluster_file_does_not_stop_a_local_run(tiny_model_path, ray_tmpdir, tmp_path):
    stale = ray_tmpdir / "ray" / "ray_current_cluster"   # what a killed `ray start --head` leaves
    stale.parent.mkdir(parents=True)
    stale.write_text(_dead_address())
    proc = subprocess.run(_sample_cmd(tiny_model_path, tmp_path / "run"), cwd=ROOT, env=_env(ray_tmpdir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"samples": 4' in proc.stdout      # 2 demo prompts x group 2, from a Ray of its own


def test_ray_address_pointing_nowhere_fails_fast_naming_it(tiny_model_path, ray_tmpdir, tmp_path):
    address = _dead_address()
    t0 = time.perf_counter()
    proc = subprocess.run(_sample_cmd(tiny_model_path, tmp_path / "run"), cwd=ROOT,
                          env=_env(ray_tmpdir, RAY_ADDRESS=address), capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 3, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert f"RAY_ADDRESS={address!r}: no Ray cluster answers" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 60, seconds   # the check itself takes < 1 s here


def test_check_ray_address_forms():
    for bad, msg in [("http://127.0.0.1:8265", "dashboard"), ("no-port-here", "not host:port"),
                     ("ray://127.0.0.1", "not host:port"), ("127.0.0.1:99999", "not host:port")]:
        with pytest.raises(RayAddressError, match=msg):
            check_ray_address(bad)
    with pytest.raises(RayAddressError, match="no Ray cluster answers"):
        check_ray_address("ray://" + _dead_address())
    with socket.socket() as s:                # something listening: accepted
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}")
