"""`raylign report RUN_DIR [RUN_DIR ...] [--prompt ID]`: a run folder as an HTML page a person can browse.

One run: ``RUN_DIR/report/index.html`` and the PNGs it shows (held-out accuracy, reward and its components,
the reward distribution, KL/entropy/length/truncation, preference metrics, time per phase, the per-prompt
accuracy heat map), the run's config and command line, and its rollouts in a filterable table. Several runs:
one page overlaying their curves. Reads the folder's files only (``report.data``): no Ray, no MLflow.
"""

from __future__ import annotations

import html
from pathlib import Path

from raylign.report.data import (
    TREND_LEARNED, TREND_ONCE, TREND_STUCK, TREND_WORSE, RunData, accuracy_points, eval_changes, load_run, percent,
    prompt_accuracy, prompt_trend,
)
from raylign.report.page import config_section, image, kv_table, page, section
from raylign.report.plots import (
    IMPROVED, PANELS, UNCHANGED, WORSE, heatmap_groups, plot_accuracy, plot_compare, plot_panel, plot_prompt,
    plot_prompt_heatmap, plot_reward_distribution, plot_timing, slug,
)

COMPARE_KEYS = ["reward/mean", "accuracy/train", "timing/step"]


def _headline(run: RunData) -> str:
    s = run.summary
    before, after = s.get("eval_before", {}).get("accuracy"), s.get("eval_after", {}).get("accuracy")
    rows = [("algorithm", str(s.get("algorithm", next(iter(run.algorithms.values()), "?")))),
            ("model", str(s.get("model", "?"))), ("steps", str(s.get("steps", len(run.steps)))),
            ("wall time", f"{s['wall_s'] / 60:.1f} min" if "wall_s" in s else "n/a"),
            ("tokens generated", str(s.get("tokens_generated", "n/a")))]
    text = (f'<p class="big" id="headline">held-out greedy accuracy: before <b id="acc-before">{percent(before)}</b>'
            f' &rarr; after <b id="acc-after">{percent(after)}</b></p>')
    return text + kv_table(rows)


def _accuracy_section(run: RunData, out: Path) -> str:
    evals = [(name, f"step {step}: {percent(acc)}") for name, step, acc in accuracy_points(run)]
    changes = eval_changes(run)
    body = kv_table(evals) if evals else ""
    if any(changes.values()):
        body += "<p>held-out problems, eval_before &rarr; eval_after: " + html.escape(
            ", ".join(f"{v} {k}" for k, v in changes.items())) + "</p>"
    return section("Held-out accuracy", body + image(plot_accuracy(run, out / "accuracy.png"), "accuracy"), "accuracy")


def _timing_section(run: RunData, out: Path) -> str:
    totals = run.summary.get("timing", {})
    rows = [(k, f"{v:.1f} s") for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    body = (("<p>total seconds per phase over the run:</p>" + kv_table(rows)) if rows else "")
    return section("Time per phase", body + image(plot_timing(run, out / "timing.png"), "timing"), "timing")


def working_roles(roles: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The roles that did work: busy for some seconds or processing tokens. Summaries written before the cost
    section dropped absent roles list an idle judge (and reference, reward) in every run; they are left out."""
    return {role: v for role, v in roles.items() if v.get("busy_s", 0.0) > 0 or v.get("tokens_per_s", 0.0) > 0}


def _role_row(role: str, v: dict[str, float]) -> str:
    rate = f"{v['tokens_per_s']:.1f}" if "tokens_per_s" in v else ""
    return (f"<tr><td>{html.escape(role)}</td><td>{v['busy_s']:.1f}</td><td>{v['idle_s']:.1f}</td>"
            f"<td>{rate}</td></tr>")


def _cost_section(run: RunData) -> str:
    """Tokens per purpose and seconds per role, from the summary's ``cost`` section (raylign >= this one)."""
    cost = run.summary.get("cost")
    if not cost:
        return ""
    tokens = [(k, f"{v:,.0f}") for k, v in cost["tokens_generated"].items() if v]
    tokens.append(("trained", f"{cost['tokens_trained']:,.0f}"))
    head = "<tr><th>role</th><th>busy s</th><th>idle s</th><th>tokens/s busy</th></tr>"
    rows = "".join(_role_row(role, v) for role, v in working_roles(cost["roles"]).items())
    body = (f"<p>tokens generated per purpose, and trained:</p>{kv_table(tokens)}<p>seconds per role over the run's "
            f"{cost['total_s']:.1f} timed seconds:</p><table class=\"kv\" id=\"roles\">{head}{rows}</table>")
    return section("Cost", body, "cost")


def _heatmap_caption(table: dict[str, dict[int, float]], groups: dict[str, list[str]]) -> str:
    """What the heat map shows and, when it is capped, which prompts it keeps."""
    trends = [prompt_trend(by_step) for by_step in table.values()]
    counts = ", ".join(f"{trends.count(t)} {t}" for t in (TREND_LEARNED, TREND_WORSE, TREND_STUCK, TREND_ONCE))
    text = (f"Of the run's {len(table)} scored prompts, comparing the last step each was sampled with the first: "
            f"{counts}. Rows: prompts sorted by that change (last minus first accuracy), most improved at the top, "
            "most worsened at the bottom, unchanged ones in between (most often sampled first); columns: every "
            "step with scored samples; a cell is the share of the prompt's samples correct at that step, grey "
            "where the prompt was not sampled.")
    shown = sum(len(ids) for ids in groups.values())
    if shown < len(table):
        text += (f" The map is capped at {shown} rows, shared evenly among the prompts that improved most "
                 f"({len(groups[IMPROVED])}), the unchanged ones sampled most often ({len(groups[UNCHANGED])}) and "
                 f"those that got worse most ({len(groups[WORSE])}); raylign report --prompt ID plots any other.")
    return f'<p id="heatmap-caption">{html.escape(text)}</p>'


def _prompt_section(run: RunData, out: Path) -> str:
    table = prompt_accuracy(run.rollouts)
    if not table:
        return ""
    caption = _heatmap_caption(table, heatmap_groups(table))
    return section("Per-prompt accuracy", caption + image(plot_prompt_heatmap(run, out / "prompts.png"), "per-prompt"),
                   "prompts")


def _curve_sections(run: RunData, out: Path) -> list[str]:
    return [section(title, image(plot_panel(run, title, keys, out / f"{slug(title)}.png"), title), slug(title))
            for title, keys in PANELS.items()]


def run_page(run: RunData, out: Path) -> str:
    dist = image(plot_reward_distribution(run, out / "reward_distribution.png"), "reward distribution")
    sections = [section("Summary", _headline(run), "summary"), _accuracy_section(run, out),
                *_curve_sections(run, out), section("Reward distribution", dist, "reward-distribution"),
                _timing_section(run, out), _cost_section(run), _prompt_section(run, out), config_section(run)]
    return page(f"raylign report: {run.name}", sections, run.rollouts)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of one run (``RUN_DIR/report``) or the comparison of several (``out``, default
    ``RUN_A/report/compare``); returns the index.html path."""
    runs = [load_run(p) for p in run_dirs]
    folder = Path(out) if out else runs[0].path / "report" / ("compare" if len(runs) > 1 else "")
    folder.mkdir(parents=True, exist_ok=True)
    text = run_page(runs[0], folder) if len(runs) == 1 else compare_page(runs, folder)
    index = folder / "index.html"
    index.write_text(text)
    return index


def compare_page(runs: list[RunData], out: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(str(r.summary.get('algorithm', '?')))}"
                   f"</td><td>{len(r.steps)}</td><td>{percent(r.summary.get('eval_before', {}).get('accuracy'))}</td>"
                   f"<td>{percent(r.summary.get('eval_after', {}).get('accuracy'))}</td></tr>" for r in runs)
    table = (f'<table class="kv"><tr><th>run</th><th>algorithm</th><th>steps</th><th>accuracy before</th>'
             f"<th>accuracy after</th></tr>{rows}</table>")
    plot = image(plot_compare(runs, COMPARE_KEYS, out / "compare.png"), "comparison")
    return page(f"raylign report: {len(runs)} runs", [section("Runs", table + plot, "compare")], None)


def write_prompt_plot(run_dir: str | Path, prompt_id: str, out: str | Path | None = None) -> Path:
    """One prompt's accuracy over steps as ``RUN_DIR/report/prompt-<ID>.png`` (or ``out``)."""
    run = load_run(run_dir)
    path = Path(out) if out else run.path / "report" / f"prompt-{slug(prompt_id) or 'id'}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_prompt(run, prompt_id, path)
