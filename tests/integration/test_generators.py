"""GeneratorActor on a local Ray cluster, both backends, on tiny-random-llama: outputs, logprobs that
match a teacher-forced forward pass, weight loading with a policy version, and a 2-replica pool."""

import math

import pytest
import ray
import torch
from safetensors.torch import save_file

from raylign.actors.generator import GeneratorActor
from raylign.chat import encode_chat
from raylign.config import GeneratorConfig, ModelConfig
from raylign.models import load_hf_model, load_tokenizer
from raylign.orchestrator.generator_pool import GeneratorPool
from raylign.types import SamplingSpec

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def teacher_forced_logprobs(model, prompt_ids, token_ids, temperature=1.0):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)


def perturbed_weights(model, path, seed=1):
    gen = torch.Generator().manual_seed(seed)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype)).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path))
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module", params=["vllm", "hf"])
def actor(request, ray_session, tiny_model):
    cfg = GeneratorConfig(backend=request.param, max_new_tokens=12, kv_cache_gb=0.25)
    handle = GeneratorActor.remote(tiny_model, ModelConfig(name=tiny_model), cfg)
    ray.get(handle.ready.remote())
    yield request.param, handle
    ray.kill(handle)


def test_generate_shapes_and_logprobs(actor, tiny_model):
    backend, handle = actor
    tok = load_tokenizer(tiny_model)
    prompt_ids = encode_chat(tok, MESSAGES)
    groups = ray.get(handle.generate.remote([MESSAGES, prompt_ids], SamplingSpec(temperature=1.0, n=3, max_new_tokens=12)))
    assert [len(g) for g in groups] == [3, 3]
    model = load_hf_model(tiny_model, "bfloat16")
    for group in groups:
        for c in group:
            assert c.prompt_ids == prompt_ids  # messages were rendered with the same template
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in {"stop", "length"}
            assert c.finish_reason == "length" or c.token_ids[-1] == tok.eos_token_id
            assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
            expected = teacher_forced_logprobs(model, prompt_ids, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=0.15, rtol=0)
            assert c.policy_version == 0
    # Sampled continuations differ; the random model near-uniform over 49k tokens makes a tie impossible.
    assert len({tuple(c.token_ids) for c in groups[0]}) == 3


def test_logprobs_are_of_the_tempered_distribution_that_was_sampled(actor, tiny_model):
    """What the trainer computes at the batch's temperature, so KL-in-reward and importance ratios compare like
    with like (vLLM: processed_logprobs; raw log-probs would differ by several nats here)."""
    _, handle = actor
    prompt_ids = encode_chat(load_tokenizer(tiny_model), MESSAGES)
    [[c]] = ray.get(handle.generate.remote([prompt_ids], SamplingSpec(temperature=0.25, n=1, max_new_tokens=8)))
    model = load_hf_model(tiny_model, "float32")
    got = torch.tensor(c.logprobs)
    tempered = (got - teacher_forced_logprobs(model, prompt_ids, c.token_ids, temperature=0.25)).abs().mean().item()
    raw = (got - teacher_forced_logprobs(model, prompt_ids, c.token_ids)).abs().mean().item()
    print(f"mean |error|: tempered {tempered:.4f}, raw {raw:.4f}")
    assert tempered < 0.1 and raw > 5 * tempered


def test_greedy_is_deterministic_and_matches_transformers(actor, tiny_model):
    _, handle = actor
    tok = load_tokenizer(tiny_model)
    prompt_ids = encode_chat(tok, MESSAGES)
    spec = SamplingSpec(temperature=0.0, max_new_tokens=8)
    first, second = ray.get([handle.generate.remote([prompt_ids], spec), handle.generate.remote([prompt_ids], spec)])
    assert first[0][0].token_ids == second[0][0].token_ids
    model = load_hf_model(tiny_model, "bfloat16")
    ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)[0, len(prompt_ids):].tolist()
    assert first[0][0].token_ids == ref


def test_load_weights_changes_outputs_and_version(actor, tiny_model, tmp_path):
    _, handle = actor
    tok = load_tokenizer(tiny_model)
    prompt_ids = encode_chat(tok, MESSAGES)
    spec = SamplingSpec(temperature=0.0, max_new_tokens=8)
    before = ray.get(handle.generate.remote([prompt_ids], spec))[0][0]
    model = perturbed_weights(load_hf_model(tiny_model, "bfloat16"), tmp_path / "w.safetensors")
    seconds = ray.get(handle.load_weights.remote(str(tmp_path / "w.safetensors"), 7))
    assert seconds > 0 and ray.get(handle.policy_version.remote()) == 7
    after = ray.get(handle.generate.remote([prompt_ids], spec))[0][0]
    assert after.policy_version == 7
    assert after.token_ids != before.token_ids
    expected = teacher_forced_logprobs(model, prompt_ids, after.token_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), expected, atol=0.15, rtol=0)


def test_pool_balances_two_replicas_and_keeps_order(ray_session, tiny_model):
    cfg = GeneratorConfig(backend="hf", num_replicas=2, num_cpus=0.5, batch_size=2, max_new_tokens=4)
    pool = GeneratorPool(tiny_model, ModelConfig(name=tiny_model), cfg)
    try:
        prompts = [[1, 2, 3 + i] for i in range(9)]
        groups = pool.generate(prompts, pool.spec(), on_done=lambda n: None)
        assert [g[0].prompt_ids for g in groups] == prompts
        assert {g[0].replica for g in groups} == {0, 1}
        assert pool.policy_versions() == [0, 0]
    finally:
        pool.shutdown()
