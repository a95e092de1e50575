"""LoRA adapter folders on the transformers backend (tiny-random-llama, fp32): the merged weights give the peft
model's logits, a new version replaces the last instead of adding to it, a full-weights file turns the adapter
off, and a bad folder is one AdapterError naming it, with the model left as it was."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from raylign.actors.backends.adapters import AdapterError, read_adapter, serving_rank
from raylign.actors.backends.hf_backend import HFBackend
from raylign.config import GeneratorConfig, ModelConfig
from raylign.models import load_hf_model, resolve_model
from raylign.trainer_config import LORA_TARGETS
from raylign.types import SamplingSpec

PROMPT = [1, 17, 230, 4051, 99, 12]
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks in vllm 0.32


@pytest.fixture(scope="module")
def tiny():
    return resolve_model(ModelConfig(name="tiny-random-llama"))


def peft_adapter(tiny, folder, seed, r=8, **lora):
    """A peft LoRA model on the fp32 tiny model with random, non-zero B (peft starts B at zero), saved to folder."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=list(LORA_TARGETS), init_lora_weights=False, **lora)
    model = get_peft_model(load_hf_model(tiny, "float32"), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {v: (str(root / f"v{v}"), peft_adapter(tiny, root / f"v{v}", seed=v)) for v in (1, 2)}


@pytest.fixture
def backend(tiny):
    return HFBackend(tiny, ModelConfig(name=tiny, dtype="float32"), GeneratorConfig(backend="hf", batch_size=4))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def state(backend) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backend.model.state_dict().items()}


def test_merged_adapter_gives_the_peft_models_logits_and_logprobs(backend, adapters):
    folder, peft_model = adapters[1]
    base = logits(backend.model)
    backend.load_weights(folder, 1)
    expected = logits(peft_model)
    assert (expected - base).abs().max() > 0.5  # the adapter matters, so matching it is a test
    torch.testing.assert_close(logits(backend.model), expected, atol=1e-4, rtol=0)
    completion = backend.generate([PROMPT], SamplingSpec(temperature=0.0, max_new_tokens=6, ignore_eos=True))[0][0]
    ids = torch.tensor([PROMPT + completion.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(peft_model(ids).logits[0, len(PROMPT) - 1:-1], -1)
    ref = ref.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(completion.logprobs), ref, atol=1e-4, rtol=0)


def test_next_version_replaces_the_last_and_full_weights_turn_it_off(backend, adapters, tmp_path):
    pristine = state(backend)
    backend.load_weights(adapters[2][0], 2)
    v2_alone = state(backend)
    backend.load_weights(adapters[1][0], 1)
    backend.load_weights(adapters[2][0], 2)
    after = state(backend)
    assert all(torch.equal(after[k], v2_alone[k]) for k in after)  # merged from W0, never accumulated
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], pristine[q])
    full = {k: v for k, v in pristine.items() if k != "lm_head.weight"}  # the base, saved as a trainer would
    save_file(full, str(tmp_path / "w.safetensors"))
    backend.load_weights(str(tmp_path / "w.safetensors"), 3)
    assert all(torch.equal(v, pristine[k]) for k, v in state(backend).items())


def test_rslora_scales_by_alpha_over_sqrt_r(backend, tiny, tmp_path):
    peft_model = peft_adapter(tiny, tmp_path / "rs", seed=3, r=16, use_rslora=True)
    backend.load_weights(str(tmp_path / "rs"), 1)
    torch.testing.assert_close(logits(backend.model), logits(peft_model), atol=1e-4, rtol=0)


def broken(adapters, tmp_path, name, remove=None, edit_config=None, edit_tensors=None) -> str:
    """A copy of adapter 1 with one file removed or edited."""
    folder = tmp_path / name
    shutil.copytree(adapters[1][0], folder)
    if remove:
        (folder / remove).unlink()
    if edit_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(edit_config(config)))
    if edit_tensors:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file(edit_tensors(tensors), str(folder / "adapter_model.safetensors"))
    return str(folder)


BAD = {
    "no_weights": (dict(remove="adapter_model.safetensors"), "no adapter_model.safetensors"),
    "no_config": (dict(remove="adapter_config.json"), "no adapter_config.json"),
    "lacking_module": (dict(edit_tensors=lambda t: {k.replace("q_proj", "qx_proj"): v for k, v in t.items()}),
                       "targets model.layers.0.self_attn.qx_proj, which the model lacks"),
    "wrong_rank": (dict(edit_config=lambda c: {**c, "r": 4}), r"down_proj has lora_A \(8, 128\) .*needs \(4, 128\)"),
    "dora": (dict(edit_config=lambda c: {**c, "use_dora": True}), r"uses use_dora \(DoRA\)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_folder_is_one_error_naming_it_and_changes_nothing(backend, adapters, tmp_path, name):
    edits, problem = BAD[name]
    folder = broken(adapters, tmp_path, name, **edits)
    backend.load_weights(adapters[2][0], 2)
    before = state(backend)
    with pytest.raises(AdapterError, match=f"LoRA adapter {folder}: .*{problem}"):
        backend.load_weights(folder, 3)
    assert all(torch.equal(v, before[k]) for k, v in state(backend).items())


def test_rank_above_the_engines_max_is_refused(adapters):
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64)}
    with pytest.raises(AdapterError, match=f"LoRA adapter {adapters[1][0]}: rank 8 is above this engine's "
                                           "max_lora_rank 1"):
        read_adapter(adapters[1][0], shapes, max_rank=1)


def test_serving_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [serving_rank(r, VLLM_RANKS) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(AdapterError, match="LoRA rank 513 is above the largest rank vLLM serves \\(512\\)"):
        serving_rank(513, VLLM_RANKS)
