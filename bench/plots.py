"""What the bench scripts share: the results-file options and the bar chart saved next to the JSON."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def results_parser(description: str, default_output: Path) -> argparse.ArgumentParser:
    """An argument parser with --output (results JSON) and --replot (redraw an existing one)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, default=default_output)
    parser.add_argument("--replot", type=Path, help="Only redraw the PNG of an existing results JSON.")
    return parser


def replot_if_asked(args: argparse.Namespace, plot: Callable[[dict, Path], None]) -> bool:
    """Redraw --replot's PNG from its JSON; True if that was the whole job."""
    if args.replot is None:
        return False
    plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
    return True


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


def rate_bars(ax: Any, labels: list[str], rates: list[dict]) -> None:
    """Bars of rates (`{"rate", "ci95"}` as bench.rain_quality.rate makes them) with their 95 %
    intervals as error bars, on a 0-1 axis."""
    ax.bar(labels, [r["rate"] for r in rates], capsize=3,
           yerr=[[r["rate"] - r["ci95"][0] for r in rates], [r["ci95"][1] - r["rate"] for r in rates]])
    ax.set_ylim(0, 1)
