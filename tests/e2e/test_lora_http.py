"""Runtime LoRA over HTTP with the real `openai` client: load, use, unload, path checks, churn."""
from __future__ import annotations

import asyncio
import os
import re

import httpx
import openai
import pytest

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import ServerProcess
from tests.e2e.probes import wait_until_idle

pytestmark = pytest.mark.e2e
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def lora_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        make_real_adapter(model_dir, root / name, ATTENTION, 8, seed)
    outside = tmp_path_factory.mktemp("outside")
    make_real_adapter(model_dir, outside / "evil", ATTENTION, 8, 4)
    os.symlink(outside / "evil", root / "link-out")
    srv = ServerProcess("--adapter-root", str(root), "--lora-modules", f"alpha={root / 'alpha'}",
                        "--max-loras", "4", "--num-kv-blocks", "2048", api_key="k")
    srv.root, srv.outside = root, outside
    yield srv
    srv.stop()


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, headers=srv.headers(), timeout=120)


def test_load_use_unload(lora_server):
    client = openai.OpenAI(base_url=lora_server.base_url + "/v1", api_key="k", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "alpha"}
    assert models["alpha"].parent == BASE
    r = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "beta"})
    assert r.status_code == 200, r.text
    kwargs = dict(messages=[{"role": "user", "content": "Say something."}], max_tokens=12, temperature=0)
    base = client.chat.completions.create(model=BASE, **kwargs).choices[0].message.content
    beta = client.chat.completions.create(model="beta", **kwargs)
    assert beta.model == "beta" and beta.choices[0].message.content != base
    assert post(lora_server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "beta"}).status_code == 400
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="beta", **kwargs)
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code == 404
    metrics = httpx.get(lora_server.base_url + "/metrics", headers=lora_server.headers()).text
    assert re.search(r'alignserve_model_requests_total\{model="beta"\} 1\.0', metrics)
    assert re.search(r'alignserve_lora_events_total\{event="unload"\} [1-9]', metrics)


@pytest.mark.parametrize("path,status", [
    ("../outside/evil", 403), ("/etc", 403), ("link-out", 403), ("missing-dir", 400), ("", 400),
])
def test_bad_paths_refused(lora_server, path, status):
    if path == "../outside/evil":
        path = os.path.relpath(lora_server.outside / "evil", lora_server.root)
    r = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == "lora_path"


def test_not_a_lora_and_absolute_outside(lora_server):
    r = post(lora_server, "/v1/load_lora_adapter",
             {"lora_name": "y", "lora_path": str(lora_server.outside / "evil")})
    assert r.status_code == 403
    (lora_server.root / "notlora").mkdir(exist_ok=True)
    (lora_server.root / "notlora" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    r = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": "notlora"})
    assert r.status_code == 400 and "IA3" in r.json()["error"]["message"]


def test_churn_during_concurrent_streams(lora_server):
    """Load/unload gamma while 16 streams of alpha and the base run; none may fail."""

    async def stream(client: openai.AsyncOpenAI, model: str, i: int) -> int:
        chunks = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell a story #{i}."}],
            max_tokens=24, temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True})
        n = 0
        async for c in chunks:
            n += sum(1 for ch in c.choices if ch.delta.content)
        return n

    async def churn(http: httpx.AsyncClient) -> list[int]:
        codes = []
        for _ in range(3):
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma"})
            codes.append(r.status_code)
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
            codes.append(r.status_code)
        return codes

    async def main():
        client = openai.AsyncOpenAI(base_url=lora_server.base_url + "/v1", api_key="k", max_retries=0, timeout=300)
        async with httpx.AsyncClient(base_url=lora_server.base_url, headers=lora_server.headers(),
                                     timeout=120) as http:
            streams = [stream(client, "alpha" if i % 2 else BASE, i) for i in range(16)]
            return await asyncio.gather(churn(http), *streams)

    codes, *counts = asyncio.run(main())
    assert codes == [200, 200] * 3
    assert all(n > 0 for n in counts)
    wait_until_idle(lora_server)  # the gauge moves just after the last chunk goes out
