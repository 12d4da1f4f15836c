"""`--backend vllm` without vLLM: option checks, the 400s for methods that need our engine,
and our app's translation to and from vLLM's wire format.

The app, protocol, tokenizer (the real default model's), RAG-free chat templating and response
builders are the real ones; only vLLM itself is replaced, by a recorded `/v1/completions` SSE
stream behind httpx's transport (the slow test in test_vllm_backend.py runs real vLLM).
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server.cli import app as cli
from server.engine.metrics import ServerMetrics
from server.engine.sequence import SamplingParams
from server.engine.tokenizer import Tokenizer
from server.models.config import ModelConfig
from server.scale.vllm_backend import ENGINE_METHODS, VLLMServing, build_vllm_app
from server.scale.vllm_client import VLLMClient, VLLMRequest, completion_body, parse_logprobs
from server.scale.vllm_launch import BackendOptions, check_backend_options
from server.scale.vllm_process import VLLMOptions, server_argv

BASE = "SmolLM2-135M-Instruct"
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0.0}
# One body per method that needs our engine's internals (each otherwise valid for our protocol).
METHOD_BODIES = {
    "best_of": {"best_of": 2},
    "dola_layers": {"dola_layers": "high"},
    "genarm": {"genarm": {"reward_model": "arm"}},
    "knn_lm": {"knn_lm": {"datastore": "wiki"}},
    "rain": {"rain": {}},
    "search": {"search": {"reward_model": "rm"}},
}


@pytest.mark.parametrize("opts, error", [
    (BackendOptions(tensor_parallel_size=2), "need --backend vllm"),
    (BackendOptions(pipeline_parallel_size=2), "need --backend vllm"),
    (BackendOptions("vllm", replicas=2), "not --replicas"),
    (BackendOptions("vllm", ray_address="auto"), "not --replicas"),
    (BackendOptions("vllm", quantization="int4"), "--quantization int4"),
    (BackendOptions("vllm", tensor_parallel_size=0), ">= 1"),
    (BackendOptions("tgi"), "--backend must be one of"),
])
def test_backend_options_refused(opts, error):
    with pytest.raises(ValueError, match=error):
        check_backend_options(opts)


def test_backend_options_accepted():
    check_backend_options(BackendOptions())
    check_backend_options(BackendOptions("vllm", tensor_parallel_size=2, pipeline_parallel_size=2))


def test_cli_refuses_parallelism_on_our_engine():
    result = CliRunner().invoke(cli, ["serve", "--tensor-parallel-size", "2"])
    assert result.exit_code == 2
    assert "--backend vllm" in result.output


def test_vllm_argv_maps_our_options(tmp_path):
    opts = VLLMOptions(tmp_path, BASE, "float32", 2048, tensor_parallel_size=2, pipeline_parallel_size=3,
                       lora_modules=(("a1", tmp_path / "a1"),), enable_prefix_caching=False)
    argv = server_argv(Path("/py"), opts, 9000)

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert value("--tensor-parallel-size") == "2" and value("--pipeline-parallel-size") == "3"
    assert value("--host") == "127.0.0.1" and value("--port") == "9000"
    assert value("--served-model-name") == BASE and value("--dtype") == "float32"
    assert value("--lora-modules") == f"a1={tmp_path / 'a1'}" and "--enable-lora" in argv
    assert "--no-enable-prefix-caching" in argv
    assert value("--kv-cache-memory-bytes") == str(2 * 1024**3) and "--gpu-memory-utilization" not in argv
    gpu = server_argv(Path("/py"), VLLMOptions(tmp_path, BASE, on_gpu=True), 9000)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.9" and "--kv-cache-memory-bytes" not in gpu
    with pytest.raises(ValueError):
        VLLMOptions(tmp_path, BASE, pipeline_parallel_size=0)


def test_completion_body_carries_our_sampling_params():
    params = SamplingParams(n=2, temperature=0.5, top_p=0.9, top_k=5, seed=3, max_tokens=7, stop=("\n",),
                            stop_token_ids=(2,), min_p=0.1, min_tokens=1, logprobs=3, repetition_penalty=1.1)
    body = completion_body("a1", [1, 2, 3], VLLMRequest(params, {"bad_words": ["x"]}))
    assert body["model"] == "a1" and body["prompt"] == [1, 2, 3] and body["stream"] is True
    assert (body["n"], body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (2, 0.5, 0.9, 5, 3)
    assert (body["max_tokens"], body["stop"], body["stop_token_ids"]) == (7, ["\n"], [2])
    assert (body["min_p"], body["min_tokens"], body["repetition_penalty"]) == (0.1, 1, 1.1)
    assert body["logprobs"] == 3 and body["return_tokens_as_token_ids"] and body["return_token_ids"]
    assert body["bad_words"] == ["x"]
    assert "logprobs" not in completion_body("m", [1], VLLMRequest(SamplingParams()))


def test_parse_logprobs_keeps_the_k_likeliest():
    raw = {"tokens": ["token_id:7"], "token_logprobs": [-0.5],
           "top_logprobs": [{"token_id:7": -0.5, "token_id:9": -0.2, "token_id:4": -3.0}]}
    (lp,) = parse_logprobs(raw, 2)
    assert lp.token_id == 7 and lp.logprob == -0.5 and lp.top == [(9, -0.2), (7, -0.5)]
    assert parse_logprobs(raw, None) is None


class RecordedVLLM:
    """vLLM's /v1/completions as it streams (return_token_ids), for a fixed reply text."""

    def __init__(self, tokenizer: Tokenizer, reply: str) -> None:
        self.ids = tokenizer.hf.encode(reply, add_special_tokens=False)
        self.pieces = [tokenizer.decode([i]) for i in self.ids]
        self.bodies: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        lines = []
        for k, (i, text) in enumerate(zip(self.ids, self.pieces)):
            last = k == len(self.ids) - 1
            lp = None
            if body.get("logprobs") is not None:
                lp = {"tokens": [f"token_id:{i}"], "token_logprobs": [-0.25], "text_offset": [0],
                      "top_logprobs": [{f"token_id:{i}": -0.25, "token_id:0": -2.0}]}
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": "stop" if last else None,
                      "stop_reason": None, "token_ids": [i]}
            lines.append(json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0,
                                     "model": body["model"], "choices": [choice]}))
        sse = "".join(f"data: {ln}\n\n" for ln in lines) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


def make_app(model_dir, tokenizer, transport=None, adapter_root=None):
    # NOTE: port 9 (discard) on loopback: nothing listens, so an unrecorded call fails to connect.
    client = VLLMClient("http://127.0.0.1:9", BASE, 30.0, transport)
    config = ModelConfig.from_pretrained(model_dir)
    serving = VLLMServing(client, tokenizer, BASE, ServerMetrics(), 2048, config.vocab_size)
    return build_vllm_app(serving, config, adapter_root=adapter_root)


@pytest.mark.parametrize("field", sorted(METHOD_BODIES))
def test_engine_methods_answer_400_naming_method_and_backend(model_dir, tokenizer, field):
    with TestClient(make_app(model_dir, tokenizer)) as http:
        reply = http.post("/v1/chat/completions", json={**CHAT, **METHOD_BODIES[field]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_by_backend"
    assert error["type"] == "invalid_request_error"
    assert ENGINE_METHODS[field][0] in error["message"] and "vllm backend" in error["message"]


def test_protocol_errors_come_first_and_unreachable_vllm_is_503(model_dir, tokenizer):
    with TestClient(make_app(model_dir, tokenizer)) as http:
        bad = http.post("/v1/chat/completions", json={**CHAT, "temperature": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        unknown = http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        echo = http.post("/v1/completions", json={"model": BASE, "prompt": "a", "echo": True})
        assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"
        down = http.post("/v1/chat/completions", json=CHAT)
        assert down.status_code == 503 and "vLLM engine is unreachable" in down.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE]
        load = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert load.status_code == 403  # no --adapter-root
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404


def test_chat_through_recorded_vllm(model_dir, tokenizer):
    vllm = RecordedVLLM(tokenizer, "Hello there, friend.")
    with TestClient(make_app(model_dir, tokenizer, httpx.MockTransport(vllm))) as http:
        reply = http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 1}).json()
        chunks = http.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    sent = vllm.bodies[0]
    assert sent["prompt"] == tokenizer.apply_chat_template(CHAT["messages"]) and sent["model"] == BASE
    assert sent["temperature"] == 0.0 and sent["max_tokens"] == 8
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == "Hello there, friend."
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == len(vllm.ids)
    content = reply["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.token_str(i) for i in vllm.ids]
    assert content[0]["top_logprobs"][0]["logprob"] == -0.25
    events = [json.loads(ln[6:]) for ln in chunks.text.splitlines() if ln.startswith("data: {")]
    assert chunks.text.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "Hello there, friend." and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == len(vllm.ids)


def test_structured_outputs_are_passed_as_vllms(model_dir, tokenizer):
    vllm = RecordedVLLM(tokenizer, '{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with TestClient(make_app(model_dir, tokenizer, httpx.MockTransport(vllm))) as http:
        ok = http.post("/v1/chat/completions", json={**CHAT, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        regex = http.post("/v1/completions", json={"model": BASE, "prompt": "n:", "guided_regex": "[0-9]+"})
        forced = http.post("/v1/chat/completions", json={**CHAT, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert ok.status_code == 200 and vllm.bodies[0]["structured_outputs"] == {"json": schema}
    assert regex.status_code == 200 and vllm.bodies[1]["structured_outputs"] == {"regex": "[0-9]+"}
    assert forced.status_code == 400 and forced.json()["error"]["param"] == "tool_choice"
