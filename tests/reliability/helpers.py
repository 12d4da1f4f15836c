"""Helpers of the standing reliability suite: metric reads and bounded waits (over
tests/e2e/probes.py), and the OpenAI error-shape check."""
from __future__ import annotations

import httpx

from tests.e2e.probes import metrics, wait_until

BASE = "SmolLM2-135M-Instruct"
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "conflict_error", "rate_limit_error", "service_unavailable", "timeout_error"}


def metric(srv, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 if the series does not exist yet)."""
    return metrics(srv).get((name, frozenset(labels.items())), 0.0)


def wait_drained(srv) -> None:
    """Every KV block free and no generation admitted (bounded by probes.DEADLINE_S)."""
    wait_until(lambda: metric(srv, "alignserve_kv_cache_used_blocks") == 0
               and metric(srv, "alignserve_num_requests_admitted") == 0, "the server drained")


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
