"""The real `openai` client against `alignserve serve` started as a subprocess."""
from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_lists_the_base_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"),
                                       max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=ask("Name three fruits."), max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_stream_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 12


def test_n2_gives_two_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Suggest a name for a dog."), n=2,
                                       max_tokens=16, temperature=1.0, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 32  # counted over both choices
    stream = client.chat.completions.create(model=MODEL, messages=ask("Suggest a name for a dog."), n=2,
                                            max_tokens=16, temperature=1.0, seed=5, stream=True)
    texts = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {c.index: c.message.content for c in r.choices}


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL, messages=ask("Write a sentence about rain."), max_tokens=20, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=42).choices[0].message.content
    c = client.chat.completions.create(**kwargs, seed=43).choices[0].message.content
    assert a == b and a != c


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0)
    text = base.choices[0].text
    assert "7" in text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=["7"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index("7")]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Say hi."), max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-5
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 4
    assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_errors_are_openai_shaped_and_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=ask("hi"))
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    assert "1024" in e.value.body["message"] and "5000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    r = httpx.post(server.base_url + "/v1/completions", content=b"{not json", headers=server.headers())
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": [10**9]}, headers=server.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert client.completions.create(model=MODEL, prompt="Still alive?", max_tokens=2).choices


def test_api_key_required_except_health(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = httpx.get(server.base_url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.base_url + "/metrics", headers=server.headers()).status_code == 200
