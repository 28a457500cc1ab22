"""Weight sync from the learner to the rollout engines: buckets and transports.

The learner exports `(name, tensor)` pairs in HF checkpoint names; `pack_buckets` packs them
into a few flat byte buffers (one transfer per bucket, never one per parameter). A transport
moves the buckets; the rollout worker turns them back into `(name, tensor)` views and hands
them to vLLM's in-place reload (`actors/vllm_ext.py`).

Transports (one small interface: the sender `publish`es, the receiver `iter_weights`):
- `ObjectStoreTransport` (CPU, any node): buckets go through Ray's shared-memory object store;
  receivers on the same node read them zero-copy.
- `NcclTransport` (GPU, marked gpu in tests): the learner's rank 0 broadcasts each bucket over
  a vLLM `StatelessProcessGroup` + `PyNcclCommunicator` that includes every rollout engine.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024**2


@dataclass
class BucketMeta:
    """Where each tensor lives inside one flat byte buffer."""

    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    offsets: list[int]          # byte offset of each tensor
    nbytes: int                 # total bytes of the bucket


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into lists of at most bucket_bytes (a larger tensor goes alone)."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > bucket_bytes:
            yield batch
            batch, size = [], 0
        batch.append((name, tensor))
        size += nbytes
    if batch:
        yield batch


def bucket_meta(items: list[tuple[str, torch.Tensor]]) -> BucketMeta:
    """The layout of one bucket: byte offsets of its tensors packed back to back."""
    offsets, pos = [], 0
    for _, t in items:
        offsets.append(pos)
        pos += t.numel() * t.element_size()
    return BucketMeta([n for n, _ in items], [list(t.shape) for _, t in items],
                      [str(t.dtype).removeprefix("torch.") for _, t in items], offsets, pos)


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[tuple[BucketMeta, torch.Tensor]]:
    """(meta, flat uint8 CPU buffer) per bucket of plan_buckets."""
    for items in plan_buckets(named, bucket_bytes):
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).cpu() for _, t in items])
        yield bucket_meta(items), flat


def unpack_bucket(meta: BucketMeta, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (uint8, meta.nbytes long) with the original names, shapes and dtypes."""
    if flat.numel() != meta.nbytes:
        raise ValueError(f"bucket holds {flat.numel()} bytes, its metadata says {meta.nbytes}")
    out = []
    for name, shape, dtype, offset in zip(meta.names, meta.shapes, meta.dtypes, meta.offsets):
        dt = getattr(torch, dtype)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dt).element_size()
        out.append((name, flat[offset:offset + nbytes].view(dt).view(list(shape))))
    return out


def export_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named parameters of a model, minus a tied lm_head (vLLM reloads it from the embedding)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor


class ObjectStoreTransport:
    """CPU transport: each bucket is one Ray object (shared memory on the receiver's node)."""

    @staticmethod
    def publish(named: Iterable[tuple[str, torch.Tensor]],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[tuple[BucketMeta, object]]:
        """Put each bucket in the object store; returns [(meta, ObjectRef)] to send to workers."""
        import ray

        return [(meta, ray.put(flat.numpy())) for meta, flat in pack_buckets(named, bucket_bytes)]

    @staticmethod
    def iter_weights(handles: list[tuple[BucketMeta, object]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Fetch the buckets one at a time (zero-copy, read-only) and yield (name, tensor) views."""
        import ray

        for meta, ref in handles:
            array = ray.get(ref)
            with warnings.catch_warnings():  # read-only shared memory; vLLM copies into its params
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.from_numpy(array)
            yield from unpack_bucket(meta, flat)


class NcclTransport:
    """GPU transport: rank 0 (the learner) broadcasts buckets to ranks 1..N (the vLLM workers).

    The group is a vLLM StatelessProcessGroup, so it never touches the learner's own
    torch.distributed world. Construct it on the learner (rank 0) while each engine joins with
    RolloutWorker.init_nccl; then `publish` here while the engines run update_weights(transport="nccl").
    """

    def __init__(self, host: str, port: int, world_size: int, device: int | str = 0):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=torch.device("cuda", int(device))
                                       if not isinstance(device, torch.device) else device)

    def publish(self, named: Iterable[tuple[str, torch.Tensor]],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketMeta]:
        """Broadcast every bucket (receivers must be inside r1ray_reload_nccl with the same metas)."""
        metas = []
        for items in plan_buckets(named, bucket_bytes):
            flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in items])
            self.comm.broadcast(flat.cuda(), src=0, stream=torch.cuda.current_stream())
            metas.append(bucket_meta(items))
        torch.cuda.synchronize()
        return metas

    @staticmethod
    def bucket_metas(named: Iterable[tuple[str, torch.Tensor]],
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketMeta]:
        """The metas the receivers need, from shapes alone (sent ahead of the data)."""
        return [bucket_meta(items) for items in plan_buckets(named, bucket_bytes)]
