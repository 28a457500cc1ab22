"""GPU only: the NCCL weight broadcast from a learner process into vLLM engines.

NCCL needs a distinct device per rank, so this runs on machines with >= 2 GPUs: the sender on
GPU 0, one rollout engine on GPU 1. Skipped on CPU machines (see conftest).
"""
import pytest
import torch


@pytest.mark.gpu
def test_nccl_broadcast_updates_the_engine(ray_session, tiny_model_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (one per NCCL rank)")
    import ray
    from transformers import AutoModelForCausalLM

    from actors.weight_sync import NcclTransport, export_state
    from drivers.config import build_config
    from drivers.ray_utils import _node_ip_and_free_port, rollout_worker_actor

    worker = rollout_worker_actor(tiny_model_path, build_config({}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    host, port = _node_ip_and_free_port()
    joined = worker.init_nccl.remote(host, port, 1, 2)
    sender = NcclTransport(host, port, world_size=2, device=0)
    assert ray.get(joined)
    metas = NcclTransport.bucket_metas(export_state(model))
    done = worker.update_weights.remote(metas, 1, transport="nccl")
    sender.publish(export_state(model))
    assert ray.get(done)["version"] == 1
    expect = float(sum(p.double().sum() for p in model.parameters()))
    assert ray.get(worker.checksum.remote()) == pytest.approx(expect, rel=1e-6)
