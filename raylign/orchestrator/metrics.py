"""Namespaced metrics and phase timing as a context manager (``timing/<phase>`` seconds)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates seconds per phase; ``pop()`` returns ``timing/<phase>`` metrics and resets."""

    def __init__(self, on_enter: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.on_enter = on_enter  # called with the phase name as it starts (tests and benchmarks inject faults)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_enter is not None:
            self.on_enter(name)
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
