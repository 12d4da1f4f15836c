"""The typer apps: errors exit 2 with a clear message before training; a tiny run end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from adapters.train.cli import app, data_app, train_app

REPO = Path(__file__).resolve().parents[2]


def test_malformed_data_exits_2_with_line_numbers(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n'
                    "{oops\n")
    result = CliRunner().invoke(train_app, ["sft", "--data", str(data), "--output", str(tmp_path / "out"),
                                            "--base", str(tiny_base)])
    assert result.exit_code == 2
    assert "line 2: malformed JSON" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_field_and_bad_base(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    result = CliRunner().invoke(train_app, ["dpo", "--data", str(data), "--output", str(tmp_path / "o"),
                                            "--base", str(tiny_base)])
    assert result.exit_code == 2 and "line 1: missing field 'rejected'" in result.output
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    result = CliRunner().invoke(train_app, ["rm", "--data", str(data), "--output", str(tmp_path / "o"),
                                            "--base", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2 and "--base" in result.output


def test_train_arm_through_the_cli(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arm"
    args = ["train", "arm", "--data", str(data_dir / "pref_eval.jsonl"), "--output", str(out),
            "--base", str(tiny_base), "--max-steps", "2", "--batch-size", "4", "--lora-r", "4",
            "--target-modules", "q_proj,v_proj", "--beta-r", "0.2", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    meta = json.loads((out / "alignserve.json").read_text())
    assert meta["steps"] == 2 and meta["arm"]["beta_r"] == 0.2 and meta["options"]["seed"] == 3
    assert meta["options"]["lr"] == 5e-4  # the ARM's default learning rate
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_module_entry_point_and_apps() -> None:
    assert {c.name for c in train_app.registered_commands} == {"sft", "dpo", "rm", "arm", "loop"}
    assert {c.name for c in data_app.registered_commands} == {"instructions", "preferences", "self-instruct",
                                                              "rag-reader"}
    out = subprocess.run([sys.executable, "-m", "adapters.train.cli", "train", "sft", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--lora-alpha" in out.stdout


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    prompts = tmp_path / "i.jsonl"
    prompts.write_text(json.dumps({"prompt": "p", "constraints": []}) + "\n")
    result = CliRunner().invoke(data_app, ["preferences", "--server", "http://127.0.0.1:9/v1", "--model", "m",
                                           "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9/v1" in result.output
