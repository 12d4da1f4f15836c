"""`bench load` end to end through typer: table, JSON and PNG; bad options exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import bench
from bench.cli import app
from tests.bench.stub_server import StubConfig, closed_port, stub_server

ROOT = Path(__file__).resolve().parents[2]


def test_load_writes_table_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    with stub_server(StubConfig(ttft=0.02, itl=0.005)) as (url, log):
        result = CliRunner().invoke(app, [
            "load", "--target", f"stub={url}", "--target", f"dead={dead}", "--concurrency", "1,2",
            "--num-requests", "4", "--input-len", "8:12", "--max-tokens", "10", "--seed", "1",
            "--slo-ttft", "10", "--slo-tpot", "100", "--api-key", "sekret", "--output", str(out), "--plot", str(png),
            "--no-progress"])
    assert result.exit_code == 0, result.output
    assert log.auth == ["Bearer sekret"] * 8
    assert "stub" in result.output and "connection:4" in result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["prompts"]["input_len"] == {"low": 8, "high": 12}
    assert doc["config"]["api_key"] == "***" and "sekret" not in out.read_text()
    assert [(r["target"], r["level"]) for r in doc["runs"]] == [
        ("stub", "c=1"), ("stub", "c=2"), ("dead", "c=1"), ("dead", "c=2")]
    stub_run = doc["runs"][0]
    assert stub_run["model"] == "stub-model" and len(stub_run["requests"]) == 4
    # No first token can arrive before the stub's 20 ms, so none meets a 10 ms TTFT SLO.
    assert stub_run["summary"]["goodput"] == 0.0 and stub_run["summary"]["slo_attainment"] == 0.0
    assert all(r["ttft_ms"] >= 20.0 - 1.0 for r in stub_run["requests"])
    assert stub_run["requests"][0]["ok"] and len(stub_run["requests"][0]["itl_ms"]) == 9
    assert doc["runs"][2]["summary"]["errors"] == {"connection": 4}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [["load"], ["load", "--url", "http://h:1", "--concurrency", "2", "--request-rate", "4"],
             ["load", "--url", "http://h:1", "--input-len", "9:3"],
             ["load", "--url", "http://h:1", "--dataset", str(tmp_path / "none.jsonl")],
             ["load", "--url", "ftp://h:1"]]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)


def test_imports_resolve_inside_repo_and_module_runs() -> None:
    # `bench` is also a PyPI name: ours must win.
    assert Path(bench.__file__).resolve().parent == ROOT / "bench"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "load", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--request-rate" in proc.stdout
