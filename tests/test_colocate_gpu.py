"""GPU only: colocated sync mode (rollout.colocate): the vLLM engine and the learner rank share
one GPU and take turns; vLLM sleeps (level 1) while the learner trains and wakes for the push.
Skipped on CPU machines (see conftest)."""
import pytest
import torch

SMALL = {
    "task": {"a_max": 20, "b_max": 3, "heldout": 8},
    "rollout": {"group_size": 4, "max_tokens": 24, "max_model_len": 256, "colocate": True,
                "gpu_memory_utilization": 0.3},
    "learner": {"lr": 1e-3, "sft_lr": 1e-3},
    "reward": {"weights": {"accuracy": 1.0, "format": 0.5}},
    "train": {"prompts_per_step": 4, "sft_steps": 2, "sft_batch_size": 8, "steps": 3, "checkpoint_every": 100},
}


@pytest.mark.gpu
def test_colocated_engine_sleeps_while_the_learner_trains_and_wakes_with_its_weights(ray_session, tiny_model_path,
                                                                                      tmp_path):
    from drivers.config import build_config
    from drivers.train import Run

    cfg = build_config({**SMALL, "run": {"name": "colo", "output_dir": str(tmp_path / "colo"), "wandb_mode": "disabled"},
                        "model": {"path": tiny_model_path}})
    run = Run(cfg)
    try:
        run.train()
        rows = [r for r in run.logger.history() if "reward/mean" in r]
        engine = run.rollout.actors[0]
        learner_sum = float(sum(t.double().sum() for t in run.learner.get(run.learner.call("get_state_dict"))[0].values()))
        engine_sum = ray_session.get(engine.checksum.remote())
    finally:
        run.close()
    # on a 1-GPU machine the two halves can only be placed together (Ray: 0.5 GPU each)
    assert len(rows) == 3 and torch.cuda.device_count() >= 1
    assert all(r["perf/sleep_freed_gib"] > 0.05 for r in rows)      # the KV cache (and weights) left the GPU
    assert engine_sum == pytest.approx(learner_sum, rel=1e-5)       # woken, then loaded with the learner's weights
