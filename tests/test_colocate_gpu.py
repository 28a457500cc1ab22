"""GPU only: colocated sync mode (rollout.colocate): the vLLM engine and the learner rank share
one GPU and take turns; vLLM sleeps (level 1) while the learner trains and wakes for the push.
Skipped on CPU machines (see conftest)."""
import pytest

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

    def _device(actor) -> dict:   # defined here: Ray ships it by value (tests/ is not on the workers' path)
        """Inside an actor: the GPU ids Ray gave it and the UUID of the device torch uses."""
        import ray
        import torch

        return {"ray_gpus": [str(g) for g in ray.get_gpu_ids()], "uuid": str(torch.cuda.get_device_properties(0).uuid)}

    cfg = build_config({**SMALL, "run": {"name": "colo", "output_dir": str(tmp_path / "colo"), "wandb_mode": "disabled"},
                        "model": {"path": tiny_model_path}})
    run = Run(cfg)
    try:
        run.train()
        rows = [r for r in run.logger.history() if "reward/mean" in r]
        engine = run.rollout.actors[0]
        learner_sum = float(sum(t.double().sum() for t in run.learner.get(run.learner.call("get_state_dict"))[0].values()))
        engine_sum = ray_session.get(engine.checksum.remote())
        where = [ray_session.get(a.__ray_call__.remote(_device)) for a in (engine, run.learner.actors[0])]
    finally:
        run.close()
    assert where[0]["ray_gpus"] == where[1]["ray_gpus"] and len(where[0]["ray_gpus"]) == 1, where   # one GPU, shared
    assert where[0]["uuid"] == where[1]["uuid"], where                 # the same physical device
    assert len(rows) == 3
    assert all(r["perf/sleep_freed_gib"] > 0.05 for r in rows)      # the KV cache (and weights) left the GPU
    assert engine_sum == pytest.approx(learner_sum, rel=1e-5)       # woken, then loaded with the learner's weights
