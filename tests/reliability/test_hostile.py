"""Hostile requests: each gets its OpenAI-shaped 4xx (never a 5xx), and the server keeps serving.

Runs against the session's real server (`--api-key test-key`, 8 MiB body limit, no adapter
root). Every row is one thing a careless or hostile client sends.
"""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.reliability.helpers import BASE, assert_openai_error

pytestmark = pytest.mark.e2e
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": BASE, "messages": HI, "max_tokens": 4, **fields}


def compl(**fields) -> dict:
    return {"model": BASE, "prompt": "hi", "max_tokens": 4, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, path, body: dict | str | bytes, status, param (... = not checked))
CASES = [
    # ---- body encoding ----
    ("invalid-json", CHAT, b"{bad", 400, None),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("array-body", CHAT, b"[1, 2]", 400, None),
    ("deep-nesting-100k", CHAT, ('{"messages": ' + nested(100_000) + "}").encode(), 400, None),
    ("deep-nesting-in-field", CHAT, json.dumps(chat(user=None))[:-1].encode()
     + b', "genarm": ' + nested(200).encode() + b"}", 400, None),
    # ---- fields we do not implement ----
    ("tools-no-name", CHAT, chat(tools=[{"type": "function", "function": {}}]), 400, "tools.0.function.name"),
    ("tool_choice-without-tools", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("functions", CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("response_format-json_schema-empty", CHAT, chat(response_format={"type": "json_schema", "json_schema": {}}),
     400, "response_format.json_schema.name"),
    ("response_format-unknown-type", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format"),
    ("response_format-schema-invalid", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}), 400, "response_format"),
    ("response_format-schema-uncompilable", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/missing"}}}), 400, "response_format"),
    ("logit_bias-key-not-an-id", CHAT, chat(logit_bias={"a": 5}), 400, "logit_bias"),
    ("logit_bias-value-range", CHAT, chat(logit_bias={"1": 500}), 400, "logit_bias"),
    ("logit_bias-value-str", CHAT, chat(logit_bias={"1": "x"}), 400, "logit_bias"),
    ("logit_bias-past-vocab", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("guided_regex-invalid", CHAT, chat(guided_regex="(("), 400, "guided_regex"),
    ("two-structured-fields", CHAT, chat(guided_choice=["a"], guided_regex="a"), 400, "guided_choice"),
    ("min_tokens-past-max_tokens", CHAT, chat(min_tokens=5), 400, "min_tokens"),
    ("stream_options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("unknown-field", CHAT, chat(frobnicate=1), 400, "frobnicate"),
    ("vllm-extension-not-ours", COMPL, compl(guided_grammar="root ::= 'a'"), 400, "guided_grammar"),
    # ---- wrong types and ranges, sampling fields ----
    ("temperature-str", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature-range", CHAT, chat(temperature=5), 400, "temperature"),
    ("top_p-zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_k-zero", CHAT, chat(top_k=0), 400, "top_k"),
    ("top_k-float", CHAT, chat(top_k=2.5), 400, "top_k"),
    ("n-zero", CHAT, chat(n=0), 400, "n"),
    ("n-huge", CHAT, chat(n=100_000), 400, "n"),
    ("n-bool", CHAT, chat(n=True), 400, "n"),
    ("max_tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-float", COMPL, compl(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens-past-context", COMPL, compl(max_tokens=10**9), 400, "max_tokens"),
    ("seed-str", CHAT, chat(seed="x"), 400, "seed"),
    ("stop-huge-list", CHAT, chat(stop=["x"] * 1000), 400, "stop"),
    ("stop-empty-string", CHAT, chat(stop=[""]), 400, "stop"),
    ("stop-int", CHAT, chat(stop=5), 400, ...),
    ("stop_token_ids-str", CHAT, chat(stop_token_ids=["a"]), 400, "stop_token_ids.0"),
    ("presence_penalty-range", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty-str", CHAT, chat(frequency_penalty="x"), 400, "frequency_penalty"),
    ("repetition_penalty-zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("ignore_eos-str", CHAT, chat(ignore_eos="yes"), 400, "ignore_eos"),
    ("stream-int", CHAT, chat(stream=1), 400, "stream"),
    ("top_logprobs-huge", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("completion-logprobs-bool", COMPL, compl(logprobs=True), 400, "logprobs"),
    # ---- extension (method) fields ----
    ("best_of-huge", CHAT, chat(best_of=100_000), 400, "best_of"),
    ("best_of-below-n", CHAT, chat(n=3, best_of=2), 400, "best_of"),
    ("best_of-streamed", CHAT, chat(best_of=2, stream=True), 400, "best_of"),
    ("reward_model-without-best_of", CHAT, chat(reward_model="rm"), 400, "reward_model"),
    ("reward_model-unknown", CHAT, chat(best_of=2, reward_model="nope"), 404, "reward_model"),
    ("dola_layers-bad-name", CHAT, chat(dola_layers="mid"), 400, ...),
    ("dola_layers-out-of-range", CHAT, chat(dola_layers=[999]), 400, "dola_layers"),
    ("dola_relative_top-str", CHAT, chat(dola_layers="high", dola_relative_top="x"), 400, "dola_relative_top"),
    ("genarm-alpha-str", CHAT, chat(genarm={"reward_model": "a", "alpha": "x"}), 400, "genarm.alpha"),
    ("genarm-extra-key", CHAT, chat(genarm={"reward_model": "a", "beta": 1}), 400, "genarm.beta"),
    ("genarm-unknown-adapter", CHAT, chat(genarm={"reward_model": "nope"}), 404, "genarm.reward_model"),
    ("dola-with-genarm", CHAT, chat(dola_layers="high", genarm={"reward_model": "a"}), 400, "genarm"),
    # ---- messages and prompts ----
    ("model-unknown", CHAT, chat(model="gpt-9"), 404, "model"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-missing", CHAT, {"model": BASE}, 400, "messages"),
    ("messages-bad-role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, ...),
    ("messages-content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, ...),
    ("messages-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), 400, "messages.0.content"),
    ("messages-not-objects", CHAT, chat(messages=["hi"]), 400, ...),
    ("prompt-empty-list", COMPL, compl(prompt=[]), 400, ...),
    ("prompt-empty-string", COMPL, compl(prompt=""), 400, ...),
    ("prompt-negative-id", COMPL, compl(prompt=[-1]), 400, "prompt"),
    ("prompt-id-past-vocab", COMPL, compl(prompt=[10**9]), 400, "prompt"),
    ("prompt-batched", COMPL, compl(prompt=["a", "b"]), 400, "prompt"),
    ("prompt-past-context", COMPL, compl(prompt=[1] * 5000), 400, ...),
    ("echo-streamed", COMPL, compl(echo=True, stream=True), 400, "echo"),
    ("prompt_logprobs-streamed", COMPL, compl(prompt_logprobs=1, stream=True), 400, "prompt_logprobs"),
    ("prompt_logprobs-past-20", COMPL, compl(prompt_logprobs=21), 400, "prompt_logprobs"),
    ("max_tokens-negative-completion", COMPL, compl(max_tokens=-1), 400, "max_tokens"),
    ("knn_lm-unknown-datastore", COMPL, compl(knn_lm={"datastore": "nope"}), 404, "knn_lm.datastore"),
    ("knn_lm-k-zero", COMPL, compl(knn_lm={"datastore": "x", "k": 0}), 400, "knn_lm.k"),
    ("rag-unknown-index", CHAT, chat(rag={"index": "nope"}), 404, "rag.index"),
    ("rag-top_k-huge", CHAT, chat(rag={"index": "x", "top_k": 10000}), 400, "rag.top_k"),
    ("body-past-limit", CHAT, b'{"messages": "' + b"x" * (9 * 1024 * 1024) + b'"}', 413, None),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_gets_its_4xx(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.base_url + path, content=content, timeout=120,
                   headers={**server.headers(), "content-type": "application/json"})
    assert_openai_error(r, status, param)


def test_the_table_is_long_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/metrics",
                                  "/v1/models"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dGVzdC1rZXk6", "test-key"])
def test_every_route_but_health_needs_the_key(server, path, authorization):
    headers = {"authorization": authorization} if authorization else {}
    assert_openai_error(httpx.get(server.base_url + path, headers=headers), 401)


def test_auth_comes_before_the_body(server):
    """No key and a malformed body: 401, not the body's 400 (the body is never parsed)."""
    r = httpx.post(server.base_url + CHAT, content=b"{bad", headers={"content-type": "application/json"})
    assert_openai_error(r, 401)


def test_chunked_body_past_the_limit_is_413(server):
    """No Content-Length: the limit is enforced while the body streams in."""
    def chunks():
        yield b'{"messages": "'
        for _ in range(10):
            yield b"x" * (1024 * 1024)
        yield b'"}'
    r = httpx.post(server.base_url + CHAT, content=chunks(), timeout=120,
                   headers={**server.headers(), "content-type": "application/json"})
    assert_openai_error(r, 413)


def test_wrong_method_says_what_is_allowed(server):
    r = httpx.get(server.base_url + CHAT, headers=server.headers())
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_unknown_route_is_a_404(server):
    assert_openai_error(httpx.get(server.base_url + "/v2/everything", headers=server.headers()), 404)


def test_content_as_list_of_text_parts_equals_the_string(server):
    """OpenAI allows content as [{"type": "text", "text": ...}]; it must mean the same text."""
    def ask(content) -> str:
        body = chat(messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0)
        r = httpx.post(server.base_url + CHAT, json=body, headers=server.headers(), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    parts = [{"type": "text", "text": "Name a colour"}, {"type": "text", "text": " of the sky."}]
    assert ask(parts) == ask("Name a colour of the sky.")


def test_no_op_values_of_unimplemented_fields_are_accepted(server):
    """SDKs send defaults such as `tools: []` or `response_format: {"type": "text"}`."""
    body = chat(tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={}, store=False)
    r = httpx.post(server.base_url + CHAT, json=body, headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text


def test_health_is_json(server):
    r = httpx.get(server.base_url + "/health")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"status": "ok"}


def test_a_large_body_does_not_stall_other_clients(server):
    """A 1 MB chat body takes a while to parse, template and tokenize. That work runs off the
    event loop, so /health sent after the upload finished answers before the big request does
    (an ordering, not a timing: on a blocked loop /health would wait for the big request)."""
    uploaded = threading.Event()
    big_done = threading.Event()
    health_before_big: list[bool] = []

    def body():
        yield b'{"model": "' + BASE.encode() + b'", "max_tokens": 1, "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"lorem ipsum dolor sit amet " * 3800
        yield b'"}]}'
        uploaded.set()

    def big():
        r = httpx.post(server.base_url + CHAT, content=body(), timeout=300,
                       headers={**server.headers(), "content-type": "application/json"})
        big_done.set()
        assert_openai_error(r, 400, ...)  # far past the context length

    thread = threading.Thread(target=big)
    thread.start()
    uploaded.wait(120)
    r = httpx.get(server.base_url + "/health", timeout=120)
    health_before_big.append(not big_done.is_set())
    thread.join(300)
    assert r.status_code == 200
    assert health_before_big == [True]
