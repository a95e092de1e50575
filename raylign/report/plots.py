"""The report's PNGs (matplotlib, Agg): per-step curves by panel, the reward distribution, phase timing and
the per-prompt accuracy heat map. Each function returns the path it wrote, or None when the run lacks the data.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from raylign.report.data import (  # noqa: E402
    RunData, accuracy_change, accuracy_matrix, accuracy_points, group_by_step, metric_keys, prompt_accuracy,
    prompt_order, prompt_trend, sampled_steps, series,
)

DPI = 90
MAX_HEATMAP_PROMPTS = 60  # rows of the heat map at most (heatmap_groups picks them)
MAX_BOX_STEPS = 40  # reward distribution: at most this many steps drawn, evenly spaced

# Per-step curve panels: title -> the metrics drawn, one small axis each; keys a run lacks are skipped.
# Keys ending in "/*" take every metric under that prefix except the ones listed in REWARD_NOT_COMPONENTS.
PANELS: dict[str, list[str]] = {
    "Reward": ["reward/mean", "accuracy/train", "format/rate", "reward/zero_std_groups"],
    "Reward components": ["reward/*"],
    "Preference (DPO)": ["dpo/reward_accuracy", "dpo/margin", "dpo/reward_chosen", "dpo/reward_rejected",
                         "loss/dpo", "pairs/count"],
    "SFT": ["loss/sft", "sft/perplexity", "sft/tokens"],
    "KL, entropy, response length, truncation": ["kl/mean", "train/entropy", "loss/entropy", "response/len_mean",
                                                  "response/len_max", "response/truncated"],
    "Optimizer": ["loss/policy", "loss/value", "train/grad_norm", "train/lr", "clip/fraction", "advantage/abs_mean"],
    "Agent (tool use)": ["agent/turns", "agent/searches", "agent/tool_errors", "agent/answered"],
}
REWARD_NOT_COMPONENTS = {"reward/mean", "reward/std", "reward/zero_std_groups", "reward/baseline"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def panel_keys(run: RunData, keys: list[str]) -> list[str]:
    have = metric_keys(run)
    out = []
    for key in keys:
        if key.endswith("/*"):
            out += sorted(k for k in have if k.startswith(key[:-1]) and k not in REWARD_NOT_COMPONENTS)
        elif key in have:
            out.append(key)
    return out


def _grid(n: int, width: float = 4.0, height: float = 2.6):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel().startswith("step"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_panel(run: RunData, title: str, keys: list[str], path: Path) -> Path | None:
    """One axis per metric of the panel; reward/mean carries a +-std band."""
    keys = panel_keys(run, keys)
    if not keys:
        return None
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys):
        steps, values = series(run, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        if key == "reward/mean":
            _, stds = series(run, "reward/std")
            if len(stds) == len(values):
                ax.fill_between(steps, [v - s for v, s in zip(values, stds)], [v + s for v, s in zip(values, stds)],
                                alpha=0.25, label="+-std")
                ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_accuracy(run: RunData, path: Path) -> Path | None:
    """Held-out accuracy at each eval (points joined), with the training samples' accuracy per step."""
    points = accuracy_points(run)
    train_steps, train_acc = series(run, "accuracy/train")
    if not points and not train_steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if train_steps:
        ax.plot(train_steps, train_acc, alpha=0.6, label="training samples (accuracy/train)")
    if points:
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="C3", label="held-out (greedy)")
        for name, step, acc in points:
            ax.annotate(f"{name}: {100 * acc:.1f}%", (step, acc), fontsize=7, textcoords="offset points", xytext=(4, 6))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _even(items: list, most: int) -> list:
    if len(items) <= most:
        return items
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def plot_reward_distribution(run: RunData, path: Path) -> Path | None:
    """A box per step of the rewards of its samples (at most MAX_BOX_STEPS steps, evenly spaced)."""
    by_step = {s: [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
               for s, rows in group_by_step(run.rollouts).items()}
    by_step = {s: v for s, v in by_step.items() if v}
    if not by_step:
        return None
    steps = _even(sorted(by_step), MAX_BOX_STEPS)
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.25 * len(steps) + 2)), 3.2))
    ax.boxplot([by_step[s] for s in steps], positions=range(len(steps)), widths=0.6, showmeans=True)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90 if len(steps) > 20 else 0)
    ax.set_xlabel("training step")
    ax.set_ylabel("reward")
    ax.set_title("reward distribution per step (box: quartiles, triangle: mean)", fontsize=9)
    return _save(fig, path)


def plot_timing(run: RunData, path: Path) -> Path | None:
    """Seconds per phase, stacked per step (phases as the loop timed them; the rest is overhead)."""
    phases = sorted(k for k in metric_keys(run) if k.startswith("timing/") and k != "timing/step")
    if not phases:
        return None
    steps = sorted(run.steps)
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.05 * len(steps) + 5)), 3.4))
    bottom = [0.0] * len(steps)
    for i, key in enumerate(phases):
        values = [max(0.0, run.steps[s].get(key, 0.0)) for s in steps]
        ax.bar(steps, values, bottom=bottom, label=key.removeprefix("timing/"), color=f"C{i % 10}", width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("time per phase per step", fontsize=9)
    return _save(fig, path)


IMPROVED, UNCHANGED, WORSE = "improved", "unchanged", "got worse"  # heat-map row groups, top to bottom


def _shares(sizes: list[int], most: int) -> list[int]:
    """Split ``most`` rows among groups of these sizes as evenly as they allow: one each in turn, a group that
    runs out passing its turn on."""
    take = [0] * len(sizes)
    while sum(take) < min(most, sum(sizes)):
        for i, size in enumerate(sizes):
            if take[i] < size and sum(take) < most:
                take[i] += 1
    return take


def heatmap_groups(table: dict[str, dict[int, float]], most: int = MAX_HEATMAP_PROMPTS) -> dict[str, list[str]]:
    """The heat map's rows, {group: prompt ids} in ``prompt_order``: every prompt when there are at most ``most``;
    otherwise ``most`` rows shared evenly by the most improved, the most worsened and the most often sampled
    unchanged prompts (a row left over goes to them in that order)."""
    order = prompt_order(table)
    groups = {IMPROVED: [p for p in order if accuracy_change(table[p]) > 0],
              UNCHANGED: [p for p in order if accuracy_change(table[p]) == 0],
              WORSE: [p for p in order if accuracy_change(table[p]) < 0]}
    n_improved, n_worse, n_unchanged = _shares([len(groups[IMPROVED]), len(groups[WORSE]), len(groups[UNCHANGED])],
                                               most)
    return {IMPROVED: groups[IMPROVED][:n_improved], UNCHANGED: groups[UNCHANGED][:n_unchanged],
            WORSE: groups[WORSE][len(groups[WORSE]) - n_worse:]}


def plot_prompt_heatmap(run: RunData, path: Path) -> Path | None:
    """Prompts (``heatmap_groups``) x every step with scored samples; colour = share of the prompt's samples
    correct at that step, grey where it was not sampled. Lines separate improved / unchanged / got worse."""
    table = prompt_accuracy(run.rollouts)
    groups = heatmap_groups(table)
    prompt_ids = [pid for ids in groups.values() for pid in ids]
    if not prompt_ids:
        return None
    steps = sampled_steps(table)
    grid = accuracy_matrix(table, prompt_ids, steps)
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.06 * len(steps) + 4)), max(2.5, 0.16 * len(prompt_ids) + 1.2)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ticks = _even(list(range(len(steps))), 15)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    labels = [f"{pid} ({prompt_trend(table[pid])}, {accuracy_change(table[pid]):+.2f})" for pid in prompt_ids]
    ax.set_yticks(range(len(prompt_ids)), labels, fontsize=6)
    edge = 0
    for ids in list(groups.values())[:-1]:
        edge += len(ids)
        if 0 < edge < len(prompt_ids):
            ax.axhline(edge - 0.5, color="black", lw=0.8)
    ax.set_xlabel("training step")  # not "step...": _save would swap these step ticks for column indices
    ax.set_title("per-prompt accuracy per step, sorted by last minus first (grey: not sampled)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, path)


def plot_prompt(run: RunData, prompt_id: str, path: Path) -> Path:
    """One prompt's accuracy over the steps it was sampled (``raylign report --prompt ID``)."""
    by_step = prompt_accuracy(run.rollouts).get(prompt_id)
    if not by_step:
        raise KeyError(f"prompt {prompt_id!r} has no scored rollouts in {run.path / 'rollouts.jsonl'}")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(list(by_step), list(by_step.values()), "o-")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("share of samples correct")
    ax.set_title(f"prompt {prompt_id}: {prompt_trend(by_step)}", fontsize=9)
    return _save(fig, path)


def plot_compare(runs: list[RunData], keys: list[str], path: Path) -> Path | None:
    """One axis per metric, one line per run (``raylign report RUN_A RUN_B ...``); held-out accuracy first."""
    fig, axes = _grid(len(keys) + 1)
    for run in runs:
        points = accuracy_points(run)
        axes[0].plot([p[1] for p in points], [p[2] for p in points], "o-", label=run.name)
        for ax, key in zip(axes[1:], keys):
            ax.plot(*series(run, key), label=run.name)
    for ax, title in zip(axes, ["held-out accuracy", *keys]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return _save(fig, path)
