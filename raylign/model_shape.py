"""A Llama-style model's shape and exact parameter counts from its config.json alone (no weights loaded):
llama, mistral, qwen2, qwen3. Used by the memory plan (memory_plan.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raylign.config import ConfigError, ModelConfig
from raylign.models import ModelError, is_hub_id, resolve_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """What parameter counts and activations depend on, read from an HF config.json."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # lm_head shares the embedding matrix
    biased: frozenset[str] = frozenset()  # projections that carry a bias
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)


def _llama_biases(config: dict) -> frozenset[str]:
    return frozenset((ATTENTION if config.get("attention_bias") else ()) + (MLP if config.get("mlp_bias") else ()))


# model_type -> (projections with a bias, q/k norms): the Llama-style families whose blocks are q/k/v/o + gate/up/down.
LLAMA_STYLE: dict[str, Callable[[dict], tuple[frozenset[str], bool]]] = {
    "llama": lambda c: (_llama_biases(c), False),
    "mistral": lambda c: (frozenset(), False),
    "qwen2": lambda c: (frozenset(ATTENTION[:3]), False),
    "qwen3": lambda c: (frozenset(ATTENTION if c.get("attention_bias") else ()), True),
}


def model_shape(config_json: dict) -> Shape:
    """The Shape of a Llama-style model from its config.json dict; ModelError for another architecture."""
    kind = config_json.get("model_type")
    if kind not in LLAMA_STYLE:
        raise ModelError(f"memory plan: model_type {kind!r} is not a Llama-style model this plan can count "
                         f"(supported: {', '.join(LLAMA_STYLE)})")
    biased, qk_norm = LLAMA_STYLE[kind](config_json)
    hidden, heads = config_json["hidden_size"], config_json["num_attention_heads"]
    return Shape(model_type=kind, hidden=hidden, layers=config_json["num_hidden_layers"],
                 vocab=config_json["vocab_size"], intermediate=config_json["intermediate_size"], heads=heads,
                 kv_heads=config_json.get("num_key_value_heads") or heads,
                 head_dim=config_json.get("head_dim") or hidden // heads,
                 tied=bool(config_json.get("tie_word_embeddings", False)), biased=biased, qk_norm=qk_norm)


def projections(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one block."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, shape.intermediate), "up_proj": (h, shape.intermediate),
            "down_proj": (shape.intermediate, h)}


def linear_weights(shape: Shape) -> int:
    """Weights (no biases) of every block's projections: what QLoRA stores in NF4."""
    return shape.layers * sum(i * o for i, o in projections(shape).values())


def block_params(shape: Shape) -> int:
    """One decoder block: projections (+ their biases), two RMSNorms, q/k norms where the family has them."""
    linear = sum(i * o + (o if name in shape.biased else 0) for name, (i, o) in projections(shape).items())
    return linear + 2 * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)


def root_params(shape: Shape) -> int:
    """Outside the blocks: embeddings, final norm, and the lm_head unless tied."""
    return shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden


def total_params(shape: Shape) -> int:
    return shape.layers * block_params(shape) + root_params(shape)


def lora_params(shape: Shape, r: int, target_modules: list[str]) -> int:
    """LoRA A (r x in) and B (out x r) for every targeted projection of every block, as peft adds them."""
    shapes = projections(shape)
    if unknown := sorted(set(target_modules) - set(shapes)):
        raise ConfigError(f"trainer.lora.target_modules: {', '.join(unknown)} not a projection of a "
                          f"{shape.model_type} block (known: {', '.join(shapes)})")
    return shape.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in set(target_modules))


def read_config_json(model_cfg: ModelConfig) -> dict:
    """The model's config.json without loading weights: a hub id downloads that one file; a built-in name or a
    local folder goes through resolve_model (the built-ins are built once and cached)."""
    name = model_cfg.name
    if is_hub_id(name):
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(repo_id=name, filename="config.json")).read_text())
        except Exception as e:  # offline, not found, gated: one line naming the model
            raise ModelError(f"model.name '{name}': cannot read config.json from the hub "
                             f"({type(e).__name__})") from None
    return json.loads((Path(resolve_model(model_cfg)) / "config.json").read_text())
