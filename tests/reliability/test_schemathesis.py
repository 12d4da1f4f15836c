"""Schemathesis over the server's own OpenAPI document, with the API key.

Every response must be documented (status, content type, body schema: errors in OpenAI's
shape), none may be >= 500, schema-violating requests must be refused, routes must refuse
requests without the key and wrong methods with 405 + `Allow`. `positive_data_acceptance` is
left out on purpose: a schema cannot say that a prompt fits the context or that an adapter
exists, so a schema-valid request may rightly get a 400/404. Responses are bounded by a small
`--max-model-len`; the run is bounded in examples and time (longer in `make test-slow`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e
CHECKS_LEFT_OUT = "positive_data_acceptance"


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-adapter-root")
    srv = ServerProcess("--num-kv-blocks", "512", "--max-model-len", "64", "--adapter-root", str(root),
                        api_key="fuzz-key")
    yield srv
    srv.stop()


def run_schemathesis(srv, max_examples: int, max_time: int, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe if exe.exists() else shutil.which("schemathesis")), "run", srv.base_url + "/openapi.json",
           "--header", f"Authorization: Bearer {srv.api_key}", "--checks", "all",
           "--exclude-checks", CHECKS_LEFT_OUT, "--max-examples", str(max_examples), "--max-time", str(max_time),
           "--seed", "0", "--workers", "1", "--request-timeout", "300", "--max-response-time", "300",
           "--report-dir", str(tmp_path), "--no-color"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 600)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 100, done.stdout[-3000:]
    ops = re.search(r"Selected: (\d+)/\d+\s+Tested: (\d+)", done.stdout)
    assert ops and ops.group(1) == ops.group(2), done.stdout[-3000:]  # every operation was reached


def test_schemathesis_finds_nothing(fuzz_server, tmp_path):
    run_schemathesis(fuzz_server, max_examples=10, max_time=90, tmp_path=tmp_path)


@pytest.mark.slow
def test_schemathesis_long_run(fuzz_server, tmp_path):
    run_schemathesis(fuzz_server, max_examples=200, max_time=900, tmp_path=tmp_path)
