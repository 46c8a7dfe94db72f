"""A run's loss curve, drawn from its metrics file."""

from __future__ import annotations

from pathlib import Path

from .report import read_metrics


def plot_losses(metrics: Path, out: Path) -> None:
    """The run's loss per step, one colour per stage, as a PNG next to its metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in sorted({r["stage"] for r in rows}):
        points = [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and r["loss"] is not None]
        if points:
            ax.plot(*zip(*points), linewidth=1, label=next(r["stage_name"] for r in rows if r["stage"] == stage))
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"training loss ({metrics.parent.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
