"""The policy-gradient variant presets (GSPO, CISPO, DAPO, REINFORCE++) on the real stack: 2 steps each against
one module-scoped cluster (2 Ray Train workers on gloo, transformers-generate generator, vowel reward), and
the DAPO preset as a user runs it: `python -m raylign train configs/dapo_arith.yaml` from a temporary working
directory with relative paths, its files and its filter metrics in MLflow."""

import json
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

from raylign.algorithms.dapo import overlong_penalty
from raylign.algorithms.registry import ALGORITHMS
from raylign.config import load_config
from raylign.envs import make_env
from raylign.models import load_tokenizer
from raylign.orchestrator.checkpoint import PromptStream
from raylign.orchestrator.rl_cluster import RayCluster
from tests.integration.helpers import CLI_GRPO, ROOT, raylign_cli, tiny_config, vowel_reward

SMALL_STEP = ["algorithm.prompts_per_step=2", "algorithm.group_size=4"]


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model, tmp_path_factory):
    cfg = tiny_config(tiny_model, tmp_path_factory.mktemp("pgv"), "generator.backend=hf")
    rc = RayCluster(cfg, tiny_model, load_tokenizer(tiny_model), run_id="pgv",
                    storage_dir=str(tmp_path_factory.mktemp("ray_train")), reward_fn=vowel_reward)
    rc.prompt_source = PromptStream(make_env(cfg.env, cfg.dataset).problems("train"), 2, seed=0).take
    yield cfg, rc
    rc.shutdown()


def _algorithm(preset: str, *extra: str):
    # only the preset's algorithm section is used; the tiny cluster has generator.max_new_tokens=8
    return load_config(ROOT / "configs" / preset, [*SMALL_STEP, "generator.max_new_tokens=8", *extra],
                       environ={}).algorithm


def _two_steps(rc, algo) -> list:
    problems = make_env(rc.cfg.env, rc.cfg.dataset).problems("train")[:algo.prompts_per_step]
    version, state, outs = rc.version, {}, []
    for step in range(2):
        rc.reseed(step)
        outs.append(ALGORITHMS[algo.name].step(rc, problems, algo, state))
        assert {c.policy_version for g in outs[-1].groups for c in g} == {version + step}
        assert len(outs[-1].groups) == algo.prompts_per_step  # the batch has the configured size
    assert rc.version == version + 2
    return outs


@pytest.mark.parametrize("preset, loss", [("gspo_arith.yaml", "gspo"), ("cispo_arith.yaml", "cispo")])
def test_gspo_and_cispo_presets_update_off_the_sampling_policy(cluster, preset, loss):
    _, rc = cluster
    algo = _algorithm(preset)
    assert algo.policy_loss == loss and algo.minibatches == 2
    for out in _two_steps(rc, algo):
        m = out.metrics
        assert m["train/optimizer_steps"] > 0 and m["train/grad_norm"] > 0 and torch.isfinite(torch.tensor(m["loss/total"]))
        # the second minibatch sees weights the first one moved (lr 1e-3): its ratios are no longer 1
        assert m["ratio/mean"] != 1.0 and 0.5 < m["ratio/mean"] < 2.0
        assert 0.0 <= m["clip/fraction"] <= 1.0


def test_reinforce_pp_normalises_over_the_batch(cluster):
    _, rc = cluster
    algo = _algorithm("reinforcepp_arith.yaml")
    for out in _two_steps(rc, algo):
        adv = out.advantages_P_G.flatten()
        rewards = torch.tensor([s.reward for g in out.scores for s in g], dtype=torch.float64)
        want = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        torch.testing.assert_close(adv, want)
        assert out.metrics["train/grad_norm"] > 0


def test_dapo_preset_filters_and_masks_on_the_real_stack(cluster):
    _, rc = cluster
    algo = _algorithm("dapo_arith.yaml", "algorithm.overlong_buffer=4")
    assert algo.dynamic_sampling and algo.overlong_filter and algo.clip_eps_high == 0.28
    for out in _two_steps(rc, algo):
        m = out.metrics
        flat = [c for g in out.groups for c in g]
        kept = [c for c in flat if c.finish_reason != "length"]
        assert m["filter/truncated_masked"] == len(flat) - len(kept)
        assert m["train/tokens"] == sum(len(c.token_ids) for c in kept)  # truncated samples add no loss tokens
        assert 0 <= m["filter/extra_generate_calls"] <= algo.max_extra_generate_calls
        lengths = torch.tensor([[float(len(c.token_ids)) for c in g] for g in out.groups])
        shaped = torch.tensor([[s.reward for s in g] for g in out.scores], dtype=torch.float64) \
            + overlong_penalty(lengths, 8, 4)
        tied = int((shaped == shaped[:, :1]).all(-1).sum())
        assert tied == m["filter/refilled_groups"]  # tied groups are trained on only to fill a short batch
        if tied:
            assert m["filter/extra_generate_calls"] == algo.max_extra_generate_calls


def test_dapo_cli_run_writes_its_files_and_filter_metrics(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    overrides = [a for a in CLI_GRPO if not a.startswith(("train.steps", "train.checkpoint_every"))]
    raylign_cli(tmp_path, "train", "configs/dapo_arith.yaml", *overrides, "train.steps=2",
                "algorithm.overlong_buffer=4", "output_dir=runs/dapo")
    run = tmp_path / "runs/dapo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["policy_version"] == 2 and summary["algorithm"] == "grpo"
    assert (run / "final_model/model.safetensors").is_file() and (run / "checkpoints/step-000002").is_dir()
    saved = load_config(run / "config.yaml", environ={})
    assert saved.algorithm.dynamic_sampling and saved.algorithm.overlong_buffer == 4
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4 and {r["step"] for r in rows} == {1, 2}  # always P groups of G

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow_run_id"]
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in ("filter/dropped_groups", "filter/extra_generate_calls", "filter/refilled_groups",
                         "filter/truncated_masked", "reward/overlong_penalty")}
    assert all(len(v) == 2 for v in history.values()), history
    for step in (1, 2):
        group_rows = [[r for r in rows if r["step"] == step and r["prompt_id"] == p]
                      for p in dict.fromkeys(r["prompt_id"] for r in rows if r["step"] == step)]
        shaped = [[r["reward"] + float(overlong_penalty(torch.tensor([r["tokens"]]), 8, 4)) for r in g]
                  for g in group_rows]
        tied = sum(len(set(g)) == 1 for g in shaped)
        assert history["filter/refilled_groups"][step - 1] == tied
        calls = history["filter/extra_generate_calls"][step - 1]
        assert 0 <= calls <= 2 and history["filter/dropped_groups"][step - 1] >= 0
        if tied:  # a short batch is filled only after the cap on extra calls
            assert calls == 2
    assert client.get_run(run_id).data.params["algorithm.dynamic_sampling"] == "true"
