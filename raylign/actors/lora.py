"""LoRA adapters on the trained policy (``trainer.lora``), with peft, on every train backend.

Only adapter parameters (and a PPO value head, trained in full) require grad, so only they reach the
optimizer. The reference model is the same policy with its adapter disabled: no second copy is loaded.
Names: peft prefixes the HF names with ``base_model.model.``, renames an adapted layer's weight to
``<layer>.base_layer.weight`` and adds ``<layer>.lora_A.default.weight`` (r x in) and ``lora_B`` (out x r).
The pure functions here turn a trainer state in those names into what leaves the trainer:
- ``merged_hf_state``: plain HF names and weights, W = W0 + (alpha / r) * B @ A, for full sync and exports;
- ``adapter_state``: the adapter tensors in the names ``PeftModel.save_pretrained`` writes (no adapter name),
  for adapter-only sync and ``raylign export --adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from raylign.actors.value_head import VALUE_HEAD
from raylign.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """The model with peft LoRA adapters on ``cfg.target_modules``; everything else frozen except a value head.

    ``seed`` draws the random A matrices; every rank must pass the same one, as FSDP2 does not broadcast
    parameters at start (each rank would keep its own draw in its shard)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ValueError(f"trainer.lora.target_modules names {missing}, which {type(model).__name__} does not have; "
                         f"its linear layers are {sorted(present)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                          target_modules=list(cfg.target_modules), bias="none"))
    for name, param in peft_model.named_parameters():
        if VALUE_HEAD in name.split("."):
            param.requires_grad_(True)
    return peft_model


def load_4bit(path: str, trust_remote_code: bool, device: torch.device) -> nn.Module:
    """QLoRA's base: the HF model with its linear weights in bitsandbytes NF4 (bf16 compute), on this GPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("trainer.lora.quantize=4bit needs bitsandbytes: pip install 'raylign[gpu]' bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device}, trust_remote_code=trust_remote_code)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def peft_config_dict(cfg: LoraConfig, base_model: str) -> dict:
    """adapter_config.json as peft writes it for these settings (read by peft and vLLM)."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                            target_modules=sorted(cfg.target_modules), task_type="CAUSAL_LM",
                            base_model_name_or_path=base_model).to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a peft-named state, named as in peft's adapter_model.safetensors."""
    return {name.replace(f".{ADAPTER}.", "."): tensor for name, tensor in state.items() if is_adapter(name)}


def merged_hf_state(state: dict[str, torch.Tensor], alpha: float, r: int) -> dict[str, torch.Tensor]:
    """A peft-named state as plain HF weights with each adapter folded in (fp32 math)."""
    scale = alpha / r
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_adapter(name):
            out[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = tensor
    for name, lora_a in state.items():
        if name.endswith(f".lora_A.{ADAPTER}.weight"):
            layer = name[: -len(f".lora_A.{ADAPTER}.weight")]
            lora_b = state[f"{layer}.lora_B.{ADAPTER}.weight"]
            target = layer.removeprefix(PEFT_PREFIX) + ".weight"
            base = out[target]
            out[target] = (base.float() + scale * (lora_b.float() @ lora_a.float())).to(base.dtype)
    return out


def is_peft_state(names) -> bool:
    return any(is_adapter(n) for n in names)


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, save) -> int:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors); returns the tensor bytes.
    ``save(tensors, path)`` writes the safetensors file (atomically, by the caller's helper)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())
