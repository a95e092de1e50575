"""The arith-chain SFT preset (difficulty 6) as a user runs it: a `raylign train` subprocess with relative paths
on tiny-random-llama, 2 steps, evals with transformers generate; checks the exported model and what it trained on."""

import json
import re
import shutil

import yaml

from raylign.envs.arith import STEPS_INSTRUCTION
from tests.integration.helpers import ROOT, raylign_cli

STEP_LINE = re.compile(r"^\d+ [-+*] \d+ = \d+$")


def test_sft_arith_chain_preset_trains_on_worked_chains_and_exports_a_model(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    raylign_cli(tmp_path, "train", "configs/sft_arith_chain.yaml", "model.name=tiny-random-llama",
                "env.num_problems=32", "algorithm.batch_size=8", "train.steps=2", "train.eval_before=false",
                "train.eval_limit=4", "train.report=false", "generator.backend=hf", "generator.max_new_tokens=8",
                "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.micro_batch_tokens=256", "ray.num_cpus=4",
                "tracking.uri=sqlite:///mlflow.db", "output_dir=runs/sft-chain", timeout=300)
    run = tmp_path / "runs/sft-chain"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "sft" and summary["policy_version"] == 2
    assert summary["final_model_dir"] == str(run / "final_model")
    assert (run / "final_model/model.safetensors").is_file() and (run / "final_model/config.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["difficulty"] == 6

    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 8 and {r["step"] for r in rows} == {1, 2}
    assert len({r["example_id"] for r in rows}) == 16
    assert all(r["example_id"].startswith("arith-l6-train-") for r in rows)
    for r in rows:  # 3-5 worked steps, each on the previous result, and the Final line
        *steps, final = r["response"].split("\n")
        assert 3 <= len(steps) <= 5 and all(STEP_LINE.match(s) for s in steps), r["response"]
        assert all(b.startswith(a.rsplit("= ", 1)[1] + " ") for a, b in zip(steps, steps[1:]))
        assert final == "Final: " + steps[-1].rsplit("= ", 1)[1]

    # the evals pose level-6 test problems with the steps prompt, scored by the strict Final reward
    evals = [json.loads(line) for line in (run / "eval_after.jsonl").read_text().splitlines()]
    assert len(evals) == 4 and all(e["problem_id"].startswith("arith-l6-test-") for e in evals)
    assert all(e["prompt"].endswith("\n" + STEPS_INSTRUCTION) and e["reward"] in (0.0, 0.1, 1.0) for e in evals)
    assert all((e["reward"] > 0) == ("Final:" in e["completion"]) for e in evals)
