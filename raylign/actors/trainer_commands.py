"""The trainer workers' protocol: commands (driver -> every rank) and replies (each rank -> driver), small and
picklable. ``TrainerGroup`` sends them over Ray queues; ``TrainerWorker`` serves them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

READY = -1  # command id of the "model built" reply every rank sends once


# ---- commands (driver -> worker) and replies (worker -> driver); small and picklable -------------------
# A batch travels as an ObjectRef held inside the command: Ray resolves only top-level arguments of
# Queue.put, so the ref reaches the worker unresolved and each rank fetches it from the object store.

@dataclass
class Logprobs:
    batch_ref: Any
    which: str = "policy"  # or "ref"


@dataclass
class Values:
    batch_ref: Any


@dataclass
class TrainStep:
    batch_ref: Any
    loss_name: str
    loss_kwargs: dict = field(default_factory=dict)
    minibatches: int = 1


@dataclass
class SaveWeights:
    path: str  # a safetensors file; with LoRA a peft adapter folder (adapter-only sync)


@dataclass
class SendWeights:
    bucket_bytes: int  # gathered fp32 bytes per bucket (weight_sync.send_weights)


@dataclass
class SaveCheckpoint:
    dir: str


@dataclass
class LoadCheckpoint:
    dir: str
    sha256: dict[str, str] | None = None  # files rank 0 hashes on its local copy before loading (name: hex digest)


@dataclass
class ExportHF:
    dir: str


@dataclass
class Stop:
    pass


@dataclass
class Reply:
    cmd_id: int
    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = 0.0  # time the handler ran on this rank
