"""LMService: a frozen model (the AutoDSPy task model, a judge) that reward actors call, on its own generator pool.

The service is a thin actor around a ``GeneratorPool`` of the model, so it gets the pool's replica restarts
and deadlines; it reserves no CPU itself (its replicas do). Reward actors call ``complete`` with a batch of
chat conversations; calls from several reward actors run one after another, each as one batched generate
over the replicas. The model is frozen: no weights ever load into it.
"""

from __future__ import annotations

import ray

from raylign.config import Config, GeneratorConfig, ModelConfig
from raylign.models import resolve_model
from raylign.orchestrator.generator_pool import GeneratorPool


@ray.remote(num_cpus=0)
class LMService:
    def __init__(self, model_cfg: ModelConfig, model_path: str, cfg: Config, gen_cfg: GeneratorConfig):
        self.pool = GeneratorPool(model_path, model_cfg, gen_cfg, cfg.fault, placement=cfg.ray.placement)
        self.calls = self.requests = self.tokens = 0

    def complete(self, conversations: list[list[dict[str, str]]], temperature: float, max_tokens: int) -> list[str]:
        spec = self.pool.spec(n=1, temperature=temperature, max_new_tokens=max_tokens)
        groups = self.pool.generate(conversations, spec)
        self.calls += 1
        self.requests += len(conversations)
        self.tokens += sum(len(g[0].token_ids) for g in groups)
        return [g[0].text for g in groups]

    def counters(self) -> dict[str, int]:
        """Generate calls, conversations and generated tokens so far, and the pool's replica restarts."""
        return {"calls": self.calls, "requests": self.requests, "tokens": self.tokens,
                "restarts": self.pool.fault_counters()["fault/generator_restarts"]}

    def shutdown(self) -> None:
        self.pool.shutdown()


def start_services(cfg: Config) -> dict[str, ray.actor.ActorHandle]:
    """The models the env calls while scoring, by role: ``task`` (env.name=dspy) and ``judge``
    (reward.judge.model); a judge naming the task model shares its service. Greedy unless configured."""
    services: dict[str, ray.actor.ActorHandle] = {}
    gen = cfg.generator.model_copy(update={"n": 1, "temperature": 0.0})
    if cfg.env.name == "dspy":
        task = cfg.model.model_copy(update={"name": cfg.dspy.task_model})
        services["task"] = LMService.remote(task, resolve_model(task), cfg, gen.model_copy(update={
            "num_replicas": cfg.dspy.num_replicas, "max_new_tokens": cfg.dspy.max_new_tokens}))
    judge = cfg.reward.judge.model
    if judge is not None:
        if "task" in services and judge == cfg.dspy.task_model:
            services["judge"] = services["task"]
        else:
            judge_cfg = cfg.model.model_copy(update={"name": judge})
            services["judge"] = LMService.remote(judge_cfg, resolve_model(judge_cfg), cfg, gen.model_copy(update={
                "num_replicas": cfg.reward.judge.num_replicas, "max_new_tokens": cfg.reward.judge.max_new_tokens}))
    ray.get([s.counters.remote() for s in unique(services)])  # up (models loaded) before anything scores
    return services


def unique(services: dict[str, ray.actor.ActorHandle]) -> list[ray.actor.ActorHandle]:
    """Each service once (a judge may share the task model's)."""
    return list({id(s): s for s in services.values()}.values())


def service_counters(services: dict[str, ray.actor.ActorHandle]) -> dict[str, float]:
    """Per role: ``<role>_model/calls``, ``/requests``, ``/tokens`` (totals so far), and its replica restarts as
    ``fault/<role>_model_restarts``."""
    out: dict[str, float] = {}
    for role, counters in zip(services, ray.get([s.counters.remote() for s in services.values()]), strict=True):
        restarts = counters.pop("restarts")
        out.update({f"{role}_model/{k}": float(v) for k, v in counters.items()})
        out[f"fault/{role}_model_restarts"] = float(restarts)
    return out


def stop_services(services: dict[str, ray.actor.ActorHandle]) -> None:
    for s in unique(services):
        try:
            ray.get(s.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - shutting down: a dead service has nothing left to stop
            pass
        ray.kill(s)
