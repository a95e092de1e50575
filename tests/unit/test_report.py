"""The HTML report from a recorded run folder (report_fixture.write_run): what it reads, what it writes."""

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raylign.report import working_roles, write_prompt_plot, write_report
from raylign.report.data import (
    accuracy_change,
    accuracy_matrix,
    eval_changes,
    load_run,
    prompt_accuracy,
    prompt_order,
    prompt_trend,
    read_jsonl,
    sampled_steps,
    series,
    std,
)
from raylign.report.page import embedded_json, rollout_rows
from raylign.report.plots import heatmap_groups, panel_keys
from tests.unit.report_fixture import TOOL, write_run, write_sparse_run

ROOT = Path(__file__).resolve().parents[2]


def _embedded_rows(index: Path) -> list[dict]:
    text = index.read_text()
    data = re.search(r'<script type="application/json" id="rollout-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(data.replace("<\\/", "</"))


def test_load_run_reads_steps_evals_rollouts_and_command(tmp_path):
    run = load_run(write_run(tmp_path / "run", steps=3, prompts=4, group=2))
    assert sorted(run.steps) == [1, 2, 3] and run.algorithms == {1: "grpo", 2: "grpo", 3: "grpo"}
    assert run.evals == {"eval_before": (0, {"accuracy": 0.25}), "eval_after": (3, {"accuracy": 0.75})}
    assert len(run.rollouts) == 24 and run.rollouts[0]["prompt_id"] == "p0"
    assert run.command == "cd /home/user && raylign train configs/grpo_arith.yaml train.steps=3"
    assert series(run, "timing/generate") == ([1, 2, 3], [2.0, 3.0, 4.0])
    assert "name: fixture" in run.config_text


def test_per_prompt_accuracy_table_and_trends(tmp_path):
    run = load_run(write_run(tmp_path / "run", steps=3, prompts=4, group=2))
    table = prompt_accuracy(run.rollouts)
    assert table["p0"] == {1: 0.0, 2: 1.0, 3: 1.0}
    assert table["p1"] == {1: 1.0, 2: 0.0, 3: 0.0}
    assert table["p2"] == {1: 0.5, 2: 0.5, 3: 0.5}
    assert [prompt_trend(table[p]) for p in ("p0", "p1", "p2")] == ["learned", "got worse", "stuck"]
    assert prompt_trend({4: 1.0}) == "seen once"
    assert [accuracy_change(table[p]) for p in ("p0", "p1", "p2")] == [1.0, -1.0, 0.0]
    assert prompt_order(table) == ["p0", "p2", "p3", "p1"]  # by last minus first: learned, stuck, got worse


def _cells(matrix: list[list[float]]) -> list[list[float | None]]:
    return [[None if math.isnan(x) else x for x in row] for row in matrix]


def test_heat_map_matrix_has_every_step_and_blanks_where_a_prompt_was_not_sampled(tmp_path):
    table = prompt_accuracy(load_run(write_sparse_run(tmp_path / "run")).rollouts)
    assert table["s"] == {1: 0.0, 3: 0.5, 5: 1.0}
    order, steps = prompt_order(table), sampled_steps(table)
    assert order == ["s", "u", "v", "t"] and steps == [1, 2, 3, 4, 5]
    assert _cells(accuracy_matrix(table, order, steps)) == [
        [0.0, None, 0.5, None, 1.0],  # s: sampled at steps 1, 3, 5 only; steps 2 and 4 blank, not 0
        [0.5, 0.5, 0.5, 0.5, 0.5],
        [None, None, None, 0.5, None],
        [None, 1.0, None, 0.5, None]]
    assert heatmap_groups(table) == {"improved": ["s"], "unchanged": ["u", "v"], "got worse": ["t"]}
    text = write_report([tmp_path / "run"]).read_text()
    assert ("Of the run&#x27;s 4 scored prompts, comparing the last step each was sampled with the first: 1 learned, "
            "1 got worse, 1 stuck, 1 seen once.") in text and "capped" not in text


def test_heat_map_rows_are_capped_evenly_across_improved_worse_and_unchanged():
    table = {"a": {1: 0.0, 2: 1.0}, "b": {1: 0.5, 2: 0.75}, "c": {1: 1.0, 2: 0.0}, "d": {1: 0.5, 2: 0.5},
             "e": {1: 0.5}, "f": {1: 0.2, 2: 0.2, 3: 0.2}, "g": {1: 1.0, 2: 0.5}}
    assert prompt_order(table) == ["a", "b", "f", "d", "e", "g", "c"]
    # 4 rows: one each in turn (improved, got worse, unchanged), the fourth to improved; worse keeps the worst
    assert heatmap_groups(table, most=4) == {"improved": ["a", "b"], "unchanged": ["f"], "got worse": ["c"]}
    assert heatmap_groups(table, most=6) == {"improved": ["a", "b"], "unchanged": ["f", "d"], "got worse": ["g", "c"]}
    assert heatmap_groups({"a": {1: 0.0, 2: 1.0}, "d": {1: 0.5}}, most=1) == {
        "improved": ["a"], "unchanged": [], "got worse": []}


def test_capped_heat_map_says_which_prompts_it_shows(tmp_path):
    text = write_report([write_run(tmp_path / "run", prompts=64)]).read_text()  # p0 learns, p1 worsens, 62 stuck
    assert ("The map is capped at 60 rows, shared evenly among the prompts that improved most (1), the unchanged "
            "ones sampled most often (58) and those that got worse most (1)") in text
    assert "Of the run&#x27;s 64 scored prompts" in text and "1 learned, 1 got worse, 62 stuck, 0 seen once" in text


def test_held_out_changes_and_steps_rebuilt_without_metrics_jsonl(tmp_path):
    folder = write_run(tmp_path / "run", steps=2, prompts=2, group=2)
    assert eval_changes(load_run(folder)) == {"fixed": 1, "broken": 0, "still right": 1, "still wrong": 0}
    (folder / "metrics.jsonl").unlink()
    run = load_run(folder)
    # step 1: p0 wrong twice, p1 right twice -> mean 0.5; summary.json still gives the evals
    assert run.steps[1] == {"reward/mean": 0.5, "reward/std": pytest.approx(std([0.0, 0.0, 1.0, 1.0])),
                            "accuracy/train": 0.5}
    assert run.evals["eval_after"] == (2, {"accuracy": 0.75})


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_report_page_names_accuracy_and_embeds_every_rollout(tmp_path):
    index = write_report([write_run(tmp_path / "run", before=0.125, after=0.5)])
    text = index.read_text()
    assert index == tmp_path / "run/report/index.html"
    assert '<b id="acc-before">12.5%</b>' in text and '<b id="acc-after">50.0%</b>' in text
    files = {p.name for p in index.parent.iterdir()}
    assert {"accuracy.png", "reward.png", "reward_distribution.png", "timing.png", "prompts.png",
            "kl-entropy-response-length-truncation.png"} <= files
    assert "preference-dpo.png" not in files  # a GRPO run has no DPO metrics
    assert all(f'src="{name}"' in text for name in files if name.endswith(".png"))
    rows = _embedded_rows(index)
    assert len(rows) == 24 and rows[0] == {"step": 1, "id": "p0", "prompt": "What is 0 + 0?", "text": "<answer>-1</answer>",
                                           "tool_spans": [], "reward": 0.0, "advantage": -0.5, "correct": False, "note": ""}
    assert "cd /home/user &amp;&amp; raylign train configs/grpo_arith.yaml" in text


def test_rag_rows_keep_tool_spans_and_components(tmp_path):
    index = write_report([write_run(tmp_path / "rag", kind="rag")])
    row = _embedded_rows(index)[0]
    assert row["text"][slice(*row["tool_spans"][0])] == TOOL
    assert row["note"] == "mrr 0.500, format 1.000"
    assert (index.parent / "reward-components.png").is_file()
    assert panel_keys(load_run(tmp_path / "rag"), ["reward/*"]) == ["reward/format", "reward/mrr"]


def test_dpo_report_shows_preference_metrics_instead_of_reward(tmp_path):
    index = write_report([write_run(tmp_path / "dpo", kind="dpo", steps=4)])
    files = {p.name for p in index.parent.iterdir()}
    assert "preference-dpo.png" in files and "reward.png" not in files and "reward_distribution.png" not in files
    rows = _embedded_rows(index)
    assert [r["id"] for r in rows] == ["pair1", "pair2", "pair3", "pair4"]
    assert rows[0]["text"] == "CHOSEN:\ngood\n\nREJECTED:\nbad" and rows[0]["correct"] is None


def test_long_text_is_cut_with_its_spans_and_script_tags_cannot_escape():
    rows = rollout_rows([{"step": 1, "prompt_id": "x", "completion": "a" * 5000, "tool_spans": [[10, 4500], [4200, 4300]]}])
    assert len(rows[0]["text"]) == 4000 and rows[0]["tool_spans"] == [[10, 4000]]
    assert "</script>" not in embedded_json({"t": "</script><script>alert(1)</script>"})
    assert json.loads(embedded_json({"t": "</b>"}).replace("<\\/", "</")) == {"t": "</b>"}


def test_compare_page_and_prompt_plot(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", before=0.5, after=1.0)
    index = write_report([a, b])
    text = index.read_text()
    assert index == a / "report/compare/index.html" and (index.parent / "compare.png").is_file()
    assert "<td>b</td><td>grpo</td><td>3</td><td>50.0%</td><td>100.0%</td>" in text
    assert write_prompt_plot(a, "p1") == a / "report/prompt-p1.png" and (a / "report/prompt-p1.png").stat().st_size > 1000
    with pytest.raises(KeyError, match="nope"):
        write_prompt_plot(a, "nope")


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "raylign", "report", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_the_report_of_a_relative_run_dir(tmp_path):
    write_run(tmp_path / "runs/x")
    proc = _cli(tmp_path, "runs/x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wrote runs/x/report/index.html"
    assert '<b id="acc-after">75.0%</b>' in (tmp_path / "runs/x/report/index.html").read_text()
    proc = _cli(tmp_path, "--prompt", "p0", "runs/x")
    assert (proc.returncode, proc.stdout.strip()) == (0, "wrote runs/x/report/prompt-p0.png")
    proc = _cli(tmp_path, "--prompt", "p99", "runs/x")
    assert proc.returncode == 2 and "prompt 'p99' has no scored rollouts" in proc.stderr
    proc = _cli(tmp_path, "runs/missing")
    assert proc.returncode == 2 and "no such run folder: runs/missing" in proc.stderr


def test_a_failing_report_only_warns(tmp_path, caplog):
    from raylign.orchestrator.train_loop import _write_report

    class Tracker:
        logged = []

        def log_artifacts(self, folder, path):
            self.logged.append((Path(folder), path))

    tracker = Tracker()
    with caplog.at_level(logging.WARNING):
        _write_report(tmp_path / "gone", tracker)  # no such folder: the report fails
    assert "the HTML report failed (FileNotFoundError" in caplog.text and tracker.logged == []
    _write_report(write_run(tmp_path / "run"), tracker)
    assert tracker.logged == [(tmp_path / "run/report", "report")]


def test_cost_section_lists_tokens_and_roles(tmp_path):
    from raylign.orchestrator.cost import cost_summary

    folder = write_run(tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    summary["cost"] = cost_summary({"generate": 20.0, "score": 5.0, "train": 30.0, "overhead": 45.0},
                                   {"tokens_generated": 500.0, "tokens_trained": 900.0})
    (folder / "summary.json").write_text(json.dumps(summary))
    text = write_report([folder]).read_text()
    assert "<tr><th>rollouts</th><td>500</td></tr>" in text and "<tr><th>trained</th><td>900</td></tr>" in text
    assert "<tr><td>generators</td><td>20.0</td><td>80.0</td><td>25.0</td></tr>" in text
    assert "<tr><td>reward</td><td>5.0</td><td>95.0</td><td></td></tr>" in text
    assert "<tr><td>judge</td>" not in text and "<tr><td>reference</td>" not in text  # neither ran


def test_roles_that_did_no_work_are_not_listed(tmp_path):
    # a summary written before the cost section dropped absent roles: judge, reference and reward listed idle
    roles = {"generators": {"busy_s": 20.0, "idle_s": 80.0, "tokens_per_s": 25.0},
             "trainer": {"busy_s": 30.0, "idle_s": 70.0, "tokens_per_s": 30.0},
             "reference": {"busy_s": 0.0, "idle_s": 100.0}, "reward": {"busy_s": 5.0, "idle_s": 95.0},
             "judge": {"busy_s": 0.0, "idle_s": 100.0, "tokens_per_s": 0.0}}
    assert list(working_roles(roles)) == ["generators", "trainer", "reward"]
    folder = write_run(tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    summary["cost"] = {"tokens_generated": {"rollouts": 500.0, "judge": 0.0}, "tokens_trained": 900.0,
                       "total_s": 100.0, "roles": roles}
    (folder / "summary.json").write_text(json.dumps(summary))
    text = write_report([folder]).read_text()
    table = re.search(r'<table class="kv" id="roles">(.*?)</table>', text).group(1)
    assert re.findall(r"<tr><td>(\w+)</td>", table) == ["generators", "trainer", "reward"]
    assert "<tr><th>judge</th>" not in text  # no judge tokens either
