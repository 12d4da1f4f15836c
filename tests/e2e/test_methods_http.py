"""Test-time methods over real HTTP with the `openai` client: best-of-N, DoLa, GenARM."""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.adapters.real_lora import ATTENTION, make_real_adapter
from tests.conftest import ServerProcess
from tests.e2e.probes import (CUT_MAX_TOKENS, gauge, open_request, read_first_chunk, requests_counted,
                              wait_until, wait_until_idle)
from tests.methods.adapters import make_reward_adapter, reward_and_error, reward_model

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "Suggest a name for a pet cat."}]


@pytest.fixture(scope="module")
def methods_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-adapters")
    make_real_adapter(model_dir, root / "arm", ATTENTION, 8, seed=11, std=0.1)
    make_reward_adapter(model_dir, root / "rm", seed=5)
    # float32 on any device (auto is bfloat16 on a GPU): rewards are checked against float64
    # HF with float32 error bounds (tests/methods/numerics.py).
    srv = ServerProcess("--adapter-root", str(root), "--lora-modules", f"arm={root / 'arm'}",
                        "--lora-modules", f"rm={root / 'rm'}", "--num-kv-blocks", "512", "--max-model-len", "1024",
                        "--dtype", "float32", api_key="k")
    srv.root = root
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(methods_server):
    return openai.OpenAI(base_url=methods_server.base_url + "/v1", api_key="k", max_retries=0)


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
    # Each reward equals HF + PEFT's float64 reward model on the rendered conversation, within
    # the float32 server's error bound.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = reward_model(model_dir, methods_server.root / "rm")
    expected, errors = [], []
    for text in texts:
        conv = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": text}], tokenize=False)
        reward, error = reward_and_error(hf, tok.encode(conv, add_special_tokens=False))
        expected.append(reward)
        errors.append(error)
    rewards = [c["reward"] for c in report["candidates"]]
    assert all(abs(a - b) <= e for a, b, e in zip(rewards, expected, errors)), (rewards, expected, errors)
    # The server picks its own best reward; HF's best unless rounding could reorder the two.
    [chosen] = report["chosen"]
    assert chosen == max(range(4), key=lambda i: (rewards[i], -i))
    winner = max(range(4), key=lambda i: (expected[i], -i))
    assert expected[winner] - expected[chosen] <= errors[winner] + errors[chosen], (chosen, winner, expected)
    assert best.choices[0].message.content == texts[chosen]
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
    ({"search": {"reward_model": "nope"}}, 404, "search.reward_model"),
    ({"search": {"reward_model": "arm"}}, 400, "search.reward_model"),
    ({"search": {"reward_model": "rm", "beam_width": 0}}, 400, "search.beam_width"),
    ({"search": {"reward_model": "rm", "block_tokens": "8"}}, 400, "search.block_tokens"),
    ({"search": {"reward_model": "rm", "width": 2}}, 400, "search.width"),
    ({"search": {"reward_model": "rm"}, "n": 2}, 400, "n"),
    ({"search": {"reward_model": "rm"}, "best_of": 2}, 400, "search"),
    ({"search": {"reward_model": "rm"}, "genarm": {"reward_model": "arm"}}, 400, "genarm"),
    ({"rain": {"evaluator": "nope"}}, 404, "rain.evaluator"),
    ({"rain": {"evaluator": "arm"}}, 400, "rain.evaluator"),
    ({"rain": {"mode": "fast"}}, 400, "rain.mode"),
    ({"rain": {"max_iterations": 0}}, 400, "rain.max_iterations"),
    ({"rain": {}, "n": 2}, 400, "n"),
    ({"rain": {}, "logprobs": True}, 400, "logprobs"),
    ({"rain": {}, "search": {"reward_model": "rm"}}, 400, "rain"),
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
    srv = methods_server
    wait_until_idle(srv)
    ok_before = requests_counted(srv, "chat", "ok")
    aborted_before = requests_counted(srv, "chat", "aborted")
    long = {"messages": QUESTION, "max_tokens": CUT_MAX_TOKENS, "ignore_eos": True, "temperature": 1.0}
    # Best-of-N cannot stream: it goes first, alone, so "running" can only be it.
    socks = [open_request(srv, "/v1/chat/completions", {**long, "best_of": 4, "reward_model": "rm"})]
    try:
        wait_until(lambda: gauge(srv, "alignserve_num_requests_running") >= 1, "best-of-N running")
        # The two streams are running once their first chunk is here; all three are cut together.
        for extra in ({"genarm": {"reward_model": "arm"}}, {"dola_layers": "low"}):
            socks.append(open_request(srv, "/v1/chat/completions", {**long, **extra, "stream": True}))
            read_first_chunk(socks[-1])
    finally:
        for sock in socks:
            sock.close()
    # The non-streaming cut is seen and counted as such; the streams end with their connection.
    wait_until(lambda: requests_counted(srv, "chat", "aborted") >= aborted_before + 1, "counted as aborted")
    wait_until_idle(srv)
    assert requests_counted(srv, "chat", "ok") == ok_before, "a cut request ran to its end"
    # The server still serves after the cuts.
    ok = httpx.post(srv.base_url + "/v1/chat/completions", headers=srv.headers(),
                    json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, json.dumps(ok.json())
    assert requests_counted(srv, "chat", "ok") == ok_before + 1  # the count above is live


def test_block_search_over_http_streamed_and_not(client, methods_server):
    """The same seeded block search, streamed and not: the same text; the stream carries the
    committed blocks as they are chosen and the report on its last chunk."""
    options = {"search": {"reward_model": "rm", "beam_width": 3, "block_tokens": 4, "max_blocks": 3}}
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=1.0, seed=5, max_tokens=12)
    full = client.chat.completions.create(**kwargs, extra_body=options)
    report = full.model_extra["alignment"]["search"]
    assert report["num_blocks"] >= 1 and all(len(b["candidates"]) == 3 for b in report["blocks"])
    text = "".join(b["candidates"][b["chosen"]]["text"] for b in report["blocks"])
    assert full.choices[0].message.content == text
    # Usage counts every branch's tokens: the search's real cost.
    assert full.usage.completion_tokens == sum(c["num_tokens"] for b in report["blocks"] for c in b["candidates"])
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body=options))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= min(2, report["num_blocks"])
    # Same branches and choices; rewards equal up to fp32 rounding (the second run's prompt
    # comes from the prefix cache, so its matmuls have other shapes).
    blocks = chunks[-1].model_extra["alignment"]["search"]["blocks"]
    assert [(b["chosen"], [c["text"] for c in b["candidates"]]) for b in blocks] == \
        [(b["chosen"], [c["text"] for c in b["candidates"]]) for b in report["blocks"]]
    assert all(abs(c["reward"] - d["reward"]) < 1e-3 for b, e in zip(blocks, report["blocks"])
               for c, d in zip(b["candidates"], e["candidates"]))


def cut_after_first_chunk(srv, extra: dict) -> None:
    """Stream a long request with a search option, drop it at its first chunk, wait for idle."""
    wait_until_idle(srv)
    body = {"messages": QUESTION, "max_tokens": 200, "temperature": 1.0, "stream": True, **extra}
    sock = open_request(srv, "/v1/chat/completions", body)
    try:
        read_first_chunk(sock)
    finally:
        sock.close()
    wait_until_idle(srv)


@pytest.mark.parametrize("extra", [
    {"search": {"reward_model": "rm", "beam_width": 2, "block_tokens": 2, "max_blocks": 200}},
    {"rain": {"evaluator": "rm", "max_iterations": 2, "token_set_size": 2, "rollout_max_tokens": 2}},
], ids=["block-search", "rain"])
def test_cut_search_stream_frees_everything(methods_server, extra):
    cut_after_first_chunk(methods_server, extra)


RAIN_SMALL = {"rain": {"evaluator": "rm", "max_iterations": 2, "min_iterations": 1, "token_set_size": 2,
                       "token_set_lengths": [1, 2], "rollout_max_tokens": 2}}


def test_rain_over_http_streamed_and_not(client):
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=1.0, seed=2, max_tokens=4)
    full = client.chat.completions.create(**kwargs, extra_body=RAIN_SMALL)
    report = full.model_extra["alignment"]["rain"]
    assert report["evaluator"] == "rm" and report["iterations"] >= 1
    assert full.choices[0].message.content and full.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body=RAIN_SMALL))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(len({ch.index for ch in c.choices}) == len(c.choices) for c in chunks)  # one choice per index
    assert streamed == full.choices[0].message.content  # seeded: the same search
    assert chunks[-1].model_extra["alignment"]["rain"]["evaluator"] == "rm"
