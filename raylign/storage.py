"""Where a run keeps what must outlive its nodes: checkpoints, the base-policy snapshot, the final model.

A location is a local path or a URI that ``pyarrow.fs`` opens (the library Ray Train's storage uses):
``s3://bucket/prefix`` (credentials from the usual AWS environment, files or instance role; an S3-compatible
store such as MinIO takes ``?endpoint_override=host:port&scheme=http``), ``gs://bucket/prefix``,
``hdfs://...``, ``file:///abs/path``. A local path is one node's disk unless every node mounts it at the same
path (NFS); a remote URI is the same place from every node, so a trainer rank on any node can write there and
a resumed run on other nodes finds what it wrote.

Writers build a folder on their own disk and publish it (``staged``); readers get a local copy (``fetched``).
For a local location both are the folder itself, so the local case costs no copy. Object stores have no
atomic folder rename: a checkpoint is complete when its manifest, written last, is there
(``raylign.orchestrator.checkpoint``). Only pyarrow is imported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

_CHUNK = 1 << 20  # hashing reads 1 MiB at a time: a 1 GB optimizer file never sits in memory whole


def _split(uri: str) -> tuple[str, str]:
    """(location, "?query" or ""): pyarrow reads options such as endpoint_override from a URI's query."""
    base, sep, query = str(uri).partition("?")
    return base, sep + query


def is_uri(location: str) -> bool:
    return "://" in _split(location)[0]


def is_remote(location: str) -> bool:
    """Not on this node's filesystem (file:// is local)."""
    return is_uri(location) and not str(location).startswith("file://")


def join(location: str, *names: str) -> str:
    """``location/names...`` keeping a URI's query at the end."""
    base, query = _split(location)
    return "/".join([base.rstrip("/"), *names]) + query


def name(location: str) -> str:
    """The last path component."""
    return _split(location)[0].rstrip("/").rsplit("/", 1)[-1]


def absolute(location: str) -> str:
    """A local path made absolute (no relative path may reach an actor: their working directories differ)."""
    return location if is_uri(location) else os.path.abspath(location)


def open_fs(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); ValueError naming the location if pyarrow cannot open it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # pyarrow raises ArrowInvalid, ArrowNotImplementedError, OSError by scheme
        raise ValueError(f"cannot open storage location {location!r}: {type(e).__name__}: {e}") from None


def file_size(location: str) -> int | None:
    """Bytes of the file at ``location``; None when there is no file there."""
    fs, path = open_fs(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def exists(location: str) -> bool:
    fs, path = open_fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = open_fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_text(location: str, text: str) -> None:
    """Write one file (its folder is created); on a local disk through a temp file and a rename."""
    fs, path = open_fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def sha256(location: str) -> str:
    fs, path = open_fs(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_dirs(location: str) -> list[str]:
    """Names of the folders directly under ``location`` ([] when it does not exist)."""
    fs, path = open_fs(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def list_files(location: str) -> list[str]:
    """Paths of every file under ``location``, relative to it, sorted ([] when it does not exist)."""
    fs, path = open_fs(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def delete_dir(location: str) -> None:
    """Remove a folder and everything in it; nothing there is fine."""
    fs, path = open_fs(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def file_entries(folder: str) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in a local folder (what a checkpoint manifest lists)."""
    return {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256(os.path.join(folder, rel))}
            for rel in list_files(folder)}


@contextmanager
def staged(location: str) -> Iterator[str]:
    """A local folder to write ``location``'s files into: the folder itself when local; otherwise a temp folder
    on this node, uploaded to ``location`` when the block ends without error, then removed."""
    if not is_remote(location):
        fs, path = open_fs(location)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    local = tempfile.mkdtemp(prefix="raylign-stage-")
    try:
        yield local
        fs, path = open_fs(location)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextmanager
def fetched(location: str) -> Iterator[str]:
    """A local folder holding ``location``'s files: the folder itself when local; otherwise a temp copy on this
    node, removed when the block ends."""
    if not is_remote(location):
        yield open_fs(location)[1]
        return
    local = tempfile.mkdtemp(prefix="raylign-fetch-")
    try:
        fs, path = open_fs(location)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{location}: no such folder in storage")
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def delete_file(location: str) -> None:
    fs, path = open_fs(location)
    fs.delete_file(path)
