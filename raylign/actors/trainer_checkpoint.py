"""What the trainer workers write and read: synced weights, HF exports and the trainer's checkpoint part.

Every function is collective (all ranks call it; gathers and broadcasts run over the process group) and
only rank 0 touches the files. Checkpoints and exports go to a storage location (``raylign.storage``): rank 0
writes them on its own disk and uploads them when the location is remote (s3://, gs://), and fetches a local
copy to load one, so a multi-node group needs no shared filesystem.
- ``save_weights``: one safetensors file in model.dtype (what the generators run), HF names, without a tied lm_head (the generators re-tie it),
  written to a temp file in the same folder and ``os.replace``d, so a reader never sees half a file.
- ``export_hf``: a plain HF folder (config, ``model.safetensors`` in model.dtype as save_pretrained writes it, i.e.
  without a tied lm_head, tokenizer and generation files copied from the source model).
- trainer checkpoint, safetensors for tensors and JSON for the rest, so loading one runs no code (the .pt
  files of earlier versions could run anything on ``--resume``):
  ``trainer_model.safetensors`` fp32 master weights (bf16 would break exact resume);
  ``trainer_optimizer.safetensors`` the optimizer state keyed ``state.<param name>.<key>`` (exp_avg,
  exp_avg_sq, the fp32 scalar ``step``) plus ``trainer_optimizer.json`` (param_groups, which tensor is which);
  ``trainer_state.json`` format version, step count, LR scheduler state and every rank's torch/python/numpy
  RNG state. Full (not sharded) state loads into a fresh group of any size; RNG states are per rank and
  need the same size. A separate PPO critic adds ``trainer_critic.safetensors``,
  ``trainer_critic_optimizer.{safetensors,json}`` and a ``critic_scheduler`` entry; a value head on the
  policy is part of the policy's state. Loading checks every file's header on rank 0 before any collective.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from raylign import storage
from raylign.actors.lora import adapter_state, is_adapter, merged_hf_state, peft_config_dict, write_adapter
from raylign.actors.trainable import Trainable
from raylign.actors.value_head import drop_value_head
from raylign.config import LoraConfig


class TrainerState(Protocol):
    """What checkpointing reads and restores of a trainer worker (``TrainerWorker`` has these); a Protocol,
    so this module does not import the worker that imports it."""

    policy: Trainable  # holds its optimizer and scheduler
    critic: Trainable | None
    steps: int
    rank: int
    world: int

FORMAT_VERSION = 1  # of trainer_state.json and the optimizer JSON; bump when their layout changes


@dataclass(frozen=True)
class PartFiles:
    """The files of one trained model: fp32 weights, optimizer tensors, optimizer JSON."""
    model: str
    optimizer: str
    optimizer_meta: str


POLICY_FILES = PartFiles("trainer_model.safetensors", "trainer_optimizer.safetensors", "trainer_optimizer.json")
CRITIC_FILES = PartFiles("trainer_critic.safetensors", "trainer_critic_optimizer.safetensors",
                         "trainer_critic_optimizer.json")  # PPO with a separate critic only
MODEL_FILE = POLICY_FILES.model
STATE_FILE = "trainer_state.json"
# Source-model files an HF export must not copy: weights (rewritten) and raylign's build marker.
_NOT_EXPORTED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "raylign_model.json")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _atomic_json(obj: dict, path: Path) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


def hf_state(wrapped: Trainable, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The policy as plain HF weights (adapters merged, no value head) on rank 0 ({} elsewhere). Collective."""
    state = drop_value_head(wrapped.gather_state())
    return merged_hf_state(state, lora.alpha, lora.r) if lora.enabled and state else state


def save_weights(wrapped: Trainable, path: str, rank: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Full-weight sync (a LoRA policy syncs with save_adapter) in the generators' ``dtype`` (model.dtype: an fp32
    generator gets fp32, or it would sample from a rounded policy); returns the bytes written on rank 0."""
    state = hf_state(wrapped, LoraConfig())
    if rank != 0:
        return 0
    if getattr(wrapped.inner.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding again; both generator backends re-tie it
    cast = {k: v.to(dtype) for k, v in state.items()}
    atomic_save(cast, Path(path))
    return sum(t.numel() * t.element_size() for t in cast.values())


def save_adapter(wrapped: Trainable, lora: LoraConfig, model_path: str, out_dir: str, rank: int,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Adapter-only sync: gathers and writes only the LoRA tensors (in ``dtype``), as a peft adapter folder."""
    tensors = adapter_state(wrapped.gather_params(is_adapter))
    if rank != 0:
        return 0
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    return write_adapter(Path(out_dir), tensors, peft_config_dict(lora, model_path), atomic_save)


def export_hf(wrapped: Trainable, model_path: str, out_dir: str, rank: int, lora: LoraConfig | None = None,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """The policy as a plain HF folder at ``out_dir`` (a storage location: rank 0 writes it on its node and
    uploads it when remote)."""
    state = hf_state(wrapped, lora or LoraConfig())
    if rank == 0:
        with storage.staged(out_dir) as local:
            write_hf_folder(state, model_path, Path(local), getattr(wrapped.inner.config, "tie_word_embeddings", False),
                            dtype)


def write_hf_folder(state: dict[str, torch.Tensor], model_path: str, out: Path, tied: bool,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """A plain HF folder: the source model's config (its dtype set to ``dtype``), tokenizer and generation files,
    and the given HF-named weights as ``model.safetensors`` in ``dtype`` (without a tied lm_head, as
    save_pretrained writes)."""
    src = Path(model_path)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not any(item.match(p) for p in _NOT_EXPORTED):
            shutil.copy2(item, out / item.name)
    config = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    atomic_save({k: v.to(dtype) for k, v in state.items()}, out / "model.safetensors")


# --- pure conversions: live state <-> (tensors for safetensors, JSON-able dict) ---------------------------

def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict as (tensors, JSON); ``optimizer_from_files`` inverts it exactly."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for param, param_state in state["state"].items():
        entries[param] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.detach().contiguous()
                entries[param][key] = {"tensor": f"state.{param}.{key}"}
            else:  # e.g. SGD's momentum_buffer=None; json.dumps refuses anything that is not plain data
                entries[param][key] = {"value": value}
    return tensors, {"format_version": FORMAT_VERSION, "state": entries, "param_groups": state["param_groups"]}


def optimizer_tensor_names(meta: dict) -> set[str]:
    """The safetensors keys the optimizer JSON refers to."""
    return {ref["tensor"] for entry in meta["state"].values() for ref in entry.values() if "tensor" in ref}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict ``optimizer_to_files`` took apart."""
    state = {param: {key: tensors[ref["tensor"]] if "tensor" in ref else ref["value"] for key, ref in entry.items()}
             for param, entry in meta["state"].items()}
    # JSON has no tuples; torch's sequence hyper-parameters (AdamW's betas) are tuples.
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_json(rng: dict) -> dict:
    """torch/python/numpy RNG states (as ``rng_state`` returns them) as plain JSON data."""
    version, internal, gauss_next = rng["python"]
    algorithm, keys, pos, has_gauss, cached_gaussian = rng["numpy"]
    return {"torch": rng["torch"].tolist(),
            "python": [version, list(internal), gauss_next],
            "numpy": {"algorithm": algorithm, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                      "cached_gaussian": cached_gaussian}}


def rng_from_json(data: dict) -> dict:
    """The RNG states ``rng_to_json`` wrote, in the types ``set_rng_state`` takes."""
    version, internal, gauss_next = data["python"]
    np_state = data["numpy"]
    return {"torch": torch.tensor(data["torch"], dtype=torch.uint8),
            "python": (version, tuple(internal), gauss_next),
            "numpy": (np_state["algorithm"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"],
                      np_state["has_gauss"], np_state["cached_gaussian"])}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# --- save ----------------------------------------------------------------------------------------------

def _separate_critic(worker: TrainerState) -> bool:
    return worker.critic is not None and worker.critic is not worker.policy


def write_part(out: Path, files: PartFiles, model_state: dict, optim_state: dict) -> None:
    """One model's fp32 weights and full optimizer state as its three files (rank 0 only, no collectives)."""
    tensors, meta = optimizer_to_files(optim_state)
    atomic_save(model_state, out / files.model)
    atomic_save(tensors, out / files.optimizer)
    _atomic_json(meta, out / files.optimizer_meta)


def save_trainer_checkpoint(worker: TrainerState, out_dir: str) -> dict[str, dict] | None:
    """Write the trainer's files into ``out_dir`` (a storage location: staged on rank 0's node and uploaded when
    remote); rank 0 returns {name: {bytes, sha256}} of what it wrote, for the manifest (None elsewhere)."""
    policy = worker.policy.gather_state(), worker.policy.gather_optimizer()
    separate = _separate_critic(worker)
    if separate:
        critic = worker.critic.gather_state(), worker.critic.gather_optimizer()
    rngs = [None] * worker.world if worker.rank == 0 else None
    dist.gather_object(rng_to_json(rng_state()), rngs, dst=0)
    if worker.rank != 0:
        return None
    with storage.staged(out_dir) as local:
        out = Path(local)
        write_part(out, POLICY_FILES, *policy)
        state = {"format_version": FORMAT_VERSION, "steps": worker.steps,
                 "scheduler": worker.policy.scheduler.state_dict(), "rng": rngs}
        if separate:
            write_part(out, CRITIC_FILES, *critic)
            state["critic_scheduler"] = worker.critic.scheduler.state_dict()
        _atomic_json(state, out / STATE_FILE)  # last, so a folder with it has the other files
        names = [*_part_names(POLICY_FILES), *(_part_names(CRITIC_FILES) if separate else []), STATE_FILE]
        return {name: {"bytes": (out / name).stat().st_size, "sha256": storage.sha256(str(out / name))}
                for name in names}


def _part_names(files: PartFiles) -> list[str]:
    return [files.model, files.optimizer, files.optimizer_meta]


# --- load ----------------------------------------------------------------------------------------------

def _read_json(path: Path, layout_ok: Callable[[dict], bool]) -> dict:
    """A trainer JSON file of this format version and layout, or a ValueError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"trainer checkpoint file {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"trainer checkpoint file {path} is not readable JSON: {e}") from None
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != FORMAT_VERSION:
        raise ValueError(f"trainer checkpoint file {path} has format version {found!r}; "
                         f"this raylign reads {FORMAT_VERSION}")
    if not layout_ok(data):
        raise ValueError(f"trainer checkpoint file {path} does not have the layout this raylign writes")
    return data


def _state_layout_ok(state: dict) -> bool:
    return isinstance(state.get("steps"), int) and isinstance(state.get("scheduler"), dict) \
        and isinstance(state.get("rng"), list) and isinstance(state.get("critic_scheduler", {}), dict)


def _optimizer_layout_ok(meta: dict) -> bool:
    # Checked before the collectives: a KeyError on rank 0 inside a broadcast would leave the others waiting.
    state, groups = meta.get("state"), meta.get("param_groups")
    if not (isinstance(state, dict) and all(isinstance(entry, dict) for entry in state.values())):
        return False
    refs = [ref for entry in state.values() for ref in entry.values()]
    return all(isinstance(ref, dict) and ("tensor" in ref or "value" in ref) for ref in refs) \
        and isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)


def _tensor_names(path: Path) -> set[str]:
    """The keys in a safetensors file, reading only its header (which safetensors checks against the size)."""
    if not path.is_file():
        raise ValueError(f"trainer checkpoint file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (OSError, SafetensorError) as e:
        raise ValueError(f"trainer checkpoint file {path} is not a readable safetensors file: {e}") from None


def _check_part(src: Path, files: PartFiles) -> dict:
    """The optimizer JSON of one part once its three files are known to be readable and consistent."""
    _tensor_names(src / files.model)
    meta = _read_json(src / files.optimizer_meta, _optimizer_layout_ok)
    missing = optimizer_tensor_names(meta) - _tensor_names(src / files.optimizer)
    if missing:
        raise ValueError(f"trainer checkpoint file {src / files.optimizer} lacks {len(missing)} tensor(s) that "
                         f"{files.optimizer_meta} lists, e.g. {sorted(missing)[0]}")
    return meta


def check_trainer_checkpoint(src: Path) -> tuple[dict, dict[str, dict]]:
    """(trainer state, optimizer JSON per part file name) or a ValueError naming the bad file."""
    if not (src / STATE_FILE).exists() and (src / "trainer_state.pt").exists():
        raise ValueError(f"trainer checkpoint {src} holds .pt files of an older raylign, which this one does "
                         f"not load (loading them can run code)")
    state = _read_json(src / STATE_FILE, _state_layout_ok)
    metas = {POLICY_FILES.model: _check_part(src, POLICY_FILES)}
    if "critic_scheduler" in state:
        metas[CRITIC_FILES.model] = _check_part(src, CRITIC_FILES)
    return state, metas


def _load_part(rank: int, wrapped: Trainable, src: Path, files: PartFiles, meta: dict | None) -> None:
    wrapped.scatter_state(load_file(src / files.model) if rank == 0 else {})
    optim_state = optimizer_from_files(load_file(src / files.optimizer), meta) if rank == 0 else {}
    wrapped.scatter_optimizer(optim_state)


def _check_hashes(src: Path, shown: str, sha256: dict[str, str]) -> None:
    for name, digest in sorted(sha256.items()):
        if not (src / name).is_file():
            raise ValueError(f"trainer checkpoint {shown}: {name} is missing")
        if storage.sha256(str(src / name)) != digest:
            raise ValueError(f"checkpoint {shown}: {name} does not match its sha256 in the manifest "
                             f"(altered or corrupted)")


def _checked_on_rank0(src: Path, shown: str, sha256: dict[str, str]) -> tuple[dict | str, dict]:
    """(trainer state or the one-line reason it cannot be loaded, optimizer JSON per part); messages name the
    checkpoint as ``shown`` (its storage location), not the local copy."""
    try:
        _check_hashes(src, shown, sha256)
        return check_trainer_checkpoint(src)
    except ValueError as e:
        return str(e).replace(str(src), shown), {}
    except Exception as e:  # anything else would leave the other ranks waiting in the broadcast
        return f"trainer checkpoint {shown} cannot be read: {type(e).__name__}: {e}", {}


def load_trainer_checkpoint(worker: TrainerState, in_dir: str, sha256: dict[str, str] | None = None) -> None:
    """Load the trainer's files from ``in_dir`` (a storage location; rank 0 fetches a local copy when remote and
    checks the files named in ``sha256`` against their digests there before reading any)."""
    with ExitStack() as stack:
        # Rank 0 fetches, reads and checks every file's header; the others learn the outcome first, so a
        # missing or broken file fails every rank before anyone enters the broadcasts below.
        payload: list = [None]
        metas: dict = {}
        src = Path(in_dir)
        if worker.rank == 0:
            try:
                src = Path(stack.enter_context(storage.fetched(in_dir)))
            except Exception as e:
                payload = [f"trainer checkpoint {in_dir} cannot be fetched: {type(e).__name__}: {e}"]
            else:
                state, metas = _checked_on_rank0(src, in_dir, sha256 or {})
                payload = [state]
        dist.broadcast_object_list(payload, src=0)
        _load_checked(worker, src, in_dir, payload[0], metas)


def _load_checked(worker: TrainerState, src: Path, in_dir: str, state: dict | str, metas: dict) -> None:
    if isinstance(state, str):
        raise ValueError(state)
    if len(state["rng"]) != worker.world:
        raise ValueError(f"trainer checkpoint {in_dir} holds RNG states of {len(state['rng'])} workers, "
                         f"this group has {worker.world}")
    if ("critic_scheduler" in state) != _separate_critic(worker):
        raise ValueError(f"trainer checkpoint {in_dir} {'has' if 'critic_scheduler' in state else 'lacks'} a "
                         f"separate critic and this group {'does not' if 'critic_scheduler' in state else 'does'}")
    _load_part(worker.rank, worker.policy, src, POLICY_FILES, metas.get(POLICY_FILES.model))
    if "critic_scheduler" in state:
        _load_part(worker.rank, worker.critic, src, CRITIC_FILES, metas.get(CRITIC_FILES.model))
        worker.critic.scheduler.load_state_dict(state["critic_scheduler"])
    worker.policy.scheduler.load_state_dict(state["scheduler"])
    worker.steps = state["steps"]
    set_rng_state(rng_from_json(state["rng"][worker.rank]))
