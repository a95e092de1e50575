"""Checkpoints: a folder per step under the run's storage (``raylign.storage``: a local folder, NFS, or an
s3:// / gs:// URI), complete only with a ``manifest.json`` that lists every file's size and sha256, written last.
Object stores cannot rename a folder, so a step is written in place and the manifest marks it complete: a crash
while writing leaves a folder without one, which ``resume`` never picks up; a file lost, truncated or altered
afterwards shows in the manifest.

Files of ``step-NNNNNN/``: the trainer's part (``raylign/actors/trainer_checkpoint.py``, written and uploaded by
trainer rank 0 from its own node, which reports each file's size and sha256: fp32 weights and optimizer tensors
in safetensors, optimizer param_groups, scheduler, step count and per-rank RNG states in JSON),
``driver_state.json`` (step, policy version, data position, algorithm state, MLflow run id, the config) and
``manifest.json`` ({format_version, meta: {step, world_size, model, ...}, files: {name: {bytes, sha256}}}).
Everything in it is safetensors or JSON, so reading a checkpoint runs no code. ``latest_checkpoint`` checks sizes only
(cheap); ``verify_checkpoint`` is what a resume calls before loading. It hashes every file of a local checkpoint.
Of a remote one it hashes only the small files (``HASH_ON_DRIVER_BYTES``): streaming the weights and optimizer state
to the driver only to hash them would read them twice, so trainer rank 0 hashes the copy it fetches against
``trainer_hashes`` before loading it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from raylign import storage

DRIVER_STATE = "driver_state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of the manifest; bump when the checkpoint layout changes
# How a mismatch names a manifest field to the user: the config key that sets it.
_CONFIG_KEYS = {"world_size": "trainer.num_workers", "model": "model.name"}

Location = str | Path  # a local folder or a storage URI (raylign.storage)
HASH_ON_DRIVER_BYTES = 16 << 20  # of a remote checkpoint, the driver hashes files up to this size itself


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or from another setup; the message is one line naming why."""


def write_manifest(ckpt: Location, files: dict[str, dict], meta: dict) -> dict:
    """Write ``manifest.json`` listing ``files`` ({name: {bytes, sha256}}) into ``ckpt``; returns the manifest."""
    manifest = {"format_version": FORMAT_VERSION, "meta": meta, "files": dict(sorted(files.items()))}
    storage.write_text(storage.join(str(ckpt), MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def read_manifest(ckpt: Location) -> dict:
    """The manifest of ``ckpt`` if it exists, parses and has this format version; else CheckpointError."""
    path = storage.join(str(ckpt), MANIFEST)
    if storage.file_size(path) is None:
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST} (written by an older raylign or incomplete)")
    try:
        manifest = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} has format version {version!r}; this raylign "
                              f"reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("meta"), dict):
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} lacks its 'files' or 'meta' table")
    return manifest


def _file_problem(ckpt: Location, name: str, entry, hash_it: bool) -> str | None:
    """What is wrong with one listed file (None: nothing); hashing only when asked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or Path(name).is_absolute() \
            or ".." in Path(name).parts:
        return f"{MANIFEST} has a malformed entry for {name}"
    path = storage.join(str(ckpt), name)
    size = storage.file_size(path)
    if size is None:
        return f"{name} is missing"
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, the manifest lists {entry['bytes']} (truncated or rewritten)"
    if hash_it and storage.sha256(path) != entry.get("sha256"):
        return f"{name} does not match its sha256 in the manifest (altered or corrupted)"
    return None


def _is_complete(ckpt: str) -> bool:
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError:
        return False
    return all(_file_problem(ckpt, n, e, hash_it=False) is None for n, e in manifest["files"].items())


def _step_dirs(root: Location) -> list[str]:
    """Every ``step-N`` folder under ``root`` (complete or not), oldest first."""
    names = [n for n in storage.list_dirs(str(root)) if n.startswith("step-") and n[5:].isdigit()]
    return [storage.join(str(root), n) for n in sorted(names, key=lambda n: int(n[5:]))]


def checkpoint_dirs(root: Location) -> list[str]:
    """Complete checkpoint folders under ``root`` (manifest present, listed files at their sizes), oldest first."""
    return [ckpt for ckpt in _step_dirs(root) if _is_complete(ckpt)]


def latest_checkpoint(root: Location) -> str | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def newest_checkpoint(root: Location) -> str | None:
    """The newest step folder with a manifest, complete or not: a damaged newest checkpoint is an error to
    report (verify_checkpoint names the file), not a reason to fall back silently to an older one."""
    found = [ckpt for ckpt in _step_dirs(root) if storage.file_size(storage.join(ckpt, MANIFEST)) is not None]
    return found[-1] if found else None


def _mismatch(ckpt: Location, field: str, saved, wanted) -> str:
    key = _CONFIG_KEYS.get(field, field)
    if field == "world_size":
        return (f"checkpoint {ckpt} was written by {saved} trainer workers ({key}={saved}); "
                f"this run has {key}={wanted}")
    return f"checkpoint {ckpt} was written with {key}={saved!r}; this run has {key}={wanted!r}"


def _hashed_by_driver(ckpt: Location, entry) -> bool:
    return not storage.is_remote(str(ckpt)) or (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                                                 and entry["bytes"] <= HASH_ON_DRIVER_BYTES)


def verify_checkpoint(ckpt: Location, expect: dict | None = None) -> dict:
    """Check every listed file's size, hash those the driver hashes (all of a local checkpoint, the small ones of a
    remote one: ``trainer_hashes`` lists the rest) and compare ``expect`` with the manifest's meta; the manifest,
    or CheckpointError."""
    manifest = read_manifest(ckpt)
    for name, entry in manifest["files"].items():
        problem = _file_problem(ckpt, name, entry, hash_it=_hashed_by_driver(ckpt, entry))
        if problem:
            raise CheckpointError(f"checkpoint {ckpt}: {problem}")
    meta = manifest["meta"]
    for field, wanted in (expect or {}).items():
        if field not in meta:
            raise CheckpointError(f"checkpoint {ckpt}: its manifest does not record {field}, which this run checks")
        if meta[field] != wanted:
            raise CheckpointError(_mismatch(ckpt, field, meta[field], wanted))
    return manifest


def trainer_hashes(ckpt: Location, manifest: dict | None = None) -> dict[str, str]:
    """{file name: sha256} of the files ``verify_checkpoint`` left for trainer rank 0 to hash on its fetched copy
    (empty for a local checkpoint, which the driver hashed whole). ``manifest``: the one verify_checkpoint
    returned, else it is read again."""
    files = (manifest or read_manifest(ckpt))["files"]
    return {name: entry["sha256"] for name, entry in files.items() if not _hashed_by_driver(ckpt, entry)}


def checkpoint_meta(ckpt: Location) -> dict:
    """The manifest's meta (step, world_size, model, ... as the driver passed them); CheckpointError if unreadable."""
    return read_manifest(ckpt)["meta"]


def save_checkpoint(root: Location, step: int, write_trainer: Callable[[str], dict[str, dict]], driver_state: dict,
                    keep: int, meta: dict | None = None) -> str:
    """Write ``step-NNNNNN`` (the trainer's files, whose {name: {bytes, sha256}} ``write_trainer`` returns, the
    driver state, the manifest last) and keep the ``keep`` newest complete ones."""
    final = storage.join(str(root), f"step-{step:06d}")
    storage.delete_dir(final)  # a replayed step rewrites its folder whole
    files = dict(write_trainer(final))
    data = json.dumps({**driver_state, "step": step}, indent=2).encode()
    storage.write_text(storage.join(final, DRIVER_STATE), data.decode())
    files[DRIVER_STATE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(final, files, {**(meta or {}), "step": step})  # last: it marks the folder complete
    # Only complete folders are pruned: a damaged or older-format one is left for a person to look at.
    for old in checkpoint_dirs(root)[:-keep]:
        storage.delete_dir(old)
    return final


def read_driver_state(ckpt: Location) -> dict:
    return json.loads(storage.read_text(storage.join(str(ckpt), DRIVER_STATE)))


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
