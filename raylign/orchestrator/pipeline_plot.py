"""The AutoDSPy pipeline distribution before and after training, as one PNG (``pipelines.png``)."""

from __future__ import annotations

from pathlib import Path


def pipeline_table(evals: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {pipeline: {eval name: share}}} from eval metrics ``pipeline/<kind>/<pipeline>``."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, metrics in evals.items():
        for key, share in metrics.items():
            if key.startswith("pipeline/"):
                _, kind, pipeline = key.split("/", 2)
                table.setdefault(kind, {}).setdefault(pipeline, {})[name] = share
    return table


def plot_pipeline_shares(evals: dict[str, dict[str, float]], path: Path) -> Path | None:
    """One panel per question kind: each pipeline's share of that kind's eval samples, per eval; None when
    the evals carry no pipeline metrics."""
    table = pipeline_table(evals)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], sorted(table.items())):
        pipelines = sorted(rows)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.barh([i + j * width for i in range(len(pipelines))], [rows[p].get(name, 0.0) for p in pipelines],
                    height=width, label=name)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(pipelines))], pipelines, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of eval questions")
        ax.set_title(f"{kind} questions")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
