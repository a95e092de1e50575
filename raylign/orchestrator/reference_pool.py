"""The driver's side of the reference actor (``trainer.ref_model: actor``): calls with a deadline, and a
restart story.

Each ``logprobs`` call waits at most ``fault.call_timeout_s``. An actor that dies or misses the deadline is
killed, a fresh one is built from ``model.name`` and the call is retried: the reference is frozen, so the
retry returns exactly what the lost call would have. Replacements are counted as ``fault/reference_restarts``;
past ``fault.max_actor_restarts`` the client raises ``ReferenceClientError``.
"""

from __future__ import annotations

import ray

from raylign.actors.reference import ReferenceActor
from raylign.config import FaultConfig, ModelConfig, TrainerConfig
from raylign.orchestrator.faults import ACTOR_FAULTS, RestartBudget, RestartLimitError, fault_cause
from raylign.types import TrainBatch


class ReferenceClientError(RestartLimitError):
    """The reference actor failed more often than ``fault.max_actor_restarts`` allows."""


class ReferenceClient:
    def __init__(self, model_path: str, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 fault_cfg: FaultConfig | None = None):
        self.args = (model_path, model_cfg, trainer_cfg)
        self.fault = fault_cfg or FaultConfig()
        self.restarts = RestartBudget("reference", self.fault.max_actor_restarts, "fault.max_actor_restarts",
                                      ReferenceClientError)
        self.actor = self._start()
        ray.get(self.actor.ready.remote())  # a first start that fails is a setup error: raise it as is

    def _start(self):
        trainer_cfg = self.args[2]
        return ReferenceActor.options(num_cpus=trainer_cfg.num_cpus_per_worker,
                                      num_gpus=1 if trainer_cfg.use_gpu else 0).remote(*self.args)

    def _call(self, method: str, *args):
        """``method`` on the actor within the deadline, replacing the actor and retrying until it answers
        or the restart budget is spent (the budget bounds the loop)."""
        timeout, step = self.fault.call_timeout_s, method
        while True:
            try:
                if step == "start":  # a replacement: its start-up gets a deadline of its own, not the call's
                    ray.get(self.actor.ready.remote(), timeout=timeout)
                    step = method
                return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
            except ACTOR_FAULTS as e:
                self.restarts.spend("reference actor", f"{step}: {fault_cause(e, timeout)}")
                ray.kill(self.actor)
                self.actor, step = self._start(), "start"

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per sequence, in batch order: log p_ref of each completion token (see ReferenceActor.logprobs)."""
        return self._call("logprobs", batch)

    def pid(self) -> int:
        return self._call("pid")

    def fault_counters(self) -> dict[str, int]:
        return self.restarts.counters()

    def shutdown(self) -> None:
        ray.kill(self.actor)
