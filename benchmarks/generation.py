"""Generation throughput: GeneratorActor (vLLM) vs bare `vllm.LLM.generate` vs the transformers backend.

SmolLM2-135M-Instruct, bf16, 64 prompts x 128 new tokens, greedy (so every engine produces the same tokens
and the comparison is fair). Also measures the machine's bf16 GEMM rate and the fraction of it generation
reaches: tok/s x 2 x params / GEMM FLOP/s. Each part runs in its own process so engines never overlap.
Writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import run_part  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS, NEW_TOKENS = 64, 128


def _setup():
    from raylign.chat import encode_chat
    from raylign.config import DatasetConfig, EnvConfig, ModelConfig
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model

    path = resolve_model(ModelConfig(name="smollm2-135m-instruct"))
    tok = load_tokenizer(path)
    problems = make_env(EnvConfig(name="arith", difficulty=3, num_problems=PROMPTS), DatasetConfig()).problems("test")
    return path, [encode_chat(tok, p.messages) for p in problems[:PROMPTS]]


def _count(groups) -> int:
    return sum(len(c.token_ids) for g in groups for c in g)


def part_bare() -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, prompts = _setup()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=1024, seed=0, kv_cache_memory_bytes=2**30,
              enforce_eager=True, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:4], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def part_actor(backend: str) -> dict:
    import ray

    from raylign.actors.generator import GeneratorActor
    from raylign.config import GeneratorConfig, ModelConfig
    from raylign.types import SamplingSpec

    path, prompts = _setup()
    ray.init(num_cpus=8, include_dashboard=False)
    cfg = GeneratorConfig(backend=backend, kv_cache_gb=1.0, enable_prefix_caching=False, batch_size=64)
    actor = GeneratorActor.remote(path, ModelConfig(name=path), cfg)
    ray.get(actor.ready.remote())
    spec = SamplingSpec(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ray.get(actor.generate.remote(prompts[:4], spec))  # warm-up
    start = time.perf_counter()
    groups = ray.get(actor.generate.remote(prompts, spec))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"tokens": _count(groups), "seconds": seconds, "tok_s": _count(groups) / seconds}


def part_gemm() -> dict:
    import torch

    a, b = torch.randn(2048, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    seconds = time.perf_counter() - start
    return {"flops": 2 * 2048**3 * reps / seconds, "threads": torch.get_num_threads()}


def part_params() -> dict:
    from safetensors import safe_open

    path, _ = _setup()
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        return {"params": sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())}


PARTS = {"bare": part_bare, "actor": lambda: part_actor("vllm"), "hf": lambda: part_actor("hf"),
         "gemm": part_gemm, "params": part_params}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(PARTS))
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(PARTS[args.part]()))
        return
    parts = {name: run_part(__file__, name) for name in ["params", "gemm", "bare", "actor", "hf"]}
    params, gemm = parts["params"]["params"], parts["gemm"]["flops"]
    result = {
        "model": "smollm2-135m-instruct", "dtype": "bfloat16", "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
        "params": params,
        "actor_tok_s": parts["actor"]["tok_s"], "bare_vllm_tok_s": parts["bare"]["tok_s"], "hf_tok_s": parts["hf"]["tok_s"],
        "actor_over_bare": parts["actor"]["tok_s"] / parts["bare"]["tok_s"],
        "gemm_bf16_flops": gemm,
        "gemm_fraction": parts["actor"]["tok_s"] * 2 * params / gemm,
        "bare_gemm_fraction": parts["bare"]["tok_s"] * 2 * params / gemm,
        "parts": parts, "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "parts"}, indent=2))


if __name__ == "__main__":
    main()
