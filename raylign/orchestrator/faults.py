"""Restart budgets: how often the actors of one role may be replaced before the run stops.

Every pool that replaces dead or wedged actors spends from its own budget (``fault.max_generator_restarts``
for the generator replicas, ``fault.max_actor_restarts`` for each of reward, reference and retriever), so a
fault is counted and logged, and one that keeps recurring stops the run with a one-line reason instead of
replacing actors forever.
"""

from __future__ import annotations

import logging

from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)

# What a remote call raises when its actor is gone or past its deadline; errors raised by the actor's own
# code (RayTaskError) are bugs, not faults, and propagate.
ACTOR_FAULTS = (RayActorError, GetTimeoutError)


class RestartLimitError(RuntimeError):
    """An actor role needed more replacements than its ``fault.max_*_restarts`` allows."""


def fault_cause(error: BaseException, deadline_s: float | None = None) -> str:
    """A short phrase for logs and errors: 'died (ActorDiedError)' or 'gave no result within 30 s'."""
    if isinstance(error, GetTimeoutError):
        return f"gave no result within {deadline_s:.0f} s" if deadline_s is not None else "timed out"
    if not isinstance(error, RayActorError):  # raised by the actor's own checks (a weight sync's checksum)
        return f"failed ({str(error).strip().splitlines()[-1][:300]})"
    return f"died ({type(error).__name__})"


class RestartBudget:
    def __init__(self, role: str, limit: int, limit_name: str, error: type[RestartLimitError]):
        self.role, self.limit, self.limit_name, self.error = role, limit, limit_name, error
        self.count = 0

    def spend(self, who: str, cause: str) -> None:
        """Count one replacement of ``who``; raise ``error`` instead when the budget is spent."""
        if self.count >= self.limit:
            raise self.error(f"{who} {cause}; {self.count} restarts already, {self.limit_name}={self.limit}")
        self.count += 1
        log.warning("%s %s: replacing it (%s restart %d of %d)", who, cause, self.role, self.count, self.limit)

    def counters(self) -> dict[str, int]:
        return {f"fault/{self.role}_restarts": self.count}
