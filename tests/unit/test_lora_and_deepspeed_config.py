"""LoRA name and merge conversions against peft itself, and the DeepSpeed JSON raylign builds from a config."""

import re

import pytest
import torch
from safetensors.torch import load_file

from raylign.actors.deepspeed_backend import deepspeed_config
from raylign.actors.lora import adapter_state, apply_lora, merged_hf_state, peft_config_dict
from raylign.config import ConfigError, LoraConfig, ModelConfig, TrainerConfig, load_config
from raylign.models import load_hf_model, resolve_model


@pytest.fixture(scope="module")
def tiny():
    return resolve_model(ModelConfig(name="tiny-random-llama"))


def trained_lora(tiny, cfg: LoraConfig):
    model = apply_lora(load_hf_model(tiny, "float32"), cfg, seed=0)
    with torch.no_grad():  # B starts at zero; give it values so the merge has something to fold in
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_only_adapters_train_and_the_seed_fixes_their_start(tiny):
    cfg = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    a, b = (apply_lora(load_hf_model(tiny, "float32"), cfg, seed=3) for _ in range(2))
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # same draw on every rank
    with pytest.raises(ValueError, match=r"target_modules names \['qkv'\]"):
        apply_lora(load_hf_model(tiny, "float32"), LoraConfig(enabled=True, target_modules=["qkv"]), seed=0)


def test_merged_state_equals_peft_merge_and_unload(tiny):
    cfg = LoraConfig(enabled=True, r=4, alpha=12)
    model = trained_lora(tiny, cfg)
    merged = merged_hf_state({k: v.clone() for k, v in model.state_dict().items()}, cfg.alpha, cfg.r)
    reference = model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) < 1e-6
    plain = load_hf_model(tiny, "float32")
    changed = [k for k in merged if not torch.equal(merged[k], plain.state_dict()[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)


def test_adapter_state_is_what_peft_saves(tiny, tmp_path):
    cfg = LoraConfig(enabled=True, r=4, alpha=8)
    model = trained_lora(tiny, cfg)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = adapter_state(model.state_dict())
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)
    config = peft_config_dict(cfg, tiny)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert set(config["target_modules"]) == set(cfg.target_modules)


def test_deepspeed_json_from_the_trainer_config():
    cfg = TrainerConfig(backend="deepspeed", max_grad_norm=0.5,
                        deepspeed={"zero_stage": 3, "offload_params": True,
                                   "config": {"zero_optimization": {"reduce_bucket_size": 1000}}})
    ds = deepspeed_config(cfg, hidden=64)
    # the passthrough's bucket wins over the one sized from the hidden size; the others are 0.9 H^2 and 10 H
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 3686,
                                       "stage3_param_persistence_threshold": 640,
                                       "stage3_max_live_parameters": 24 * 64 * 64,
                                       "stage3_max_reuse_distance": 24 * 64 * 64}
    zero2 = deepspeed_config(TrainerConfig(backend="deepspeed"), hidden=576)["zero_optimization"]
    assert zero2 == {"stage": 2, "reduce_bucket_size": 576 * 576, "allgather_bucket_size": 576 * 576}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_accumulation_steps"] == 1 and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    zero0 = deepspeed_config(TrainerConfig(backend="deepspeed", deepspeed={"zero_stage": 0}), hidden=64)
    # stage 0: fp32 parameters under autocast and the plain optimizer, clipped by raylign
    assert zero0["bf16"] == {"enabled": False} and zero0["gradient_clipping"] == 0.0 and "data_types" not in zero0
    assert zero0["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("override, message", [
    ("trainer.deepspeed.config={optimizer: {type: Adam}}", "trainer.deepspeed.config.optimizer is set by raylign from trainer.lr"),
    ("trainer.deepspeed.config={zero_optimization: {stage: 1}}", "disagrees with trainer.deepspeed.zero_stage (2)"),
    ("trainer.deepspeed.offload_params=true", "offload_params needs zero_stage 3"),
    ("trainer.lora.quantize=4bit", "needs a GPU: set trainer.use_gpu=true"),
    ("trainer.lora.target_modules=[]", "trainer.lora.target_modules is empty"),
])
def test_bad_trainer_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])
