"""bench.wave_split: requests that start within the burst window are the first wave; failed
requests and those without a first token are left out; medians per side."""
from __future__ import annotations

import json

from bench.wave_split import main, split


def run_of(starts_ttfts, failed=()):
    reqs = [{"start_s": s, "ttft_ms": t, "ok": True} for s, t in starts_ttfts]
    reqs += [{"start_s": s, "ttft_ms": None, "ok": False} for s in failed]
    return {"target": "x", "level": "c=4", "requests": reqs, "summary": {"output_throughput": 12.5}}


def test_split_by_start_time():
    run = run_of([(0.0, 900.0), (0.01, 1000.0), (0.05, 1100.0), (0.4, 100.0), (1.2, 300.0)], failed=[0.02, 2.0])
    got = split(run, burst_s=0.1)
    assert (got["n_first"], got["n_later"]) == (3, 2)
    assert got["ttft_p50_first_ms"] == 1000.0 and got["ttft_p50_later_ms"] == 200.0
    assert got["ttft_p50_all_ms"] == 900.0
    assert split(run, burst_s=0.5)["n_first"] == 4  # the window decides


def test_cli_writes_one_row_per_run(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"runs": [run_of([(0.0, 5.0), (1.0, 1.0)]), run_of([(0.0, 7.0)])]}))
    out = tmp_path / "split.json"
    main([path], burst_s=0.1, out=out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n_first"], r["n_later"], r["ttft_p50_later_ms"]) for r in rows] == [(1, 1, 1.0), (1, 0, None)]
