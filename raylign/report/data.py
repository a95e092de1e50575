"""What a run folder holds, read back for the report: files only (no Ray, no MLflow, no torch).

A run of ``raylign train`` writes ``config.yaml``, ``command.json``, ``summary.json``, ``metrics.jsonl`` (one
row per step: the algorithm's metrics and ``timing/<phase>``; one per eval), ``rollouts.jsonl`` (one row per
sample or pair) and ``eval_before.jsonl`` / ``eval_after.jsonl`` (one row per held-out sample). Every file is
optional: a folder from an older raylign (no ``metrics.jsonl``) gets the per-step metrics the rollouts allow.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

TREND_LEARNED, TREND_WORSE, TREND_STUCK, TREND_ONCE = "learned", "got worse", "stuck", "seen once"


@dataclass
class RunData:
    """One run folder, parsed."""

    path: Path
    name: str
    config_text: str = ""
    command: str = ""
    summary: dict = field(default_factory=dict)
    steps: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> its metrics
    algorithms: dict[int, str] = field(default_factory=dict)  # step -> the algorithm that ran it
    evals: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # name -> (step, metrics)
    rollouts: list[dict] = field(default_factory=list)
    eval_records: dict[str, list[dict]] = field(default_factory=dict)  # eval name -> per-sample rows


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _command(path: Path) -> str:
    if not path.is_file():
        return ""
    cmd = json.loads(path.read_text())
    return f"cd {shlex.quote(cmd.get('cwd', '.'))} && {shlex.join(cmd.get('argv', []))}"


def _add_metric_rows(run: RunData, rows: list[dict]) -> None:
    for row in rows:
        if row["kind"].startswith("eval"):
            run.evals[row["kind"]] = (row["step"], row["metrics"])
        else:
            run.steps[row["step"]] = row["metrics"]
            run.algorithms[row["step"]] = row["kind"]


def _steps_from_rollouts(rollouts: list[dict]) -> dict[int, dict[str, float]]:
    """Per-step reward and accuracy from the rollouts alone (folders written before metrics.jsonl existed)."""
    out: dict[int, dict[str, float]] = {}
    for step, rows in group_by_step(rollouts).items():
        rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
        metrics = {"reward/mean": mean(rewards), "reward/std": std(rewards)} if rewards else {}
        if any("correct" in r for r in rows):
            metrics["accuracy/train"] = mean([float(bool(r.get("correct"))) for r in rows])
        out[step] = metrics
    return out


def load_run(path: str | Path) -> RunData:
    """Everything the report shows, from the files of one run folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    run = RunData(path=path, name=path.resolve().name)
    if (path / "config.yaml").is_file():
        run.config_text = (path / "config.yaml").read_text()
    run.command = _command(path / "command.json")
    if (path / "summary.json").is_file():
        run.summary = json.loads((path / "summary.json").read_text())
    run.rollouts = read_jsonl(path / "rollouts.jsonl")
    _add_metric_rows(run, read_jsonl(path / "metrics.jsonl"))
    if not run.steps:
        run.steps = _steps_from_rollouts(run.rollouts)
    for name, value in run.summary.items():  # evals the summary holds but metrics.jsonl lacks
        if name.startswith("eval_") and isinstance(value, dict) and name not in run.evals:
            run.evals[name] = (0 if name == "eval_before" else run.summary.get("steps", 0), value)
    for file in sorted(path.glob("eval*.jsonl")):
        run.eval_records[file.stem] = read_jsonl(file)
    return run


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def std(xs: list[float]) -> float:
    """Sample standard deviation (as torch's ``std`` the loop logs); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def group_by_step(rollouts: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rollouts:
        out.setdefault(r["step"], []).append(r)
    return dict(sorted(out.items()))


def series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one per-step metric, steps that lack it left out."""
    pairs = [(s, m[key]) for s, m in sorted(run.steps.items()) if key in m]
    return [s for s, _ in pairs], [v for _, v in pairs]


def metric_keys(run: RunData) -> set[str]:
    return {k for m in run.steps.values() for k in m}


def item_id(row: dict) -> str:
    """The prompt, pair or example a rollouts.jsonl / eval row is about."""
    for key in ("prompt_id", "problem_id", "pair_id", "example_id"):
        if key in row:
            return str(row[key])
    return ""


def prompt_accuracy(rollouts: list[dict]) -> dict[str, dict[int, float]]:
    """{prompt id: {step: share of that step's samples of the prompt that were correct}}; rows without a
    ``correct`` field (SFT examples, DPO pairs) are left out."""
    hits: dict[str, dict[int, list[bool]]] = {}
    for r in rollouts:
        if "correct" in r:
            hits.setdefault(item_id(r), {}).setdefault(r["step"], []).append(bool(r["correct"]))
    return {pid: {s: sum(v) / len(v) for s, v in sorted(by_step.items())} for pid, by_step in sorted(hits.items())}


def prompt_trend(by_step: dict[int, float]) -> str:
    """learned / got worse: the last step it was sampled beats / trails the first; stuck: the same; seen once."""
    values = list(by_step.values())
    if len(values) < 2:
        return TREND_ONCE
    if values[-1] > values[0]:
        return TREND_LEARNED
    return TREND_WORSE if values[-1] < values[0] else TREND_STUCK


def accuracy_change(by_step: dict[int, float]) -> float:
    """The last sampled step's accuracy minus the first's (0 for a prompt seen once)."""
    values = list(by_step.values())
    return values[-1] - values[0]


def prompt_order(table: dict[str, dict[int, float]]) -> list[str]:
    """Prompt ids by last-minus-first accuracy, most improved first and most worsened last; among equal changes
    the most often sampled first (so "stuck" precedes "seen once"), then by id."""
    return sorted(table, key=lambda pid: (-accuracy_change(table[pid]), -len(table[pid]), pid))


def sampled_steps(table: dict[str, dict[int, float]]) -> list[int]:
    """Every step at which some prompt has a scored sample, in order."""
    return sorted({s for by_step in table.values() for s in by_step})


def accuracy_matrix(table: dict[str, dict[int, float]], prompt_ids: list[str], steps: list[int]) -> list[list[float]]:
    """Prompts x steps: the share of a prompt's samples correct at that step; NaN where it was not sampled
    (not 0: a prompt that was not drawn did not fail)."""
    return [[table[pid].get(s, math.nan) for s in steps] for pid in prompt_ids]


def eval_changes(run: RunData) -> dict[str, int]:
    """Held-out problems by how their greedy answer changed from eval_before to eval_after (first sample each)."""
    before = {item_id(r): bool(r["correct"]) for r in run.eval_records.get("eval_before", []) if r.get("sample", 0) == 0}
    after = {item_id(r): bool(r["correct"]) for r in run.eval_records.get("eval_after", []) if r.get("sample", 0) == 0}
    both = before.keys() & after.keys()
    return {"fixed": sum(after[p] and not before[p] for p in both), "broken": sum(before[p] and not after[p] for p in both),
            "still right": sum(before[p] and after[p] for p in both),
            "still wrong": sum(not before[p] and not after[p] for p in both)}


def accuracy_points(run: RunData) -> list[tuple[str, int, float]]:
    """(eval name, step, held-out accuracy) of each eval, in step order."""
    points = [(name, step, m["accuracy"]) for name, (step, m) in run.evals.items() if "accuracy" in m]
    return sorted(points, key=lambda p: (p[1], p[0] != "eval_before"))


def percent(x: float | None) -> str:
    """As the CLI prints accuracies: ``12.5%``; ``n/a`` when missing."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
