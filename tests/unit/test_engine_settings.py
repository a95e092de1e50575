"""The generators' engine settings (GPU fields of generator_config, vllm_backend.engine_kwargs) and the pure parts
of ray.placement, without starting vLLM or Ray."""

import pytest

from raylign.actors.backends.vllm_backend import engine_kwargs
from raylign.config import ConfigError, ModelConfig, load_config
from raylign.orchestrator.placement import bundle, in_group, trainer_strategy


def kwargs(*overrides: str) -> dict:
    cfg = load_config(None, list(overrides), environ={})
    return engine_kwargs("/models/m", cfg.model, cfg.generator, prefix_caching=False, lora={})


def test_cpu_replicas_run_eager_with_a_fixed_kv_cache():
    out = kwargs("generator.kv_cache_gb=0.5")
    assert out["enforce_eager"] is True and out["kv_cache_memory_bytes"] == 2**29
    assert "gpu_memory_utilization" not in out and "tensor_parallel_size" not in out
    assert out["logprobs_mode"] == "processed_logprobs" and out["model"] == "/models/m"


def test_gpu_replicas_capture_cuda_graphs_and_shard_over_their_gpus():
    out = kwargs("generator.num_gpus=2", "generator.tensor_parallel_size=2", "generator.gpu_memory_utilization=0.6")
    assert out["enforce_eager"] is False and out["gpu_memory_utilization"] == 0.6
    assert "kv_cache_memory_bytes" not in out  # it would override the utilisation in vLLM
    assert out["tensor_parallel_size"] == 2 and out["distributed_executor_backend"] == "mp"
    eager = kwargs("generator.num_gpus=1", "generator.cuda_graphs=false")
    assert eager["enforce_eager"] is True and eager["kv_cache_memory_bytes"] == 2**30


@pytest.mark.parametrize("overrides, expected", [
    (["generator.tensor_parallel_size=2"], ("generator.tensor_parallel_size=2 needs that many GPUs per replica: set "
                                            "generator.num_gpus=2 (it is 0)")),
    (["generator.num_gpus=1", "generator.tensor_parallel_size=4"], "set generator.num_gpus=4 (it is 1)"),
    (["generator.gpu_memory_utilization=0.5"], "generator.gpu_memory_utilization applies to GPU replicas"),
    (["generator.cuda_graphs=true"], "generator.cuda_graphs=true needs GPU replicas"),
    (["generator.backend=hf", "generator.num_gpus=2", "generator.tensor_parallel_size=2"],
     "are vLLM settings; generator.backend=hf has neither"),
    (["ray.placement=scatter"], "field 'ray.placement'"),
])
def test_engine_settings_that_cannot_work_are_refused(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, environ={})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_placement_bundles_and_strategies():
    assert bundle(1.0, 0.0, {}) == {"CPU": 1.0}
    assert bundle(2.0, 1.0, {"node_b": 0.01}) == {"CPU": 2.0, "GPU": 1.0, "node_b": 0.01}
    assert [trainer_strategy(p) for p in ("default", "pack", "spread")] == ["PACK", "PACK", "SPREAD"]
    assert in_group(None, 3) == {}
    assert ModelConfig().dtype == "bfloat16"  # engine_kwargs passes model.dtype through
    assert kwargs()["dtype"] == "bfloat16"
