"""Helpers of the standing reliability suite: metrics reads, bounded waits, OpenAI error checks."""
from __future__ import annotations

import re
import time

import httpx

BASE = "SmolLM2-135M-Instruct"
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "conflict_error", "rate_limit_error", "service_unavailable", "timeout_error"}


def metric(srv, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 if the series does not exist yet)."""
    text = httpx.get(srv.base_url + "/metrics", headers=srv.headers(), timeout=30).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(predicate, limit_s: float = 60.0, what: str = "condition") -> None:
    """Poll `predicate` until true; the limit only bounds a hang, it is no speed assumption."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_drained(srv, limit_s: float = 60.0) -> None:
    """Every KV block free and no generation admitted."""
    wait_for(lambda: metric(srv, "alignserve_kv_cache_used_blocks") == 0
             and metric(srv, "alignserve_num_requests_admitted") == 0, limit_s, "the server to drain")


def assert_openai_error(response: httpx.Response, status: int, param: str | None = ...) -> dict:
    """`response` is an OpenAI-shaped error with this status (and `param`, if given)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ERROR_TYPES
    assert set(error) == {"message", "type", "param", "code"}
    if param is not ...:
        assert error["param"] == param, error
    return error
