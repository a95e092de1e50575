"""RetrieverActor: one opened DocumentStore (embedder, ChromaDB collection, BM25 index) answering searches.

The actor only opens an index the driver has already built (``build_store``), from its path and the plain
RagConfig, so several actors never race to build and none of them downloads anything.
"""

from __future__ import annotations

import ray

from raylign.config import RagConfig
from raylign.envs.rag.store import DocumentStore, Hit


@ray.remote
class RetrieverActor:
    def __init__(self, index_path: str, rag_cfg: RagConfig):
        self.store = DocumentStore(index_path, rag_cfg)

    def ready(self) -> int:
        return self.store.num_chunks

    def search(self, queries: list[str], k: int, method: str = "hybrid") -> list[list[Hit]]:
        return self.store.search(queries, k, method)
