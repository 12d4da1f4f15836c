"""vLLM's utility routes over real HTTP: /tokenize (text and chat) equals the engine's own
tokenizer, /detokenize round-trips, /version answers; bad input is a 400 / 404 naming the
field, and every route wants the API key. Runs on the session's server (key `test-key`)."""
from __future__ import annotations

import httpx
import pytest

from server.engine.tokenizer import Tokenizer
from server.api.tools import chat_messages
from server.api.protocol import ChatCompletionRequest

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
TEXTS = ["Hello world", "  leading spaces and ünïcödé 🙂", "line\nbreaks\tand tabs", "<|im_start|>user"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=60) as client:
        yield client


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_text_equals_engine_and_round_trips(http, tokenizer, text):
    out = http.post("/tokenize", json={"prompt": text, "model": MODEL})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["tokens"] == tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    back = http.post("/detokenize", json={"tokens": body["tokens"], "model": MODEL})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_chat_equals_the_chat_route(http, tokenizer):
    for add in (True, False):
        body = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": add}).json()
        assert body["tokens"] == tokenizer.apply_chat_template(CHAT, add)
        specials = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": add,
                                                "add_special_tokens": True}).json()
        assert specials["tokens"] == tokenizer.hf.encode(
            tokenizer.hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add), add_special_tokens=True)
        text = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
        assert text == tokenizer.hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
    # The prompt a chat completion runs on: same count as its usage.prompt_tokens.
    done = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    counted = http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert done["usage"]["prompt_tokens"] == counted


def test_tokenize_chat_with_tools_renders_them(http, tokenizer):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    body = http.post("/tokenize", json={"messages": CHAT, "tools": tools}).json()
    request = ChatCompletionRequest.model_validate({"messages": CHAT, "tools": tools})
    assert body["tokens"] == tokenizer.apply_chat_template(chat_messages(request, native=False), True)
    assert "<tools>" in http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]


def test_version(http):
    out = http.get("/version")
    assert out.status_code == 200 and isinstance(out.json()["version"], str) and out.json()["version"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": "yes"}, 400, "add_generation_prompt"),
    ("/tokenize", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/tokenize", {"messages": CHAT, "tools": [{"type": "function", "function": {}}]}, 400, "tools.0.function.name"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
])
def test_bad_input_is_an_openai_error(http, path, body, status, param):
    out = http.post(path, json=body)
    assert out.status_code == status, out.text
    assert out.json()["error"]["param"] == param, out.json()


def test_bad_json_and_the_key(http, server):
    out = http.post("/tokenize", content=b"{bad", headers={"Content-Type": "application/json"})
    assert out.status_code == 400 and out.json()["error"]["code"] == "invalid_json"
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version")):
        anonymous = httpx.request(method, server.base_url + path, json={"prompt": "x"}, timeout=30)
        assert anonymous.status_code == 401, (path, anonymous.text)
