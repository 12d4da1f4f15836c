"""The bar chart the bench scripts save next to their JSON results."""
from __future__ import annotations

from pathlib import Path


def save_bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str, title: str,
                   xlabel: str | None = None, goals: tuple[tuple[float, str, str], ...] = (),
                   size: tuple[float, float] = (5, 3.5)) -> None:
    """Bars plus optional horizontal goal lines given as (y, line style, label)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.bar(labels, values)
    for y, style, label in goals:
        ax.axhline(y, ls=style, c="gray", lw=1, label=label)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if goals:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
