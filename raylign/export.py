"""``raylign export RUN_DIR``: a run's trained policy as a plain Hugging Face folder (``--merge``, the default)
or, for a LoRA run, as a peft adapter folder (``--adapter``). Reads the run's latest complete checkpoint
(its fp32 trainer weights and the config it recorded), on this machine, without Ray or the trainer. RUN_DIR is
the run's output_dir, or its ``train.storage`` location when it had one (a folder or an s3:// / gs:// URI).
Both outputs load in transformers and vLLM (the adapter through ``LoRARequest`` or ``PeftModel``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load

from raylign import storage
from raylign.actors.lora import adapter_state, is_peft_state, merged_hf_state, peft_config_dict, write_adapter
from raylign.actors.trainer_checkpoint import MODEL_FILE, atomic_save, write_hf_folder
from raylign.actors.value_head import drop_value_head
from raylign.config import Config
from raylign.models import resolve_model
from raylign.orchestrator.checkpoint import latest_checkpoint, read_driver_state, trainer_hashes, verify_checkpoint


class ExportError(ValueError):
    """A run folder that cannot be exported; the message names the folder and what is wrong."""


def export_run(run_dir: str | Path, out_dir: str | Path, adapter: bool = False) -> Path:
    run, out = str(run_dir), Path(out_dir)
    ckpt = latest_checkpoint(storage.join(run, "checkpoints"))
    if ckpt is None:
        raise ExportError(f"{run}: no complete checkpoint under {storage.join(run, 'checkpoints')} "
                          "(is it a raylign run folder or storage location?)")
    manifest = verify_checkpoint(ckpt)
    cfg = Config.model_validate(read_driver_state(ckpt)["config"])
    lora = cfg.trainer.lora
    weights = storage.join(ckpt, MODEL_FILE)
    data = storage.read_bytes(weights)
    digest = trainer_hashes(ckpt, manifest).get(MODEL_FILE)  # a remote checkpoint's weights are hashed here, read once
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ExportError(f"checkpoint {ckpt}: {MODEL_FILE} does not match its sha256 in the manifest "
                          "(altered or corrupted)")
    state = load(data)
    if lora.enabled != is_peft_state(state):
        raise ExportError(f"{weights}: its weights {'have' if is_peft_state(state) else 'lack'} LoRA "
                          f"adapters but the run's config says trainer.lora.enabled={lora.enabled}")
    model_path = resolve_model(cfg.model)
    if adapter:
        if not lora.enabled:
            raise ExportError(f"{run}: trained the full model (trainer.lora.enabled=false), so there is no adapter; "
                              f"export it with --merge")
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in adapter_state(state).items()}
        write_adapter(out, tensors, peft_config_dict(lora, model_path), atomic_save)
        return out
    hf = drop_value_head(state)
    hf = merged_hf_state(hf, lora.alpha, lora.r) if lora.enabled else hf
    tied = bool(json.loads((Path(model_path) / "config.json").read_text()).get("tie_word_embeddings"))
    write_hf_folder(hf, model_path, out, tied)
    return out
