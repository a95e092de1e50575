"""The algorithms' ``Cluster`` protocol over Ray: generator replicas, reward actors and Ray Train workers.

Synchronous mode: every step generates with the current weights, trains, then pushes the new weights to
every replica before the next step, so each sample must carry the current policy version (asserted).
Weights travel as one safetensors file written by trainer rank 0 into ``trainer.weights_dir`` (/dev/shm by
default) and loaded by each replica: one remote call per replica, not one per parameter.
"""

from __future__ import annotations

from pathlib import Path

from raylign.chat import encode_chat
from raylign.config import Config
from raylign.types import Problem, Score
from raylign.orchestrator.episodes import rollout_stack
from raylign.orchestrator.generator_pool import GeneratorPool
from raylign.orchestrator.metrics import PhaseTimer
from raylign.orchestrator.reference_pool import ReferenceClient
from raylign.orchestrator.reward_pool import RewardPool
from raylign.orchestrator.trainer_group import TrainerGroup
from raylign.types import Completion, TrainBatch


class RayCluster:
    def __init__(self, cfg: Config, model_path: str, tokenizer, run_id: str, storage_dir: str, reward_fn=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.timer = PhaseTimer()
        self.version = 0
        self.tokens_generated = 0
        self.mc_tokens = 0  # Monte Carlo continuations (VinePPO): generated, never trained on
        self.mc_calls = 0
        self.prompt_cache: dict[str, list[int]] = {}
        self.step = 0  # the training step being run (set by the loop; fault hooks read it)
        self.model_path, self.storage_dir = model_path, storage_dir
        self.weights_path = Path(cfg.trainer.weights_dir) / run_id / "policy.safetensors"
        self.weights_path.parent.mkdir(parents=True, exist_ok=True)
        with self.timer.phase("startup"):
            self.trainer = self._start_trainer()
            self.generators = GeneratorPool(model_path, cfg.model, cfg.generator, cfg.fault)
            self.reference = None
            if cfg.trainer.ref_model == "actor":
                self.reference = ReferenceClient(model_path, cfg.model, cfg.trainer, cfg.fault)
            # rollouts: the generators, or multi-turn tool-use episodes over them (env.name=rag)
            rewards = RewardPool(cfg.env, cfg.dataset, cfg.reward, reward_fn=reward_fn, rag_cfg=cfg.rag,
                                 fault_cfg=cfg.fault)
            self.rollouts, self.rewards = rollout_stack(cfg, self.generators, rewards, tokenizer)

    def _start_trainer(self) -> TrainerGroup:
        cfg = self.cfg
        optimizer_steps = cfg.train.steps * cfg.algorithm.epochs * cfg.algorithm.minibatches
        critic = cfg.algorithm.critic if cfg.algorithm.name == "ppo" else None
        return TrainerGroup(self.model_path, cfg.model, cfg.trainer, seed=cfg.seed, storage_dir=self.storage_dir,
                            total_steps=optimizer_steps, critic=critic,
                            command_timeout_s=cfg.fault.trainer_timeout_s)

    def restart_trainer(self) -> None:
        """Replace the trainer workers (dead, or stuck past their deadline) with a fresh group at the initial
        weights; the caller loads a checkpoint into it."""
        self.trainer.shutdown()
        with self.timer.phase("trainer_restart"):
            self.trainer = self._start_trainer()

    def fault_counters(self) -> dict[str, float]:
        """Actors replaced so far, per role (``fault/<role>_restarts``)."""
        tools = self.rollouts if self.rollouts is not self.generators else None  # rag: the retriever pool
        pools = [self.generators, self.rewards, self.reference, tools]
        return {k: float(v) for pool in pools if pool is not None for k, v in pool.fault_counters().items()}

    def prompt_ids(self, problems: list[Problem]) -> list[list[int]]:
        for p in problems:
            if p.id not in self.prompt_cache:
                self.prompt_cache[p.id] = encode_chat(self.tokenizer, p.messages)
        return [self.prompt_cache[p.id] for p in problems]

    def generate(self, problems: list[Problem], n: int, temperature: float) -> list[list[Completion]]:
        with self.timer.phase("generate"):
            spec = self.generators.spec(n=n, temperature=temperature)
            groups = self.rollouts.generate(self.prompt_ids(problems), spec)
        stale = {c.policy_version for g in groups for c in g} - {self.version}
        assert not stale, f"off-policy samples in synchronous mode: versions {stale}, trainer at {self.version}"
        self.tokens_generated += sum(len(c.token_ids) for g in groups for c in g)
        return groups

    def continue_from(self, prefixes: list[list[int]], n: int, temperature: float,
                      max_new_tokens: int | None = None) -> list[list[Completion]]:
        with self.timer.phase("mc_rollouts"):
            spec = self.generators.spec(n=n, temperature=temperature,
                                        max_new_tokens=max_new_tokens or self.cfg.generator.max_new_tokens)
            groups = self.generators.generate(prefixes, spec)
        stale = {c.policy_version for g in groups for c in g} - {self.version}
        assert not stale, f"Monte Carlo rollouts from stale weights: versions {stale}, trainer at {self.version}"
        self.mc_calls += 1
        self.mc_tokens += sum(len(c.token_ids) for g in groups for c in g)
        return groups

    def token_pieces(self, token_ids: list[list[int]]) -> list[list[str]]:
        """Each token's text in context: the growth of the decoded prefix (multi-byte characters land on the
        token that completes them), so ''.join(pieces) == decode(ids)."""
        out = []
        for ids in token_ids:
            pieces, previous = [], ""
            for t in range(1, len(ids) + 1):
                text = self.tokenizer.decode(ids[:t], skip_special_tokens=True)
                pieces.append(text[len(previous):] if text.startswith(previous) else text)
                previous = text
            out.append(pieces)
        return out

    def values(self, batch: TrainBatch) -> list[list[float]]:
        with self.timer.phase("values"):
            return self.trainer.values(batch)

    def score(self, problems: list[Problem], groups: list[list[Completion]]) -> list[list[Score]]:
        with self.timer.phase("score"):
            flat = self.rewards.score([(p, c.text) for p, g in zip(problems, groups, strict=True) for c in g])
        out, start = [], 0
        for group in groups:
            out.append(flat[start:start + len(group)])
            start += len(group)
        return out

    def logprobs(self, batch: TrainBatch, which: str = "policy") -> list[list[float]]:
        with self.timer.phase("logprobs" if which == "policy" else "ref_logprobs"):
            if which == "ref" and self.reference is not None:
                return self.reference.logprobs(batch)
            return self.trainer.logprobs(batch, which=which)

    def train_step(self, batch: TrainBatch, loss_name: str, loss_kwargs: dict, minibatches: int = 1) -> dict[str, float]:
        with self.timer.phase("train"):
            return self.trainer.train_step(batch, loss_name, loss_kwargs, minibatches)

    def sync_weights(self) -> dict[str, float]:
        return self.push_weights(self.version + 1)

    def push_weights(self, version: int) -> dict[str, float]:
        """Write the trainer's weights once and load them into every replica as ``version``."""
        with self.timer.phase("sync"):
            save_s = self.trainer.save_weights(str(self.weights_path))
            self.version = version
            load_s = self.generators.load_weights(str(self.weights_path), self.version)
        versions = self.generators.policy_versions()
        assert versions == [self.version] * len(versions), f"replicas at versions {versions}, expected {self.version}"
        return {"sync/save_s": save_s, "sync/load_s": max(load_s), "policy/version": float(self.version)}

    def reseed(self, step: int) -> None:
        self.generators.reseed(self.cfg.generator.seed + 1_000_003 * (step + 1))

    def shutdown(self) -> None:
        self.trainer.shutdown()
        if self.rollouts is not self.generators:
            self.rollouts.shutdown()
        self.generators.shutdown()
        self.rewards.shutdown()
        if self.reference is not None:
            self.reference.shutdown()
        self.weights_path.unlink(missing_ok=True)
