"""Test-time methods over real HTTP with the `openai` client: best-of-N, DoLa, GenARM."""
from __future__ import annotations

import asyncio
import json
import math
import re
import time

import httpx
import openai
import pytest
import torch

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import ServerProcess
from tests.methods.adapters import make_reward_adapter, reward_model

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "Suggest a name for a pet cat."}]


@pytest.fixture(scope="module")
def methods_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-adapters")
    make_real_adapter(model_dir, root / "arm", ATTENTION, 8, seed=11, std=0.1)
    make_reward_adapter(model_dir, root / "rm", seed=5)
    srv = ServerProcess("--adapter-root", str(root), "--lora-modules", f"arm={root / 'arm'}",
                        "--lora-modules", f"rm={root / 'rm'}", "--num-kv-blocks", "512", "--max-model-len", "1024", api_key="k")
    srv.root = root
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(methods_server):
    return openai.OpenAI(base_url=methods_server.base_url + "/v1", api_key="k", max_retries=0)


def used_blocks(srv) -> float:
    text = httpx.get(srv.base_url + "/metrics", headers=srv.headers()).text
    return float(re.search(r"^alignserve_kv_cache_used_blocks (\S+)$", text, re.M).group(1))


def test_best_of_reward_model_picks_the_hf_argmax(client, methods_server, model_dir):
    sampling = dict(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=1.0, seed=9, max_tokens=16)
    best = client.chat.completions.create(**sampling, extra_body={"best_of": 4, "reward_model": "rm"})
    report = best.model_extra["alignment"]["best_of_n"]
    assert report["n"] == 4 and report["scorer"] == "rm"
    assert math.isclose(report["kl_bound"], math.log(4) - 3 / 4)
    # The candidates are exactly what the same sampling gives with n = 4.
    plain = client.chat.completions.create(**sampling, n=4)
    texts = [c["text"] for c in report["candidates"]]
    assert texts == [c.message.content for c in plain.choices]
    assert len(set(texts)) > 1
    # Each reward equals HF + PEFT's reward model on the rendered conversation.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = reward_model(model_dir, methods_server.root / "rm")
    expected = []
    for text in texts:
        conv = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": text}], tokenize=False)
        ids = tok.encode(conv, add_special_tokens=False)
        with torch.no_grad():
            expected.append(float(hf(torch.tensor([ids])).logits[0, 0]))
    rewards = [c["reward"] for c in report["candidates"]]
    assert max(abs(a - b) for a, b in zip(rewards, expected)) < 1e-3
    winner = max(range(4), key=lambda i: (expected[i], -i))
    assert report["chosen"] == [winner]
    assert best.choices[0].message.content == texts[winner]
    assert best.usage.completion_tokens == plain.usage.completion_tokens


def test_best_of_without_reward_model_ranks_by_mean_logprob(client):
    sampling = dict(model="SmolLM2-135M-Instruct", prompt="My favourite fruit is", temperature=1.0, seed=4,
                    max_tokens=8)
    best = client.completions.create(**sampling, n=2, extra_body={"best_of": 3})
    plain = client.completions.create(**sampling, n=3, logprobs=0)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in plain.choices]
    order = sorted(range(3), key=lambda i: (-means[i], i))
    assert [c.text for c in best.choices] == [plain.choices[i].text for i in order[:2]]
    assert best.choices[0].logprobs is None  # not asked for
    assert best.model_extra["alignment"]["best_of_n"]["chosen"] == order[:2]


def test_dola_and_genarm_over_http(client):
    dola = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0.0,
                                          max_tokens=8, extra_body={"dola_layers": "high", "repetition_penalty": 1.2})
    layers = dola.model_extra["alignment"]["dola"]["premature_layers"][0]
    assert len(layers) == dola.usage.completion_tokens and set(layers) <= set(range(15, 30, 2))
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0.0,
                                            max_tokens=8, stream=True,
                                            extra_body={"dola_layers": "high", "repetition_penalty": 1.2})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == dola.choices[0].message.content
    assert chunks[-1].model_extra["alignment"]["dola"]["premature_layers"][0] == layers

    guided = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0.0,
                                            max_tokens=8, extra_body={"genarm": {"reward_model": "arm", "alpha": 1.0}})
    assert guided.model_extra["alignment"]["genarm"]["guided_tokens"] == guided.usage.completion_tokens
    unguided = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0.0,
                                              max_tokens=8, extra_body={"genarm": {"reward_model": "arm", "alpha": 0}})
    base = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0.0,
                                          max_tokens=8)
    assert unguided.choices[0].message.content == base.choices[0].message.content
    assert "alignment" not in (base.model_extra or {})


@pytest.mark.parametrize("extra,status,param", [
    ({"best_of": 2, "reward_model": "nope"}, 404, "reward_model"),
    ({"best_of": 2, "reward_model": "arm"}, 400, "reward_model"),
    ({"best_of": 1, "n": 2}, 400, None),
    ({"reward_model": "rm"}, 400, None),
    ({"best_of": 2, "stream": True}, 400, None),
    ({"best_of": 99}, 400, "best_of"),
    ({"dola_layers": "middle"}, 400, None),
    ({"dola_layers": [45]}, 400, "dola_layers"),
    ({"dola_layers": "high", "genarm": {"reward_model": "arm"}}, 400, None),
    ({"genarm": {"reward_model": "nope"}}, 404, "genarm.reward_model"),
    ({"genarm": {"reward_model": "rm"}}, 400, "genarm.reward_model"),
    ({"genarm": {"reward_model": "arm", "alpha": -1}}, 400, None),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
])
def test_bad_method_options_get_clear_errors(methods_server, extra, status, param):
    body = {"messages": QUESTION, "max_tokens": 4, **extra}
    r = httpx.post(methods_server.base_url + "/v1/chat/completions", json=body, headers=methods_server.headers(),
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert httpx.get(methods_server.base_url + "/health").status_code == 200


def test_cut_best_of_and_genarm_requests_free_everything(methods_server):
    async def cut(body: dict) -> None:
        async with httpx.AsyncClient(base_url=methods_server.base_url, headers=methods_server.headers()) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/chat/completions", json=body, timeout=1.5)

    async def main() -> None:
        long = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "temperature": 1.0}
        await asyncio.gather(cut({**long, "best_of": 4, "reward_model": "rm"}),
                             cut({**long, "genarm": {"reward_model": "arm"}}),
                             cut({**long, "dola_layers": "low"}))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while used_blocks(methods_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert used_blocks(methods_server) == 0
    text = httpx.get(methods_server.base_url + "/metrics", headers=methods_server.headers()).text
    assert re.search(r"^alignserve_num_requests_running 0\.0$", text, re.M), text[:2000]
    # The server still serves after the cuts.
    ok = httpx.post(methods_server.base_url + "/v1/chat/completions", headers=methods_server.headers(),
                    json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, json.dumps(ok.json())
