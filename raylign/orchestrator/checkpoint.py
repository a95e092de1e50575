"""Checkpoints: a folder per step, written under a temp name and renamed into place, and complete only with
a ``manifest.json`` that lists every file's size and sha256, written last. A crash while writing leaves a temp
folder that ``resume`` never picks up; a file lost, truncated or altered afterwards shows in the manifest.

Files of ``step-NNNNNN/``: the trainer's part (``raylign/actors/trainer_checkpoint.py``: fp32 weights and
optimizer tensors in safetensors, optimizer param_groups, scheduler, step count and per-rank RNG states in
JSON), ``driver_state.json`` (step, policy version, data position, algorithm state, MLflow run id) and
``manifest.json`` ({format_version, meta: {step, world_size, model, ...}, files: {name: {bytes, sha256}}}).
Everything in it is safetensors or JSON, so reading a checkpoint runs no code. ``latest_checkpoint`` checks sizes only
(cheap); ``verify_checkpoint`` hashes every file and is what a resume calls before loading.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

DRIVER_STATE = "driver_state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of the manifest; bump when the checkpoint layout changes
_CHUNK = 1 << 20  # hashing reads 1 MiB at a time: a 1 GB optimizer file never sits in memory whole
# How a mismatch names a manifest field to the user: the config key that sets it.
_CONFIG_KEYS = {"world_size": "trainer.num_workers", "model": "model.name"}


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or from another setup; the message is one line naming why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, meta: dict) -> dict:
    """List every file in ``folder`` with size and sha256 in ``manifest.json``; returns the manifest."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in _files(folder)}
    manifest = {"format_version": FORMAT_VERSION, "meta": meta, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(ckpt: Path) -> dict:
    """The manifest of ``ckpt`` if it exists, parses and has this format version; else CheckpointError."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST} (written by an older raylign or incomplete)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} has format version {version!r}; this raylign "
                              f"reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("meta"), dict):
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} lacks its 'files' or 'meta' table")
    return manifest


def _file_problem(ckpt: Path, name: str, entry, hash_it: bool) -> str | None:
    """What is wrong with one listed file (None: nothing); hashing only when asked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or Path(name).is_absolute() \
            or ".." in Path(name).parts:
        return f"{MANIFEST} has a malformed entry for {name}"
    path = ckpt / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, the manifest lists {entry['bytes']} (truncated or rewritten)"
    if hash_it and file_sha256(path) != entry.get("sha256"):
        return f"{name} does not match its sha256 in the manifest (altered or corrupted)"
    return None


def _is_complete(ckpt: Path) -> bool:
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError:
        return False
    return all(_file_problem(ckpt, n, e, hash_it=False) is None for n, e in manifest["files"].items())


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root`` (manifest present, listed files at their sizes), oldest first."""
    done = [p for p in root.glob("step-*") if p.name[5:].isdigit() and _is_complete(p)] if root.exists() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def _mismatch(ckpt: Path, field: str, saved, wanted) -> str:
    key = _CONFIG_KEYS.get(field, field)
    if field == "world_size":
        return (f"checkpoint {ckpt} was written by {saved} trainer workers ({key}={saved}); "
                f"this run has {key}={wanted}")
    return f"checkpoint {ckpt} was written with {key}={saved!r}; this run has {key}={wanted!r}"


def verify_checkpoint(ckpt: Path, expect: dict | None = None) -> dict:
    """Hash every listed file and compare ``expect`` with the manifest's meta; the manifest, or CheckpointError."""
    manifest = read_manifest(ckpt)
    for name, entry in manifest["files"].items():
        problem = _file_problem(ckpt, name, entry, hash_it=True)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt}: {problem}")
    meta = manifest["meta"]
    for field, wanted in (expect or {}).items():
        if field not in meta:
            raise CheckpointError(f"checkpoint {ckpt}: its manifest does not record {field}, which this run checks")
        if meta[field] != wanted:
            raise CheckpointError(_mismatch(ckpt, field, meta[field], wanted))
    return manifest


def checkpoint_meta(ckpt: Path) -> dict:
    """The manifest's meta (step, world_size, model, ... as the driver passed them); CheckpointError if unreadable."""
    return read_manifest(ckpt)["meta"]


def save_checkpoint(root: Path, step: int, write_trainer: Callable[[str], None], driver_state: dict, keep: int,
                    meta: dict | None = None) -> Path:
    """Write ``step-NNNNNN`` (trainer files, driver state, manifest last) and keep the ``keep`` newest complete ones."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_trainer(str(tmp))
    (tmp / DRIVER_STATE).write_text(json.dumps({**driver_state, "step": step}, indent=2))
    write_manifest(tmp, {**(meta or {}), "step": step})  # last: it marks the folder complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # Only complete folders are pruned: a damaged or older-format one is left for a person to look at.
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / DRIVER_STATE).read_text())


class PromptStream:
    """Training items (prompts, SFT examples or preference pairs) in a seeded random order, epoch after epoch;
    its position is checkpointed."""

    def __init__(self, problems: list, batch_size: int, seed: int):
        self.problems, self.batch_size, self.seed = problems, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list:
        return self.take(self.batch_size)

    def take(self, n: int) -> list:
        """The next n items (across epochs); ``next`` takes one step's worth."""
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            batch.append(self.problems[self._order[self.position]])
            self.position += 1
        return batch

    def peek_batches(self, k: int) -> list[list]:
        """The next k steps' batches, left in the stream (async training samples them ahead)."""
        saved = self.epoch, self.position, self._order
        try:
            return [self.next() for _ in range(k)]
        finally:
            self.epoch, self.position, self._order = saved

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()
