"""LoRA adapter folders, as ``peft.PeftModel.save_pretrained(dir)`` writes them, read and checked for both backends.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r). The served weight of
each module is W = W0 + scale * B @ A, scale = alpha / r, or alpha / sqrt(r) when ``use_rslora`` is set (peft's
rule, and vLLM's). peft features that change what an adapter computes beyond that (DoRA, biases, per-module
rank or alpha patterns, modules_to_save, inits that rewrite the base such as PiSSA) are refused, as are a rank
above the engine's maximum and a tensor for a module the model lacks: each is one ``AdapterError`` naming the
folder and the problem, raised before a backend changes anything.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # peft changes W0 when it loads these

Shapes = Mapping[str, tuple[int, int]]  # module name (model.layers.0.self_attn.q_proj) -> weight (out, in)


class AdapterError(ValueError):
    """A LoRA adapter folder that cannot be served; the message names the folder and the problem."""


@dataclass(frozen=True)
class Adapter:
    folder: str
    r: int
    scale: float
    modules: tuple[str, ...]

    def factors(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, A_r_In, B_Out_r) for each adapted module, read from the folder's safetensors file."""
        with safe_open(os.path.join(self.folder, WEIGHTS_FILE), framework="pt") as f:
            for module in self.modules:
                yield module, f.get_tensor(_key(module, "A")), f.get_tensor(_key(module, "B"))


def is_adapter_path(path: str) -> bool:
    """A folder is an adapter (or a broken one); anything else is a full-weights safetensors file."""
    return os.path.isdir(path)


def read_adapter(folder: str, linear_shapes: Shapes, max_rank: int | None = None) -> Adapter:
    """Check an adapter folder against the model's linear layers (and the engine's max rank); its factors
    stay on disk until ``Adapter.factors``."""
    folder = str(folder)
    config = _read_config(folder)
    _refuse_features(folder, config)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        raise AdapterError(f"LoRA adapter {folder}: {CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha "
                           f"(got r={r!r}, lora_alpha={alpha!r})")
    if max_rank is not None and r > max_rank:
        raise AdapterError(f"LoRA adapter {folder}: rank {r} is above this engine's max_lora_rank {max_rank} "
                           "(started for a smaller trainer.lora.r)")
    modules = _check_tensors(folder, r, linear_shapes)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Adapter(folder=folder, r=r, scale=scale, modules=modules)


def serving_rank(rank: int, allowed: Iterable[int]) -> int:
    """The smallest engine max rank in ``allowed`` (vLLM takes only a fixed set) that holds rank-``rank`` adapters."""
    allowed = sorted(allowed)
    fits = [a for a in allowed if a >= rank]
    if not fits:
        raise AdapterError(f"LoRA rank {rank} is above the largest rank vLLM serves ({allowed[-1]}): "
                           "lower trainer.lora.r")
    return fits[0]


def checkpoint_linear_shapes(model_path: str) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every 2-D ``*.weight`` in a model folder's safetensors files: the modules an
    adapter may target, known without building the model."""
    shapes = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    shapes[key.removesuffix(".weight")] = (shape[0], shape[1])
    return shapes


def _key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.lora_{factor}.weight"


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"LoRA adapter {folder}: no {CONFIG_FILE} in the folder (a weight sync passes either a "
                           "safetensors file of full weights or a peft save_pretrained folder)")
    try:
        config = json.loads(Path(path).read_text())
    except ValueError as e:
        raise AdapterError(f"LoRA adapter {folder}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {folder}: peft_type {config.get('peft_type')!r} is not LORA")
    return config


def _refuse_features(folder: str, config: dict) -> None:
    init = config.get("init_lora_weights")
    refused = {
        "use_dora (DoRA)": config.get("use_dora"),
        "lora_bias": config.get("lora_bias"),
        f"bias={config.get('bias')!r}": config.get("bias", "none") != "none",
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "target_parameters": config.get("target_parameters"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "layer_replication": config.get("layer_replication"),
        "use_qalora": config.get("use_qalora"),
        f"init_lora_weights={init!r} (it rewrites the base weights)":
            isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS),
    }
    found = [name for name, value in refused.items() if value]
    if found:
        raise AdapterError(f"LoRA adapter {folder}: uses {', '.join(found)}, which raylign does not serve "
                           "(plain LoRA only: W0 + scale * B @ A)")


def _check_tensors(folder: str, r: int, linear_shapes: Shapes) -> tuple[str, ...]:
    """The adapted modules, each with an A (r x in) and a B (out x r) that fit the model's weight."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"LoRA adapter {folder}: no {WEIGHTS_FILE} in the folder")
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if match is None:
                raise AdapterError(f"LoRA adapter {folder}: unexpected tensor {key} (only lora_A/lora_B of "
                                   "linear layers are served)")
            factors.setdefault(match[1], {})[match[2]] = tuple(f.get_slice(key).get_shape())
    if not factors:
        raise AdapterError(f"LoRA adapter {folder}: {WEIGHTS_FILE} holds no tensors")
    for module, pair in factors.items():
        if module not in linear_shapes:
            raise AdapterError(f"LoRA adapter {folder}: targets {module}, which the model lacks (or which is not "
                               "a linear layer)")
        out_dim, in_dim = linear_shapes[module]
        if pair.get("A") != (r, in_dim) or pair.get("B") != (out_dim, r):
            raise AdapterError(f"LoRA adapter {folder}: {module} has lora_A {pair.get('A')} and lora_B "
                               f"{pair.get('B')}; rank {r} on a {out_dim} x {in_dim} weight needs "
                               f"({r}, {in_dim}) and ({out_dim}, {r})")
    return tuple(sorted(factors))
