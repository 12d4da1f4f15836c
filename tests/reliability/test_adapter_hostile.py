"""Hostile adapter input: paths, config files and weight files that must be 4xx, never 500 or a leak.

Most cases call `load_peft_adapter(..., root=...)` on tiny random adapters in tmp dirs; one module
of HTTP cases goes through the real server to pin the status codes and that no error body names
an absolute server path (the adapter root included).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from adapters.peft_format import AdapterError, load_peft_adapter
from tests.adapters.helpers import base_model, lora_config, model_config, save_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors", "alignserve.json")
META = {"role": "sft", "base_fingerprint": {"hidden_size": 32}}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "good"
    save_adapter(path, lora_config(), base_model(), metadata=META)
    return path


@pytest.fixture
def root(tmp_path, template) -> Path:
    """`tmp/root/good` (a valid adapter) and `tmp/outside/good` (the same, outside the root)."""
    shutil.copytree(template, tmp_path / "root" / "good")
    shutil.copytree(template, tmp_path / "outside" / "good")
    return tmp_path / "root"


def refused(path: str | Path, root: Path | None, status: int, *fragments: str) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(path, model_config(), root=root)
    err = info.value
    assert (err.status, err.param) == (status, "lora_path"), err.message
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert_no_server_path(err.message, (root or Path(path)).parent)
    return err


def assert_no_server_path(message: str, base: Path) -> None:
    """No absolute path under `base` (nor the resolved one) appears in a client-facing message."""
    for prefix in {str(base), str(base.resolve())}:
        assert prefix not in message, message


# ----- 1. every file read must resolve inside the root -----

@pytest.mark.parametrize("linked", [(name,) for name in FILES] + [FILES[:2]],
                         ids=["config", "weights", "metadata", "config+weights"])
def test_files_symlinked_out_of_the_root_are_refused(root, linked):
    shutil.copytree(root / "good", root / "evil")
    for name in linked:
        (root / "evil" / name).unlink()
        (root / "evil" / name).symlink_to(root.parent / "outside" / "good" / name)
    err = refused("evil", root, 403, "inside the adapter root")
    assert str(root) not in err.message
    # The same directory named by the operator (no root) is trusted and loads.
    assert load_peft_adapter(root / "evil", model_config()).rank == 4


def test_symlinks_that_stay_inside_the_root_load(root):
    (root / "shared").mkdir()
    (root / "linked").mkdir()
    for name in FILES:
        shutil.move(root / "good" / name, root / "shared" / name)
        (root / "linked" / name).symlink_to(Path("..") / "shared" / name)
    (root / "alias").symlink_to("linked")
    w = load_peft_adapter("alias", model_config(), root=root)
    assert (w.rank, w.role, w.display_path, w.path) == (4, "sft", "linked", (root / "linked").resolve())


@pytest.mark.parametrize("path,status,fragment", [
    ("good", 200, ""),
    ("./good/../good", 200, ""),
    ("../outside/good", 403, "inside the adapter root"),
    ("/etc", 403, "inside the adapter root"),
    ("/no/such/dir/anywhere", 403, "inside the adapter root"),  # outside: not told it is missing
    ("link-out", 403, "inside the adapter root"),
    ("link-out/missing", 403, "inside the adapter root"),
    ("missing", 400, "adapter directory missing does not exist"),
    ("~nosuchuser/x", 400, "does not exist"),  # no ~ expansion of client paths
    ("bad\x00name", 400, "NUL byte"),
    ("n" * 5000, 400, "cannot resolve"),  # one name over NAME_MAX
    ("/".join(["d" * 200] * 30), 400, "does not exist"),  # 6,000 characters, over PATH_MAX
    ("loop", 400, "cannot resolve (symlink loop"),
    ("loop/inner", 400, "cannot resolve"),
    ("plain.txt", 400, "is not a directory"),
    (".", 400, "missing adapter_config.json"),
])
def test_hostile_lora_paths(root, path, status, fragment):
    (root / "link-out").symlink_to(root.parent / "outside")
    (root / "loop").symlink_to("loop")
    (root / "plain.txt").write_text("x")
    if status == 200:
        assert load_peft_adapter(path, model_config(), root=root).display_path == "good"
    else:
        refused(path, root, status, fragment)


def test_absolute_path_inside_root_is_shown_relative(root):
    (root / "team").mkdir()
    shutil.move(root / "good", root / "team" / "a")
    w = load_peft_adapter(str(root / "team" / "a"), model_config(), root=root)
    assert w.display_path == "team/a" and w.name == "a"
    (root / "team" / "a" / "adapter_config.json").write_text("{oops")
    refused(root / "team" / "a", root, 400, "team/a/adapter_config.json: cannot parse")


def test_operator_paths_without_root_still_load(root):
    w = load_peft_adapter(str(root / "good"), model_config())
    assert (w.display_path, w.path) == ("", (root / "good").resolve())


# ----- 2. config files are validated by schema: wrong types are 400s naming the field -----

@pytest.mark.parametrize("file,patch,fragments", [
    ("adapter_config.json", {"task_type": ["CAUSAL_LM"]}, ("task_type", "valid string", "got list")),
    ("adapter_config.json", {"target_modules": 5}, ("target_modules", "got int")),
    ("adapter_config.json", {"target_modules": "(unclosed"}, ("target_modules", "is invalid")),
    ("adapter_config.json", {"rank_pattern": {"q_proj(": 2}}, ("rank_pattern", "not a valid regex")),
    ("adapter_config.json", {"alpha_pattern": {"[": 2}}, ("alpha_pattern", "not a valid regex")),
    ("adapter_config.json", {"rank_pattern": {"q_proj": True}}, ("rank_pattern",)),
    ("adapter_config.json", {"rank_pattern": ["q_proj"]}, ("rank_pattern",)),
    ("adapter_config.json", {"r": "4"}, ("adapter_config.json: r",)),
    ("adapter_config.json", {"r": 0}, ("adapter_config.json: r", "greater than 0")),
    ("adapter_config.json", {"lora_alpha": float("nan")}, ("lora_alpha", "finite")),
    ("adapter_config.json", {"peft_type": 5}, ("peft_type",)),
    ("adapter_config.json", {"bias": None}, ("bias",)),
    ("adapter_config.json", {"use_rslora": "yes"}, ("use_rslora",)),
    ("alignserve.json", {"role": ["sft"]}, ("alignserve.json: role", "got list")),
    ("alignserve.json", {"role": "judge"}, ("unknown role 'judge'",)),
    ("alignserve.json", {"base_fingerprint": "llama"}, ("base_fingerprint", "got str")),
    ("alignserve.json", {"base_fingerprint": {"hidden_size": [32]}}, ("base_fingerprint",)),
])
def test_mistyped_config_fields(root, file, patch, fragments):
    path = root / "good" / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    refused("good", root, 400, f"good/{file}", *fragments)


# ----- every other bad file is a 400 too -----

def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


BAD_FILES = {
    "config-not-utf8": ("adapter_config.json", lambda p: p.write_bytes(b'{"r": "\xff\xfe"}'), "cannot parse"),
    "config-array": ("adapter_config.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "config-huge-int": ("adapter_config.json", lambda p: p.write_text('{"r": ' + "9" * 5000 + "}"),
                        "cannot parse"),
    "config-deep": ("adapter_config.json", lambda p: p.write_text("[" * 100_000), "cannot parse"),
    "config-directory": ("adapter_config.json", _directory, "is not a regular file"),
    "config-fifo": ("adapter_config.json", _fifo, "is not a regular file"),
    "config-dangling": ("adapter_config.json", lambda p: (p.unlink(), p.symlink_to("gone.json")), "does not exist"),
    "config-loop": ("adapter_config.json", lambda p: (p.unlink(), p.symlink_to(p.name)), "symlink loop"),
    "weights-corrupt": ("adapter_model.safetensors", lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                        "cannot read adapter weights"),
    "weights-empty": ("adapter_model.safetensors", lambda p: p.write_bytes(b""), "cannot read adapter weights"),
    "weights-directory": ("adapter_model.safetensors", _directory, "is not a regular file"),
    "weights-fifo": ("adapter_model.safetensors", _fifo, "is not a regular file"),
    "bin-corrupt": ("adapter_model.safetensors", lambda p: (p.unlink(), p.with_suffix(".bin").write_bytes(b"PK?")),
                    "adapter_model.bin: cannot read adapter weights"),
    "metadata-fifo": ("alignserve.json", _fifo, "is not a regular file"),
    "metadata-array": ("alignserve.json", lambda p: p.write_text('["sft"]'), "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(root, case):
    name, damage, fragment = BAD_FILES[case]
    damage(root / "good" / name)
    refused("good", root, 400, fragment)


# ----- over HTTP: status codes and bodies that name no server path -----

@pytest.fixture(scope="module")
def hostile_server(model_dir, tmp_path_factory):
    from tests.adapters.real_lora import ATTENTION, make_real_adapter
    from tests.conftest import ServerProcess

    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    make_real_adapter(model_dir, root / "good", ATTENTION, 4, 1)
    shutil.copytree(root / "good", base / "outside" / "good")
    (root / "evil").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "evil" / name).symlink_to(base / "outside" / "good" / name)
    (root / "loop").symlink_to("loop")
    shutil.copytree(root / "good", root / "typed")
    config = root / "typed" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "task_type": ["CAUSAL_LM"]}))
    srv = ServerProcess("--adapter-root", str(root), "--num-kv-blocks", "256", api_key="k")
    srv.tmp = base
    yield srv
    srv.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("name,path,status", [
    ("ok", "good", 200),
    ("evil", "evil", 403),  # files symlinked out of the root
    ("etc", "/etc", 403),
    ("up", "../outside/good", 403),
    ("nul", "good\x00", 400),
    ("n" * 5000, "good", 400),
    ("long-name", "n" * 5000, 400),
    ("long-path", "/".join(["d" * 200] * 30), 400),
    ("loop", "loop", 400),
    ("typed", "typed", 400),
    ("missing", "missing", 400),
])
def test_http_hostile_loads(hostile_server, name, path, status):
    r = httpx.post(hostile_server.base_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                   headers=hostile_server.headers(), timeout=120)
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["path"] == "good"
        return
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert_no_server_path(r.text, hostile_server.tmp)
