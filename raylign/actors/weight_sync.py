"""Weights over Ray: a sync as checksummed buckets in Ray's object store, readable by a replica on any node.

The file transport (trainer rank 0 writes one safetensors file, each replica reads it by path) needs the
replica to see the trainer's filesystem. This one needs only Ray: rank 0 gathers the parameters one bucket
at a time (``trainer.sync_bucket_mb`` of gathered fp32, so the sender never holds the whole model twice),
casts each to the generators' dtype (model.dtype) and puts it into the object store, with a CRC32 of its names and
bytes. A replica asks Ray to pull every bucket to its node at once, then takes them one by one (so bucket k+1
travels while bucket k is checked and loaded), checks each CRC before using a byte of it (``WeightSyncError``
otherwise, which the pool counts as a fault and answers by replacing the replica) and streams the tensors into its
engine. The CRC runs over 16 MB chunks on a thread per core (zlib releases the GIL): one thread needed 0.37 s for
SmolLM2's 256 MB on each side of a sync.

Why the object store and not Ray Direct Transport: RDT moves tensors returned by an actor method declared
with ``tensor_transport``, between actors of one collective group. The sender here is a Ray Train worker,
whose actor class is Ray Train's own, so it cannot declare such a method; a relay actor would add one more
copy of every bucket. The buckets stay owned by rank 0's process: while the driver holds a sync's
``WeightBuckets``, a replacement replica can be restored from them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
import torch


class WeightSyncError(RuntimeError):
    """A bucket failed its checksum or did not arrive in time: the replica's weights are not the trainer's."""


@dataclass(frozen=True)
class Bucket:
    ref: ray.ObjectRef  # dict[str, torch.Tensor] in model.dtype, in the object store
    names: tuple[str, ...]
    crc32: int
    nbytes: int


@dataclass(frozen=True)
class WeightBuckets:
    """One sync: full weights (HF names, no tied lm_head) or, with LoRA, the adapter tensors plus the
    adapter_config.json content the receiver writes beside them."""

    kind: str  # "full" | "adapter"
    buckets: tuple[Bucket, ...]
    sender_node: str
    adapter_config: dict | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", sum(b.nbytes for b in self.buckets))


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose sizes sum to at most ``bucket_bytes``; a tensor bigger than that is a
    bucket of its own. Order is kept (the receiver's engine loads in the order it reads)."""
    buckets: list[list[str]] = []
    size = 0
    for name, nbytes in sizes:
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    return buckets


CHUNK_BYTES = 16 << 20  # of a tensor's bytes per CRC32 task


def checksum(tensors: dict[str, torch.Tensor]) -> int:
    """CRC32 over each tensor's name, dtype and shape, and the CRC32s of its bytes in CHUNK_BYTES chunks, in dict
    order. The chunks are hashed on a thread per core."""
    header, chunks = [], []
    for name, t in tensors.items():
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        header.append(f"{name}|{t.dtype}|{tuple(t.shape)}|{len(data)}")
        chunks += [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [data]
    if len(chunks) > 1:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            crcs = list(pool.map(zlib.crc32, chunks))
    else:
        crcs = [zlib.crc32(c) for c in chunks]
    return zlib.crc32(f"{'/'.join(header)}#{','.join(map(str, crcs))}".encode())


def put_bucket(tensors: dict[str, torch.Tensor]) -> Bucket:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return Bucket(ray.put(tensors), tuple(tensors), checksum(tensors),
                  sum(t.numel() * t.element_size() for t in tensors.values()))


def read_buckets(sync: WeightBuckets, timeout_s: float, corrupt: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The sync's tensors, one bucket in memory at a time, each bucket checked before it is yielded.
    ``corrupt``: a test hook flipping one byte of the first bucket as a broken transfer would."""
    # Start pulling every bucket to this node now (a no-op for objects already here); the gets below then wait
    # only for what has not arrived yet.
    ray.wait([b.ref for b in sync.buckets], num_returns=len(sync.buckets), timeout=0, fetch_local=True)
    for i, bucket in enumerate(sync.buckets):
        try:
            tensors = ray.get(bucket.ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise WeightSyncError(f"weight bucket {i + 1}/{len(sync.buckets)} from node {sync.sender_node[:12]} "
                                  f"did not arrive within {timeout_s:.0f} s") from e
        if corrupt and i == 0:
            first = next(iter(tensors.values())).clone()
            first.reshape(-1).view(torch.uint8)[0] ^= 0xFF
            tensors = {**tensors, next(iter(tensors)): first}
        if tuple(tensors) != bucket.names or checksum(tensors) != bucket.crc32:
            raise WeightSyncError(f"weight bucket {i + 1}/{len(sync.buckets)} ({len(bucket.names)} tensors, first "
                                  f"{bucket.names[0]}) failed its checksum: the replica's weights are not the trainer's")
        yield from tensors.items()
        del tensors


def send_weights(wrapped, lora, model_path: str, rank: int, bucket_bytes: int,
                 dtype: torch.dtype = torch.bfloat16) -> WeightBuckets | None:
    """Rank 0's sync as buckets in the object store (None on other ranks), in the generators' ``dtype``.
    Collective: every rank gathers each bucket's parameters together. ``wrapped``: the policy's Trainable;
    ``lora``: trainer.lora."""
    from raylign.actors.lora import adapter_state, is_adapter, peft_config_dict
    from raylign.actors.value_head import VALUE_HEAD

    node = ray.get_runtime_context().get_node_id()
    if lora.enabled:
        tensors = adapter_state(wrapped.gather_params(is_adapter))
        if rank != 0:
            return None
        bucket = put_bucket({k: v.to(dtype) for k, v in tensors.items()})
        return WeightBuckets("adapter", (bucket,), node, peft_config_dict(lora, model_path))
    tied = bool(getattr(wrapped.inner.config, "tie_word_embeddings", False))
    sizes = [(name, 4 * getattr(p, "ds_numel", p.numel())) for name, p in wrapped.inner.named_parameters()
             if VALUE_HEAD not in name.split(".") and not (tied and name == "lm_head.weight")]
    out = []
    for names in plan_buckets(sizes, bucket_bytes):
        chosen = set(names)
        part = wrapped.gather_params(chosen.__contains__)
        if rank == 0:  # pop: each fp32 tensor is freed as its cast copy is made, so the two never both peak
            out.append(put_bucket({k: part.pop(k).to(dtype) for k in names}))
        del part
    return WeightBuckets("full", tuple(out), node) if rank == 0 else None
