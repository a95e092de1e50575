"""Namespaced metrics and phase timing as a context manager (``timing/<phase>`` seconds)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates seconds per phase; ``pop()`` returns ``timing/<phase>`` metrics and resets."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self.totals[name] += elapsed

    def pop(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        self.seconds.clear()
        return out
