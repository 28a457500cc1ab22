"""vLLM worker extension (`worker_extension_cls`): in-place weight reload, called by collective_rpc.

Mixed into vLLM's worker class by vLLM itself; no monkey-patching. Methods are prefixed
`r1ray_` so they never shadow the worker's own.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def refresh_cpu_tied_heads(model: torch.nn.Module) -> None:
    """CPU only: a tied lm_head keeps a oneDNN-packed copy of the embedding made at load time,
    which an in-place reload never re-packs (logits go stale). Re-pack it. No-op on GPU."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)


class WeightSyncExtension:
    """Methods run inside each vLLM worker (self is the worker)."""

    def r1ray_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Layerwise in-place reload from (HF name, tensor) pairs (re-packs CPU kernels)."""
        count = 0

        def counted():
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=counted())
        refresh_cpu_tied_heads(self.model_runner.get_model())
        return count

    def r1ray_checksum(self) -> float:
        """Sum of all parameters (float64): a cheap fingerprint of the loaded weights."""
        return float(sum(p.detach().double().sum() for p in self.model_runner.get_model().parameters()))

    # ---- GPU: NCCL broadcast from the learner (rank 0) -------------------------------------
    def r1ray_init_nccl(self, host: str, port: int, rank: int, world_size: int) -> bool:
        """Join the learner's StatelessProcessGroup as `rank` (GPU only)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._r1ray_comm = PyNcclCommunicator(group, device=self.device)
        return True

    def r1ray_reload_nccl(self, metas: list[dict]) -> int:
        """Receive each bucket by broadcast from rank 0 and reload it (GPU only)."""
        from actors.weight_sync import BucketMeta, unpack_bucket

        def received():
            for m in metas:
                meta = BucketMeta(**m) if isinstance(m, dict) else m
                flat = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.device)
                self._r1ray_comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
                torch.cuda.current_stream().synchronize()
                yield from unpack_bucket(meta, flat)

        return self.r1ray_reload(received())
