"""A pool of retriever actors. The driver builds (or reuses) the index once; each actor opens it read-only.
A batch of queries is cut into contiguous parts, one per actor, and the results come back in query order. An
actor that dies is replaced and its part is searched again once."""

from __future__ import annotations

import ray
from ray.exceptions import RayActorError

from raylign.actors.retriever import RetrieverActor
from raylign.config import Config
from raylign.envs.rag.store import Hit, build_store


class RetrieverPool:
    def __init__(self, cfg: Config, index_path: str | None = None):
        self.rag = cfg.rag
        self.index_path = index_path or str(build_store(cfg).path)
        self.actors = [self._start() for _ in range(cfg.rag.num_retrievers)]
        ray.get([a.ready.remote() for a in self.actors])
        self.restarts = 0

    def _start(self):
        return RetrieverActor.options(num_cpus=self.rag.retriever_num_cpus).remote(self.index_path, self.rag)

    def search(self, queries: list[str], k: int | None = None, method: str = "hybrid") -> list[list[Hit]]:
        k = k or self.rag.top_k
        size = -(-len(queries) // len(self.actors))  # ceil: contiguous parts keep each actor's batch large
        parts = [queries[i:i + size] for i in range(0, len(queries), size)] if queries else []
        refs = [a.search.remote(p, k, method) for a, p in zip(self.actors, parts)]
        out: list[list[Hit]] = []
        for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
            try:
                out += ray.get(ref)
            except RayActorError:
                self.restarts += 1
                ray.kill(self.actors[i])
                self.actors[i] = self._start()
                out += ray.get(self.actors[i].search.remote(part, k, method))
        return out

    def __call__(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The ``Search`` callable of ``raylign.envs.rag.episode``: hybrid search."""
        return self.search(queries, k)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
