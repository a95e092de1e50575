"""A pool of retriever actors. The driver builds (or reuses) the index once and puts a packed copy in Ray's object
store; each actor opens it read-only from its own node's index folder, unpacking the copy first on a node that
lacks it (``raylign.actors.retriever``). ``rag.retriever_resources`` places the actors on chosen nodes.
A batch of queries is cut into contiguous parts, one per actor, and the results come back in query order.

Every search waits at most ``fault.call_timeout_s``. An actor that dies or misses it is replaced and its part
searched again (the index is read-only, so the retry is exact), until it answers or the replacements pass
``fault.max_actor_restarts``, which raises ``RetrieverPoolError``. Counted as ``fault/retriever_restarts``."""

from __future__ import annotations

import ray

from raylign.actors.retriever import RetrieverActor, pack_index
from raylign.config import Config, FaultConfig
from raylign.envs.rag.store import Hit, build_store
from raylign.orchestrator.faults import ACTOR_FAULTS, RestartBudget, RestartLimitError, fault_cause


class RetrieverPoolError(RestartLimitError):
    """Retriever actors failed more often than ``fault.max_actor_restarts`` allows."""


class RetrieverPool:
    def __init__(self, cfg: Config, index_path: str | None = None, fault_cfg: FaultConfig | None = None):
        self.rag = cfg.rag
        self.fault = fault_cfg or cfg.fault
        self.restarts = RestartBudget("retriever", self.fault.max_actor_restarts, "fault.max_actor_restarts",
                                      RetrieverPoolError)
        self.index_path = index_path or str(build_store(cfg).path)
        self.shipped = [ray.put(pack_index(self.index_path))]  # fetched only by actors on nodes without the index
        self.actors = [self._start() for _ in range(cfg.rag.num_retrievers)]
        self.placement = ray.get([a.ready.remote() for a in self.actors])  # per actor: node, path, unpacked

    def _start(self):
        return RetrieverActor.options(num_cpus=self.rag.retriever_num_cpus, resources=self.rag.retriever_resources
                                      ).remote(self.index_path, self.rag, self.shipped)

    def search(self, queries: list[str], k: int | None = None, method: str = "hybrid") -> list[list[Hit]]:
        k = k or self.rag.top_k
        size = -(-len(queries) // len(self.actors))  # ceil: contiguous parts keep each actor's batch large
        parts = [queries[i:i + size] for i in range(0, len(queries), size)] if queries else []
        refs = [a.search.remote(p, k, method) for a, p in zip(self.actors, parts)]
        out: list[list[Hit]] = []
        timeout = self.fault.call_timeout_s
        for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
            while True:
                try:
                    out += ray.get(ref, timeout=timeout)
                    break
                except ACTOR_FAULTS as e:
                    self.restarts.spend(f"retriever actor {i}", fault_cause(e, timeout))
                    ray.kill(self.actors[i])
                    self.actors[i] = self._start()
                    # the fresh actor opens the index before it searches: both within one deadline
                    ref = self.actors[i].search.remote(part, k, method)
        return out

    def __call__(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The ``Search`` callable of ``raylign.envs.rag.episode``: hybrid search."""
        return self.search(queries, k)

    def fault_counters(self) -> dict[str, int]:
        return self.restarts.counters()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
