"""The algorithms' ``Cluster`` protocol over Ray: generator replicas, reward actors and Ray Train workers.

Synchronous mode: every rollout step generates with the current weights, trains, then pushes the new weights to
every replica before the next step, so each sample must carry the current policy version (asserted).
Weights travel as one safetensors file written by trainer rank 0 into ``trainer.weights_dir`` (/dev/shm by
default) and loaded by each replica: one remote call per replica, not one per parameter.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from array import array
from pathlib import Path

from raylign.algorithms.registry import ALGORITHMS
from raylign.chat import encode_chat
from raylign.config import Config
from raylign.envs.pairs import encode_response
from raylign.models import load_tokenizer, resolve_model
from raylign.orchestrator.episodes import rollout_stack
from raylign.algorithms.protocol import completions_batch
from raylign.orchestrator.generator_pool import GeneratorPool, GeneratorPoolError
from raylign.orchestrator.lm_service import service_counters, start_services, stop_services
from raylign.orchestrator.metrics import PhaseTimer
from raylign.orchestrator.reference_pool import ReferenceClient
from raylign.orchestrator.reward_pool import RewardPool
from raylign.orchestrator.trainer_group import TrainerGroup
from raylign.types import Completion, Problem, Score, TrainBatch


REF_CACHE_TOKENS = 5_000_000
# The sync canary: fixed chat prompts every replica samples after a sync; their log-probs must match the trainer's.
CANARY_PROMPTS = [[{"role": "user", "content": "What is 17 + 25?"}],
                  [{"role": "user", "content": "Name a river in Europe."}]]
CANARY_TOKENS = 8
log = logging.getLogger(__name__)


def describe_sync_layout(layout: dict) -> str:
    """One line: which transport each replica got, with short node ids."""
    replicas = "; ".join(f"replica {r['replica']} on node {r['node'][:8]} by {r['transport']}" for r in layout["replicas"])
    return f"trainer rank 0 on node {layout['trainer_node'][:8]}; {replicas}"


class RayCluster:
    """The actors one algorithm needs (its registry entry), behind the algorithms' ``Cluster`` protocol.

    Generator replicas and reward actors exist when the algorithm samples during training or evals are on;
    the reference model only when the algorithm asks for one (``Algorithm.reference``), in the trainer
    workers or in its own actor (``trainer.ref_model``); a critic only when it names one.
    """

    def __init__(self, cfg: Config, model_path: str, tokenizer, run_id: str, storage_dir: str, reward_fn=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.timer = PhaseTimer()
        self.version = 0
        self.synced_version = 0  # the policy version the generators serve
        self.tokens_generated = 0
        self.mc_tokens = 0  # Monte Carlo continuations (VinePPO, stepwise DPO): generated, never trained on
        self.mc_calls = 0
        self.max_new_tokens = cfg.generator.max_new_tokens
        self.prompt_cache: dict[str, list[int]] = {}
        self.ref_cache: dict[tuple, list[float]] = {}
        self.ref_cache_tokens = 0
        self.judge_tokens = 0
        self.step = 0  # the training step being run (set by the loop; fault hooks read it)
        self.prompt_source = None  # n -> the next n training prompts (set by the loop; dynamic sampling reads it)
        self.model_path, self.storage_dir = model_path, storage_dir
        self.weights_path = Path(cfg.trainer.weights_dir) / run_id / "policy.safetensors"
        self.syncs = 0
        self.sync_layout: dict = {}  # where the trainer and each replica run, and the transport each gets
        self.weights_path.parent.mkdir(parents=True, exist_ok=True)
        algorithm = ALGORITHMS[cfg.algorithm.name]
        self.needs_reference = algorithm.reference(cfg.algorithm)
        self.cache_ref = algorithm.data != "prompts"
        self.critic = algorithm.critic(cfg.algorithm)
        evals = cfg.train.eval_before or cfg.train.eval_after
        self.generators = self.rewards = self.rollouts = self.reference = None
        self.services: dict = {}
        with self.timer.phase("startup"):
            self.trainer = self._start_trainer()
            if algorithm.generation(cfg.algorithm) or evals:
                self.generators = GeneratorPool(model_path, cfg.model, cfg.generator, cfg.fault,
                                                lora_rank=cfg.trainer.lora.r if cfg.trainer.lora.enabled else None)
                self.services = start_services(cfg)  # models the reward calls: task model (dspy), judge
                # rollouts: the generators, or multi-turn tool-use episodes over them (env.name=rag)
                rewards = RewardPool(cfg.env, cfg.dataset, cfg.reward, reward_fn=reward_fn, rag_cfg=cfg.rag,
                                     fault_cfg=cfg.fault, full_cfg=cfg, services=self.services)
                self.rollouts, self.rewards = rollout_stack(cfg, self.generators, rewards, tokenizer)
            if self.needs_reference and cfg.trainer.ref_model == "actor" and not cfg.trainer.lora.enabled:
                self.reference = ReferenceClient(model_path, cfg.model, cfg.trainer, cfg.fault)
            self.judge_pool, self.judge_tokenizer, self.judge_cache = None, tokenizer, {}
            if algorithm.judge(cfg.algorithm):
                self._start_judge()
        self.base_dir = Path(cfg.output_dir or storage_dir) / "base_policy"
        if algorithm.base_snapshot(cfg.algorithm) and not (self.base_dir / "COMPLETE").is_file():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self.trainer.save_checkpoint(str(self.base_dir))  # the initial weights, for reset_policy
            (self.base_dir / "COMPLETE").write_text("")  # written last: a resume reuses only a whole snapshot

    def _start_trainer(self) -> TrainerGroup:
        cfg = self.cfg
        per_step = getattr(cfg.algorithm, "epochs", 1) * getattr(cfg.algorithm, "minibatches", 1)
        optimizer_steps = cfg.train.steps * per_step + cfg.train.sft_warmup_steps
        return TrainerGroup(self.model_path, cfg.model, cfg.trainer, seed=cfg.seed, storage_dir=self.storage_dir,
                            total_steps=optimizer_steps, critic=self.critic,
                            # with LoRA the reference is the policy with its adapter off, in the trainer
                            reference=self.needs_reference and (cfg.trainer.ref_model == "trainer" or cfg.trainer.lora.enabled),
                            command_timeout_s=cfg.fault.trainer_timeout_s)

    def _start_judge(self) -> None:
        """The judge: a frozen model (``algorithm.judge_model``, default the policy's) on one generator actor
        of its own, never synced, answering greedily."""
        name = self.cfg.algorithm.judge_model or self.cfg.model.name
        path = resolve_model(self.cfg.model.model_copy(update={"name": name}))
        if path != self.model_path:
            self.judge_tokenizer = load_tokenizer(path, trust_remote_code=self.cfg.model.trust_remote_code)
        self.judge_pool = GeneratorPool(path, self.cfg.model, self.cfg.generator.model_copy(update={"num_replicas": 1}),
                                        self.cfg.fault)

    def judge(self, requests: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy judge answers, each distinct request asked once per run (the judge is frozen)."""
        keys = [json.dumps(r, sort_keys=True) for r in requests]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.judge_cache}.items(), key=lambda kv: kv[1])
        if todo:
            with self.timer.phase("judge"):
                prompts = [encode_chat(self.judge_tokenizer, requests[i]) for _, i in todo]
                spec = self.judge_pool.spec(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
                groups = self.judge_pool.generate(prompts, spec)
            self.judge_tokens += sum(len(g[0].token_ids) for g in groups)
            self.judge_cache.update({k: g[0].text for (k, _), g in zip(todo, groups, strict=True)})
        return [self.judge_cache[k] for k in keys]

    def reset_policy(self) -> None:
        """Back to the initial weights and a fresh optimizer (saved at startup for algorithms that ask)."""
        with self.timer.phase("reset_policy"):
            self.trainer.load_checkpoint(str(self.base_dir))

    def restart_trainer(self) -> None:
        """Replace the trainer workers (dead, or stuck past their deadline) with a fresh group at the initial
        weights; the caller loads a checkpoint into it."""
        self.trainer.shutdown()
        with self.timer.phase("trainer_restart"):
            self.trainer = self._start_trainer()

    def fault_counters(self) -> dict[str, float]:
        """Actors replaced so far, per role (``fault/<role>_restarts``)."""
        tools = self.rollouts if self.rollouts is not self.generators else None  # rag: the retriever pool
        if self.rewards is None:  # no generators either
            tools = None
        pools = [self.generators, self.rewards, self.reference, tools]
        out = {k: float(v) for pool in pools if pool is not None for k, v in pool.fault_counters().items()}
        if self.judge_pool is not None:
            out.update({k.replace("generator", "judge"): float(v) for k, v in self.judge_pool.fault_counters().items()})
        if self.services:
            out.update(service_counters(self.services))
        return out

    def prompt_ids(self, problems: list[Problem]) -> list[list[int]]:
        for p in problems:
            if p.id not in self.prompt_cache:
                self.prompt_cache[p.id] = encode_chat(self.tokenizer, p.messages)
        return [self.prompt_cache[p.id] for p in problems]

    def next_prompts(self, n: int) -> list[Problem]:
        if self.prompt_source is None:
            raise RuntimeError("no prompt source: the training loop sets RayCluster.prompt_source")
        return self.prompt_source(n)

    def generate(self, problems: list[Problem], n: int, temperature: float) -> list[list[Completion]]:
        self.ensure_synced()
        with self.timer.phase("generate"):
            spec = self.generators.spec(n=n, temperature=temperature)
            groups = self.rollouts.generate(self.prompt_ids(problems), spec)
        stale = {c.policy_version for g in groups for c in g} - {self.version}
        assert not stale, f"off-policy samples in synchronous mode: versions {stale}, trainer at {self.version}"
        self.tokens_generated += sum(len(c.token_ids) for g in groups for c in g)
        return groups

    def continue_from(self, prefixes: list[list[int]], n: int, temperature: float,
                      max_new_tokens: int | None = None) -> list[list[Completion]]:
        self.ensure_synced()
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
        if which == "ref":
            return self._ref_logprobs(batch)
        with self.timer.phase("logprobs"):
            return self.trainer.logprobs(batch, which=which)

    def _ref_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The frozen reference's log-probs. Algorithms that revisit a dataset (offline DPO, every epoch) get
        each sequence computed once per run: cached by (temperature, prompt, completion) up to REF_CACHE_TOKENS
        tokens (about 12 bytes each). Fresh samples (GRPO's KL, online DPO) are never seen twice: not cached."""
        if not self.cache_ref:
            with self.timer.phase("ref_logprobs"):
                return self.reference.logprobs(batch) if self.reference is not None else self.trainer.logprobs(batch, "ref")
        keys = [(batch.temperature, len(p), array("l", p + c).tobytes())
                for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        todo = sorted({i for i, k in enumerate(keys) if k not in self.ref_cache})
        if todo:
            with self.timer.phase("ref_logprobs"):
                sub = batch.select(todo)
                sub.group_B = None  # every sequence alone; fields are the loss's, not the reference's
                sub.fields = {}
                got = self.reference.logprobs(sub) if self.reference is not None else self.trainer.logprobs(sub, "ref")
            for i, lp in zip(todo, got, strict=True):
                if self.ref_cache_tokens < REF_CACHE_TOKENS:
                    self.ref_cache[keys[i]] = array("f", lp)
                    self.ref_cache_tokens += len(lp)
            fresh = dict(zip(todo, got))
        else:
            fresh = {}
        return [fresh[i] if i in fresh else self.ref_cache[k].tolist() for i, k in enumerate(keys)]

    def train_step(self, batch: TrainBatch, loss_name: str, loss_kwargs: dict, minibatches: int = 1) -> dict[str, float]:
        with self.timer.phase("train"):
            return self.trainer.train_step(batch, loss_name, loss_kwargs, minibatches)

    def sync_weights(self, lazy: bool = False) -> dict[str, float]:
        """The policy version goes up by one; the weights travel now, or with ``lazy`` (offline algorithms,
        whose steps never sample) at the next ``ensure_synced``: before the next generate or eval."""
        if lazy:
            self.version += 1
            return {"policy/version": float(self.version)}
        return self.push_weights(self.version + 1)

    def encode(self, prompts: list[list[dict[str, str]]], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids with the chat template, response ids + end of turn) as the generator would produce them."""
        out = []
        for messages, response in zip(prompts, responses, strict=True):
            key = json.dumps(messages, sort_keys=True)
            if key not in self.prompt_cache:
                self.prompt_cache[key] = encode_chat(self.tokenizer, messages)
            out.append((self.prompt_cache[key], encode_response(self.tokenizer, response)))
        return out

    def ensure_synced(self) -> None:
        if self.generators is not None and self.synced_version != self.version:
            self.push_weights(self.version)

    def push_weights(self, version: int) -> dict[str, float]:
        """Write the trainer's weights once and load them into every replica as ``version``."""
        self.version = version
        if self.generators is None:
            self.synced_version = version
            return {"policy/version": float(version)}
        # LoRA: a new adapter folder per version (the engines cache adapters by id); the last one stays, as the
        # pool replays it into a replaced replica
        path = self.weights_path.parent / f"adapter-v{version:06d}" if self.cfg.trainer.lora.enabled else self.weights_path
        tcfg = self.cfg.trainer
        with self.timer.phase("sync"):
            transports = self._transports()
            save_s, buckets = 0.0, None
            if "file" in transports.values():
                save_s = self.trainer.save_weights(str(path))
            if "ray" in transports.values():
                started = time.monotonic()
                buckets = self.trainer.send_weights(tcfg.sync_bucket_mb)
                save_s += time.monotonic() - started
            load_s = self.generators.load(version, transports, path=str(path), buckets=buckets,
                                          timeout_s=tcfg.sync_timeout_s)
        versions = self.generators.policy_versions()
        if versions != [version] * len(versions):
            raise RuntimeError(f"weight sync: replicas report versions {versions} after loading version {version}")
        self.version = self.synced_version = version
        self.syncs += 1
        for old in self.weights_path.parent.glob("adapter-v*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        metrics = {"sync/save_s": save_s, "sync/load_s": max(load_s), "sync/bytes": float(self.trainer.last_sync_bytes),
                   "sync/replicas_file": float(sum(t == "file" for t in transports.values())),
                   "sync/replicas_ray": float(sum(t == "ray" for t in transports.values())),
                   "policy/version": float(version)}
        if tcfg.sync_check_every and (self.syncs - 1) % tcfg.sync_check_every == 0:
            with self.timer.phase("sync_check"):
                metrics["sync/canary_gap"] = self.check_sync()
        return metrics

    def _transports(self) -> dict[int, str]:
        """Per replica: "file" or "ray" (trainer.weight_transport; auto: file only on trainer rank 0's node)."""
        mode, nodes = self.cfg.trainer.weight_transport, self.generators.node_ids()
        chosen = {i: mode if mode != "auto" else "file" if node == self.trainer.node_id else "ray"
                  for i, node in enumerate(nodes)}
        layout = {"trainer_node": self.trainer.node_id,
                  "replicas": [{"replica": i, "node": nodes[i], "transport": t} for i, t in chosen.items()]}
        if layout != self.sync_layout:  # logged at the first sync and whenever a replica moves
            self.sync_layout = layout
            log.info("weight sync: %s", describe_sync_layout(layout))
        return chosen

    def check_sync(self) -> float:
        """The canary: each replica samples fixed prompts; its log-probs must match the trainer's on the same
        tokens within trainer.sync_check_tol, or the replica is replaced and checked once more (then the run
        stops: the sync itself is broken). Returns the largest gap seen on the replicas that passed."""
        tol = self.cfg.trainer.sync_check_tol
        spec = self.generators.spec(temperature=1.0, n=1, max_new_tokens=CANARY_TOKENS)
        worst = 0.0
        for attempt in range(2):
            per_replica = self.generators.each_generate(CANARY_PROMPTS, spec)
            gaps = [self._canary_gap([c for g in groups for c in g]) for groups in per_replica]
            bad = [i for i, gap in enumerate(gaps) if gap > tol]
            worst = max([worst, *[g for g in gaps if g <= tol]])
            if not bad:
                return worst
            if attempt == 1:
                raise GeneratorPoolError(f"weight sync check: replicas {bad} still differ from the trainer by "
                                         f"{max(gaps[i] for i in bad):.3f} > trainer.sync_check_tol={tol} "
                                         "in log-prob after being replaced and re-synced")
            for i in bad:
                self.generators.replace(i, f"failed the weight sync check (log-prob gap {gaps[i]:.3f} > {tol})")
        return worst

    def _canary_gap(self, completions: list[Completion]) -> float:
        trainer_lp = self.trainer.logprobs(completions_batch([completions]))
        return max((abs(a - b) for c, lp in zip(completions, trainer_lp, strict=True)
                    for a, b in zip(c.logprobs, lp, strict=True)), default=0.0)

    def reseed(self, step: int) -> None:
        if self.generators is not None:
            self.generators.reseed(self.cfg.generator.seed + 1_000_003 * (step + 1))

    def shutdown(self) -> None:
        self.trainer.shutdown()
        if self.generators is not None:
            if self.rollouts is not self.generators:
                self.rollouts.shutdown()
            self.generators.shutdown()
            self.rewards.shutdown()
        if self.reference is not None:
            self.reference.shutdown()
        if self.judge_pool is not None:
            self.judge_pool.shutdown()
        stop_services(self.services)
        self.weights_path.unlink(missing_ok=True)
