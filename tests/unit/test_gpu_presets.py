"""The 1.5B and 7B GPU presets: each fits an 80 GB GPU by `raylign plan`, and the memory its comment states is the
plan's current estimate. The models' shapes are their public config.json values (tests/data; Qwen2.5-1.5B and
-7B-Instruct: 1,543,714,304 and 7,615,616,512 parameters, counted exactly by the plan). One test runs
`raylign plan` on a preset as a user would, from the repo root with relative paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raylign.config import load_config
from raylign.memory_plan import GiB, model_shape, plan, total_params

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"grpo_gsm8k_1.5b_8gpu": "1.5b", "grpo_gsm8k_1.5b_2x8gpu": "1.5b", "grpo_gsm8k_7b_8gpu": "7b",
           "grpo_gsm8k_7b_2x8gpu": "7b"}
GPU_GIB, UTILISATION = 80, 0.85


def shape(size: str):
    return model_shape(json.loads((ROOT / f"tests/data/qwen2.5-{size}/config.json").read_text()))


def memory_comment(trainer_gib: float, unit: str, weights_gib: float) -> list[str]:
    kv = UTILISATION * GPU_GIB - weights_gib - 1.0
    return [f"# Memory per {GPU_GIB} GB GPU (`raylign plan`, an estimate): trainer worker {trainer_gib:.1f} GiB;",
            f"# {unit} {weights_gib:.1f} GiB of weights + 1 GiB CUDA context, ~{kv:.0f} GiB left for the KV cache."]


def test_the_shapes_count_the_published_parameters():
    assert total_params(shape("1.5b")) == 1_543_714_304 and total_params(shape("7b")) == 7_615_616_512


@pytest.mark.parametrize("name", PRESETS)
def test_each_gpu_preset_fits_an_80gb_gpu_and_states_its_plan(name):
    path = ROOT / f"configs/{name}.yaml"
    cfg = load_config(path, environ={})
    assert cfg.trainer.use_gpu and cfg.generator.num_gpus == cfg.generator.tensor_parallel_size
    gpus_per_node = 8
    two_nodes = "2x8gpu" in name
    used = cfg.trainer.num_workers + cfg.generator.num_replicas * cfg.generator.num_gpus
    assert used == gpus_per_node * (2 if two_nodes else 1)  # every GPU has a role
    p = plan(cfg, shape(PRESETS[name]))
    trainer, generator = p.roles[0], p.roles[1]
    assert trainer.total("GPU") < 0.9 * GPU_GIB * GiB
    weights = generator.terms[0].bytes
    assert weights + GiB < UTILISATION * GPU_GIB * GiB
    unit = "generator GPU" if cfg.generator.tensor_parallel_size > 1 else "generator replica"
    expected = memory_comment(trainer.total("GPU") / GiB, unit, weights / GiB)
    lines = path.read_text().splitlines()
    assert all(line in lines for line in expected), "\n".join(expected)


def test_raylign_plan_prints_the_7b_presets_memory_from_the_cli():
    out = subprocess.run([sys.executable, "-m", "raylign", "plan", "configs/grpo_gsm8k_7b_8gpu.yaml",
                          "model.name=tests/data/qwen2.5-7b"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    comment = memory_comment(48.87, "generator GPU", 7.09)[0]  # the preset's own first memory line
    assert comment in (ROOT / "configs/grpo_gsm8k_7b_8gpu.yaml").read_text().splitlines()
    assert "generator GPU (x4)" in lines and "7,615,616,512 params" in lines[0]
    assert any(line.split()[:3] == ["total", "per", "worker"] and "GPU 48.87 GiB" in line for line in lines)
    assert any(line.split()[:3] == ["total", "per", "GPU"] and "GPU 9.09 GiB" in line for line in lines)
