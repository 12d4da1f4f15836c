"""Load-run output: the terminal summary table, the results JSON and the comparison PNG.

In: a `LoadConfig` and `LevelResult`s (from one run, or gathered from several peer runs).
Out: text, a JSON file (config + per-request records + aggregates per (target, level)),
and a PNG with throughput and latency percentiles vs level, one line per target.
Does not: run anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.config import LoadConfig
from bench.load import LevelResult


def jsonable(value: Any) -> Any:
    """Dataclasses, paths and non-finite floats as strict JSON (inf → "inf")."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def level_json(result: LevelResult, with_records: bool = True) -> dict[str, Any]:
    """One (target, level) as a dict."""
    out: dict[str, Any] = {
        "target": result.target.name, "url": result.target.base_url, "model": result.model,
        "level": result.level.label, "concurrency": result.level.concurrency,
        "request_rate": result.level.request_rate, "max_concurrency": result.level.max_concurrency,
        "summary": result.summary,
    }
    if with_records:
        out["requests"] = [r.to_json() for r in result.records]
    return jsonable(out)


def results_json(cfg: LoadConfig, results: list[LevelResult],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full results document."""
    doc: dict[str, Any] = {
        "tool": "alignserve bench load",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # NOTE: results files get shared; the API key must not travel with them.
        "config": jsonable(dataclasses.replace(cfg, api_key="***" if cfg.api_key else None)),
        "runs": [level_json(r) for r in results],
    }
    if extra:
        doc.update(jsonable(extra))
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` with strict JSON (no NaN/Infinity literals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[LevelResult]) -> str:
    """A fixed-width summary: one row per (target, level); latencies are p50/p99 in ms."""
    head = ("target", "level", "ok/total", "errors", "req/s", "out tok/s", "goodput",
            "TTFT p50/p99", "ITL p50/p99", "TPOT p50/p99", "E2E p50/p99")
    rows = [head]

    def pair(stats: dict[str, float | None]) -> str:
        return f"{_fmt(stats['p50'])}/{_fmt(stats['p99'])}"

    for r in results:
        s = r.summary
        errors = ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "-"
        rows.append((r.target.name, r.level.label, f"{s['completed']}/{s['num_requests']}",
                     errors, _fmt(s["request_throughput"], 2), _fmt(s["output_throughput"]),
                     _fmt(s["goodput"], 2), pair(s["ttft_ms"]), pair(s["itl_ms"]),
                     pair(s["tpot_ms"]), pair(s["e2e_ms"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_PANELS = (("output_throughput", "output tokens/s", None), ("request_throughput", "requests/s", None),
           ("ttft_ms", "TTFT (ms)", "p"), ("itl_ms", "ITL (ms)", "p"),
           ("tpot_ms", "TPOT (ms)", "p"), ("e2e_ms", "E2E latency (ms)", "p"))


def write_plot(path: Path, results: list[LevelResult], title: str = "load test") -> None:
    """Throughput and p50 (solid) / p99 (dashed) latencies vs level, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")  # NOTE: headless machines and CI have no display
    import matplotlib.pyplot as plt

    labels: list[str] = []
    for r in results:
        if r.level.label not in labels:
            labels.append(r.level.label)
    targets: list[str] = []
    for r in results:
        if r.target.name not in targets:
            targets.append(r.target.name)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, ylabel, kind) in zip(axes.flat, _PANELS):
        for t_i, name in enumerate(targets):
            rows = [r for r in results if r.target.name == name]
            xs = [labels.index(r.level.label) for r in rows]
            color = colors[t_i % len(colors)]
            if kind is None:
                ax.plot(xs, [r.summary[key] for r in rows], "o-", color=color, label=name)
                continue
            for pct, style in (("p50", "o-"), ("p99", "s--")):
                ys = [r.summary[key][pct] for r in rows]
                ys_plot = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys_plot, style, color=color, label=f"{name} {pct}")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
