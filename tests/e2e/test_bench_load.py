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
