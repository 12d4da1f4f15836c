"""`alignserve bench load` run against our real server: every request succeeds and is counted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_bench_load_against_our_server(server, tmp_path, model_dir):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "server.cli", "bench", "load", "--url", server.base_url + "/v1",
           "--api-key", server.api_key, "--concurrency", "1,4", "--num-requests", "4", "--input-len", "32",
           "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--warmup", "1", "--timeout", "300",
           "--tokenizer", str(model_dir), "--no-progress", "--output", str(out), "--plot", str(tmp_path / "p.png")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    text = json.dumps(result)
    assert "test-key" not in text  # the key is redacted
    assert (tmp_path / "p.png").stat().st_size > 1000
    runs = result["runs"]
    assert [r["concurrency"] for r in runs] == [1, 4]
    for run in runs:
        assert run["summary"]["failed"] == 0 and run["summary"]["completed"] == 4, run["summary"]
        records = run["requests"]
        assert len(records) == 4
        assert all(r["output_tokens"] == 8 and r["output_tokens_source"] == "usage" for r in records)
        assert all(r["error"] is None and r["ttft_ms"] > 0 and len(r["itl_ms"]) == 7 for r in records)


def test_peers_bench_reads_how_our_engine_spent_a_slot(server):
    """bench.peer_runs reads our /metrics step counters around a slot: eight tokens of one
    request are eight model steps (the prefill gives the first), each with model time, and the
    engine thread was busy for part of the slot's wall time."""
    import time

    import httpx

    from bench.config import Target
    from bench.peer_runs import engine_counters, engine_split

    target = Target("ours", server.base_url + "/v1")
    before, started = engine_counters(target, server.api_key), time.monotonic()
    r = httpx.post(server.base_url + "/v1/completions", headers=server.headers(), timeout=120,
                   json={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 8,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    # The engine exports a step's counters just after handing out its tokens: the reply can
    # come first, so read until the last step shows (a second at most).
    deadline = time.monotonic() + 5
    while (after := engine_counters(target, server.api_key))["steps"] - before["steps"] < 8 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    split = engine_split(before, after, time.monotonic() - started)
    assert split["steps"] == 8
    assert split["ms_per_step"]["model"] > 0 and set(split["ms_per_step"]) == {
        "schedule", "prepare", "model", "sample", "output", "stream"}
    assert 0 < split["busy_share"] <= 1
    assert engine_counters(target) == {}  # no key, no metrics: nothing is made up
