"""RetrieverActor: one opened DocumentStore (embedder, ChromaDB collection, BM25 index) answering searches.

The actor only opens an index the driver has already built (``build_store``), so several actors never race to
build and none of them downloads anything. It looks for the index in its own node's index folder
(``RAYLIGN_INDEX_DIR`` on that node, else ``rag.index_dir``) under the driver's fingerprint name. A node that
lacks it (another machine) unpacks the copy the driver put in Ray's object store once (``pack_index``): the
index is built once and shipped, never rebuilt, and the same fingerprint means the same files.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import ray

from raylign.config import RagConfig
from raylign.envs.rag.store import READY, DocumentStore, Hit


def pack_index(path: str) -> bytes:
    """The index folder as an uncompressed tar (ChromaDB's sqlite and the BM25 arrays compress little)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def local_index(index_path: str, rag_cfg: RagConfig, packed: Callable[[], bytes]) -> tuple[str, bool]:
    """(this node's copy of the index, whether it was unpacked from ``packed()`` just now)."""
    root = Path(os.environ.get("RAYLIGN_INDEX_DIR") or rag_cfg.index_dir).expanduser()
    here = root / Path(index_path).name
    if (here / READY).is_file():
        return str(here), False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".shipping-{here.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(packed()), mode="r") as tar:
        tar.extractall(tmp, filter="data")  # no absolute paths, links out of the folder or device files
    try:
        tmp.rename(here)
    except OSError:  # another actor on this node unpacked it first: use that copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(here), True


@ray.remote
class RetrieverActor:
    def __init__(self, index_path: str, rag_cfg: RagConfig, shipped: list):
        """shipped: [ObjectRef of ``pack_index(index_path)``], in a list so Ray fetches it only where needed."""
        path, self.unpacked = local_index(index_path, rag_cfg, lambda: ray.get(shipped[0]))
        self.store = DocumentStore(path, rag_cfg)

    def ready(self) -> dict:
        return {"chunks": self.store.num_chunks, "path": str(self.store.path), "unpacked": self.unpacked,
                "node_id": ray.get_runtime_context().get_node_id()}

    def search(self, queries: list[str], k: int, method: str = "hybrid") -> list[list[Hit]]:
        return self.store.search(queries, k, method)
