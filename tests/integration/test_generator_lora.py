"""GeneratorPool (vLLM on CPU, tiny-random-llama, lora_rank=8) serving peft LoRA adapter folders: greedy
log-probs equal the peft model's teacher-forced ones, the next version changes the output, one version loaded
twice from two folders serves the second (adapter ids are per load, not per version), a killed replica comes
back serving the adapter, and a rank above the engine's max is refused naming the folder."""

import os
import shutil
import signal
import time

import pytest
import ray
import torch

from raylign.chat import encode_chat
from raylign.config import GeneratorConfig, ModelConfig
from raylign.models import load_hf_model, load_tokenizer
from raylign.orchestrator.generator_pool import GeneratorPool
from tests.unit.test_generator_lora import peft_adapter  # the same saved adapter the unit tests merge

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
TOLERANCE = 0.15  # vLLM in bf16 against an fp32 forward, as in test_generators.py


def teacher_forced_logprobs(model, prompt_ids, token_ids):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {v: (str(root / f"v{v}"), peft_adapter(tiny_model, root / f"v{v}", seed=v)) for v in (1, 2)}


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model):
    started = time.perf_counter()
    pool = GeneratorPool(tiny_model, ModelConfig(name=tiny_model), GeneratorConfig(max_new_tokens=12, kv_cache_gb=0.25),
                         lora_rank=8)
    print(f"\nvLLM pool with enable_lora started in {time.perf_counter() - started:.1f} s")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    return encode_chat(load_tokenizer(tiny_model), MESSAGES)


def greedy(pool, prompt_ids):
    return pool.generate([prompt_ids], pool.spec(temperature=0.0, n=1, ignore_eos=True))[0][0]


def test_adapter_logprobs_equal_the_peft_models(pool, adapters, prompt_ids, tiny_model):
    base = greedy(pool, prompt_ids)
    folder, peft_model = adapters[1]
    [seconds] = pool.load_weights(folder, 1)
    out = greedy(pool, prompt_ids)
    assert out.policy_version == 1 and out.token_ids != base.token_ids and len(out.token_ids) == 12
    got = torch.tensor(out.logprobs)
    expected = teacher_forced_logprobs(peft_model, prompt_ids, out.token_ids)
    print(f"\nadapter load {seconds:.3f} s; max |vLLM - peft| log-prob {(got - expected).abs().max():.4f}")
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    without = teacher_forced_logprobs(load_hf_model(tiny_model, "float32"), prompt_ids, out.token_ids)
    assert (got - without).abs().max() > 10 * TOLERANCE  # the base model alone would miss by far more


def test_next_version_changes_output_and_a_reloaded_version_serves_its_new_folder(pool, adapters, prompt_ids,
                                                                                  tmp_path):
    v1 = greedy(pool, prompt_ids)
    folder, peft_model = adapters[2]
    pool.load_weights(folder, 2)
    v2 = greedy(pool, prompt_ids)
    assert v2.policy_version == 2 and v2.token_ids != v1.token_ids
    expected = teacher_forced_logprobs(peft_model, prompt_ids, v2.token_ids)
    torch.testing.assert_close(torch.tensor(v2.logprobs), expected, atol=TOLERANCE, rtol=0)
    # Version 2 again from another folder (a resume rewrites a version): an id per version would hit vLLM's
    # cache and keep serving the adapter above.
    shutil.copytree(adapters[1][0], tmp_path / "v2_again")
    pool.load_weights(str(tmp_path / "v2_again"), 2)
    again = greedy(pool, prompt_ids)
    assert again.token_ids == v1.token_ids and again.policy_version == 2
    torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(v1.logprobs), atol=1e-5, rtol=0)


def test_killed_replica_comes_back_serving_the_adapter(pool, prompt_ids):
    before = greedy(pool, prompt_ids)
    os.kill(ray.get(pool.actors[0].pid.remote()), signal.SIGKILL)
    after = greedy(pool, prompt_ids)  # the replacement replays load_weights(folder, 2)
    assert pool.fault_counters()["fault/generator_restarts"] == 1
    assert after.token_ids == before.token_ids and after.policy_version == 2 == pool.policy_versions()[0]


def test_rank_above_the_engines_max_is_refused_naming_the_folder(pool, tiny_model, tmp_path):
    peft_adapter(tiny_model, tmp_path / "r16", seed=3, r=16)
    with pytest.raises(ray.exceptions.RayTaskError,
                       match=f"LoRA adapter {tmp_path / 'r16'}: rank 16 is above this engine's max_lora_rank 8"):
        pool.load_weights(str(tmp_path / "r16"), 3)
    assert pool.policy_versions() == [2]
