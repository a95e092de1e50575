"""AutoDSPy on the real stack: DSPy programs executed on a SmolLM2 task model served by a vLLM generator actor
(through LMService and the reward actors), the judge sharing that pool; and `raylign train` of the GRPO preset
as a user runs it (a subprocess, relative paths), with tiny-random-llama as the policy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raylign.config import load_config
from raylign.envs import make_env
from raylign.orchestrator.lm_service import service_counters, start_services, stop_services
from raylign.orchestrator.reward_pool import RewardPool

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ACTIONS = ["Predict | question -> answer", "CoT | question -> answer", "Predict | problem -> solution",
           "Foo | question -> answer", "CoT | question -> answer. Done", "no pipeline here"]
WARM_ACTIONS = ["CoT | question -> answer", "Predict | question -> answer"]


@pytest.fixture(scope="module")
def scored(ray_session):
    """Four problems of the offline mix (two math, two two-hop), each answered with every action in ACTIONS."""
    cfg = load_config(ROOT / "configs/autodspy_grpo.yaml", [
        "dspy.max_new_tokens=48", "reward.judge.max_new_tokens=16", "generator.kv_cache_gb=0.25", "model.dtype=float32",
        "dspy.num_math=2", "dspy.num_multihop=2", "reward.timeout_s=600"], environ={}).absolutized()
    problems = make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg).problems("test")
    services = start_services(cfg)
    pool = RewardPool(cfg.env, cfg.dataset, cfg.reward, full_cfg=cfg, services=services)
    # arith with the same judge service: the judge stage for math envs
    arith_cfg = load_config(ROOT / "configs/grpo_arith.yaml", [
        "reward.judge.model=smollm2-135m-instruct", "reward.judge.max_new_tokens=16", "reward.timeout_s=120"],
        environ={}).absolutized()  # a judged sample waits for the judge: far past arith's 5 s default
    arith = RewardPool(arith_cfg.env, arith_cfg.dataset, arith_cfg.reward, full_cfg=arith_cfg,
                       services={"judge": services["judge"]})
    try:
        items = [(p, a) for p in problems for a in ACTIONS]
        scores = pool.score(items)
        counters = service_counters(services)
        problem = make_env(arith_cfg.env, arith_cfg.dataset, cfg=arith_cfg).problems("test")[0]
        arith_scores = arith.score([(problem, problem.answer), (problem, str(int(problem.answer) + 1)), (problem, "")])
        after = service_counters(services)
        yield problems, items, scores, counters, pool.counters(), (arith_scores, after["judge_model/requests"]
                                                                   - counters["judge_model/requests"])
    finally:
        pool.shutdown()
        arith.shutdown()
        stop_services(services)


def test_dspy_programs_run_on_the_task_model_and_bad_actions_score_zero(scored):
    problems, items, scores, counters, events, _ = scored
    assert {p.meta["kind"] for p in problems} == {"math", "multihop"} and events == {}
    by_action = {a: [s for (_, b), s in zip(items, scores) if b == a] for a in ACTIONS}
    reasons = {"Foo | question -> answer": "unknown_module", "CoT | question -> answer. Done": "trailing_text",
               "no pipeline here": "malformed"}
    for action, reason in reasons.items():
        for s in by_action[action]:
            assert s.reward == 0.0 and not s.format_ok and s.info["components"][f"dspy_parse_{reason}"] == 1.0
            assert s.info["tags"]["pipeline"] == "unparsed"
    parsed = [s for a in ACTIONS[:3] for s in by_action[a]]
    assert all(s.format_ok and s.info["components"]["dspy_lm_calls"] >= 1 for s in parsed)
    assert {s.info["tags"]["pipeline"] for s in by_action["CoT | question -> answer"]} == {
        "ChainOfThought: question to answer"}
    assert all(s.prediction is not None for s in parsed)  # the task model answered (raw text if off-format)
    for s in parsed:  # correct is the regex stage's exact verdict; the judge only lifts a zero
        assert s.correct == (s.info["components"]["dspy_regex"] == 1.0)
        assert s.info["components"]["dspy_judged"] == float(s.info["components"]["dspy_regex"] == 0.0)


def test_the_judge_is_called_only_when_the_regex_stage_fails(scored):
    _, _, scores, counters, _, _ = scored
    program_calls = sum(s.info["components"].get("dspy_lm_calls", 0.0) for s in scores)
    judged = sum(s.info["components"].get("dspy_judged", 0.0) for s in scores)
    regex_failed = sum(1 for s in scores if s.format_ok and s.info["components"]["dspy_regex"] == 0.0)
    assert judged == regex_failed > 0
    # one pool serves both roles: every conversation it got was a program's call or a judge's
    assert counters["task_model/requests"] == counters["judge_model/requests"] == program_calls + judged
    # concurrent samples' calls were batched: far fewer generate calls than conversations
    assert counters["task_model/calls"] < counters["task_model/requests"] / 3


def test_math_envs_use_the_judge_stage_on_wrong_answers_only(scored):
    (right, off, silent), judge_requests = scored[-1]
    assert right.reward == 1.0 and "judge/called" not in right.info
    assert silent.reward == 0.0 and "judge/called" not in silent.info  # nothing to judge
    assert off.info["judge/called"] == 1 and not off.correct and off.info["judge/reply"]
    assert off.reward == (0.1 if off.info["judge/verdict"] is None else max(0.1, off.info["judge/verdict"]))
    assert judge_requests == 1.0


def test_autodspy_grpo_preset_from_the_cli(tmp_path):
    """The GRPO preset as a user runs it. An SFT warm-up on two actions (same run) teaches tiny-random-llama to
    write valid pipelines, so DSPy executes them on the task model inside the GRPO steps and the eval."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    cfg = load_config(ROOT / "configs/autodspy_grpo.yaml", ["dspy.num_math=4", "dspy.num_multihop=4"], environ={})
    train = make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg).problems("train")
    warm = [{"prompt": p.messages, "completion": WARM_ACTIONS[i % 2]} for i, p in enumerate(train)]
    (tmp_path / "actions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in warm))
    args = ["configs/autodspy_grpo.yaml", "model.name=tiny-random-llama", "train.steps=2",
            "algorithm.prompts_per_step=2", "dspy.num_math=4", "dspy.num_multihop=4", "train.eval_limit=4",
            "dspy.max_new_tokens=16", "generator.max_new_tokens=12", "generator.kv_cache_gb=0.25",
            "reward.judge.max_new_tokens=8",  # the task model and judge now run: short replies keep it quick
            # 30 steps at lr 5e-3 take the tiny model's loss on the actions to ~0.02 (measured in-process)
            "train.sft_warmup_steps=30", "train.sft_warmup_data=actions.jsonl", "train.sft_warmup_batch_size=4",
            "trainer.lr=5e-3", "trainer.warmup_steps=0",
            "trainer.micro_batch_tokens=2048", "ray.num_cpus=6", "tracking.uri=sqlite:///mlflow.db", "model.dtype=float32",
            # transformers generate for the policy and the task model: hf actors start in half the time of vLLM
            # (the fixture's tests run the task model on vLLM)
            "generator.backend=hf", "output_dir=runs/autodspy"]
    proc = subprocess.run([sys.executable, "-m", "raylign", "train", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/autodspy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["sft_warmup_steps"] == 30 and summary["policy_version"] == 32
    assert (run / "pipelines.png").stat().st_size > 10_000  # the distribution before and after, as a plot
    rows = [json.loads(line) for line in (run / "eval_after.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["kind"] in ("math", "multihop") and r["pipeline"] for r in rows)
    assert {r["pipeline"] for r in rows} <= {"ChainOfThought: question to answer", "Predict: question to answer"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    keys = [k for k in client.get_run(summary["mlflow_run_id"]).data.metrics if k.startswith("eval/pipeline/")]
    shares = {step: {} for step in (0, 32)}  # the pipeline distribution before (all unparsed) and after the run
    for key in keys:
        for m in client.get_metric_history(summary["mlflow_run_id"], key):
            shares[m.step][key] = m.value
    for kind in {r["kind"] for r in rows}:
        for step in (0, 32):
            assert sum(v for k, v in shares[step].items() if k.startswith(f"eval/pipeline/{kind}/")) == pytest.approx(1.0)
        assert shares[0][f"eval/pipeline/{kind}/unparsed"] == 1.0  # the untrained tiny model writes no action
    grpo = [r for r in map(json.loads, (run / "rollouts.jsonl").read_text().splitlines()) if r["step"] > 30]
    parsed = [r["components"] for r in grpo if r["components"].get("dspy_parsed") == 1.0]
    assert len(grpo) == 2 * 2 * 4 and parsed, [r["completion"] for r in grpo]
    assert all(c["dspy_lm_calls"] >= 1 for c in parsed)  # each parsed pipeline called the task model
    assert not any(c.get("dspy_judged") for c in parsed if c.get("dspy_regex") == 1.0)  # judge only on a regex 0
    tokens = summary["cost"]["tokens_generated"]
    assert tokens["dspy_task_model"] > 0  # DSPy ran the parsed pipelines on the task model
    assert summary["faults"]["fault/task_model_restarts"] == 0.0
