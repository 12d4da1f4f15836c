"""`alignserve serve --replicas 2` on a local Ray cluster, driven by the real `openai` client.

Checks greedy parity with one server (plain, streaming, LoRA, best-of-N, DoLa), the broadcast
of a runtime adapter load, adapter affinity read from per-replica metrics (40 requests over two
adapters: each on one replica only), and a replica killed mid-load (its requests get 503 with
Retry-After, the others complete, Ray brings the replica back). Needs the `ray` extra.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'alignserve[ray]' (make ray)")
pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'alignserve[ray]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.adapters.real_lora import ATTENTION, make_real_adapter  # noqa: E402
from tests.conftest import REPO, ServerProcess, free_port  # noqa: E402
from tests.methods.adapters import make_reward_adapter  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Suggest a name for a pet cat."}]
COMMON = ("--num-kv-blocks", "128", "--max-model-len", "512", "--dtype", "float32")


@pytest.fixture(scope="module")
def root(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-adapters")
    make_real_adapter(model_dir, root / "a1", ATTENTION, 8, seed=1)
    make_real_adapter(model_dir, root / "a2", ATTENTION, 8, seed=2)
    make_reward_adapter(model_dir, root / "rm", seed=5)
    return root


def server_args(root) -> tuple[str, ...]:
    return ("--adapter-root", str(root), "--lora-modules", f"a1={root / 'a1'}", "--lora-modules",
            f"rm={root / 'rm'}", *COMMON)


def requests() -> dict[str, dict]:
    return {
        "plain": dict(model=BASE, messages=QUESTION, temperature=0.0, max_tokens=12),
        "lora": dict(model="a1", messages=QUESTION, temperature=0.0, max_tokens=12),
        "best_of": dict(model=BASE, messages=QUESTION, temperature=1.0, seed=9, max_tokens=8,
                        extra_body={"best_of": 3, "reward_model": "rm"}),
        "dola": dict(model=BASE, messages=QUESTION, temperature=0.0, max_tokens=8, extra_body={"dola_layers": "high"}),
    }


def answers(client: openai.OpenAI) -> dict:
    out = {}
    for name, body in requests().items():
        reply = client.chat.completions.create(**body)
        out[name] = (reply.choices[0].message.content, (reply.model_extra or {}).get("alignment"))
    chunks = client.chat.completions.create(**requests()["plain"], stream=True)
    out["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return out


@pytest.fixture(scope="module")
def single(root):
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    srv = ServerProcess(*server_args(root))
    try:
        yield answers(openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0))
    finally:
        srv.stop()


class Cluster:
    """`alignserve serve --replicas 2` in a subprocess (it starts and stops its own local Ray)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="alignserve-ray-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--replicas", "2", "--host",
                                      "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None and self.healthy(), 600, f"cluster up (log {self.log.name})")
        # NOTE: the ingress answers as soon as one replica runs; the tests want both.
        wait_for(lambda: len(self.replica_ids()) == 2, 300, f"both replicas up (log {self.log.name})")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.base_url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[tuple[str, str, str], float]:
        """(sample name, replica, model-or-adapter label) -> value."""
        text = httpx.get(self.base_url + "/metrics", timeout=60).text
        return {(s.name, s.labels.get("replica"), s.labels.get("model") or s.labels.get("adapter")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def replica_ids(self) -> set[str]:
        return {r for (name, r, _) in self.metrics() if name == "alignserve_kv_cache_usage_ratio"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(root, single, tmp_path_factory):
    # NOTE: the single server is measured (and stopped) first: two engines share 2 cores.
    srv = Cluster(*server_args(root), "--index-root", str(tmp_path_factory.mktemp("scale-indexes")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_replicas_answer_as_one_server(client, cluster, single):
    assert len(cluster.replica_ids()) == 2
    got = answers(client)
    for name in ("plain", "lora", "stream"):
        assert got[name] == single[name], name
    assert got["lora"][0] != got["plain"][0]
    text, report = got["best_of"]
    assert text == single["best_of"][0]
    ours, theirs = report["best_of_n"], single["best_of"][1]["best_of_n"]
    assert [c["text"] for c in ours["candidates"]] == [c["text"] for c in theirs["candidates"]]
    for a, b in zip(ours["candidates"], theirs["candidates"]):
        assert math.isclose(a["reward"], b["reward"], rel_tol=1e-4, abs_tol=1e-4)
    assert got["dola"][0] == single["dola"][0]
    assert got["dola"][1]["dola"]["premature_layers"] == single["dola"][1]["dola"]["premature_layers"]


def test_adapter_load_reaches_every_replica_and_affinity_keeps_each_on_one(client, cluster, root):
    loaded = httpx.post(cluster.base_url + "/v1/load_lora_adapter",
                        json={"lora_name": "a2", "lora_path": str(root / "a2")}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    per_replica = cluster.metrics()
    assert sorted(v for (n, _, _), v in per_replica.items() if n == "alignserve_lora_adapters_loaded") == [3, 3]
    listed = {m.id for m in client.models.list().data}
    assert {"a1", "a2", "rm"} <= listed

    def one(i: int) -> str:
        reply = client.chat.completions.with_raw_response.create(
            model=("a1", "a2")[i % 2], messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4,
            temperature=0.0)
        return reply.headers["x-alignserve-replica"]

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, range(40)))
    homes = {name: {served[i] for i in range(40) if i % 2 == k} for k, name in enumerate(("a1", "a2"))}
    assert all(len(h) == 1 for h in homes.values()) and homes["a1"] != homes["a2"], homes
    metrics = cluster.metrics()
    for adapter in ("a1", "a2"):
        resident = {r for (n, r, a), v in metrics.items()
                    if n == "alignserve_lora_adapter_resident" and a == adapter and v == 1}
        counted = {r for (n, r, m), v in metrics.items() if n == "alignserve_model_requests_total" and m == adapter}
        assert resident == counted == homes[adapter], (adapter, resident, counted)
    unloaded = httpx.post(cluster.base_url + "/v1/unload_lora_adapter", json={"lora_name": "a2"}, timeout=120)
    assert unloaded.status_code == 200, unloaded.text


def _serve_details() -> dict:
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    return ray.get(controller.get_serve_instance_details.remote())


def _running_replicas() -> dict[str, str]:
    replicas = _serve_details()["applications"]["alignserve"]["deployments"]["EngineReplica"]["replicas"]
    return {r["replica_id"]: r["actor_name"] for r in replicas if r["state"] == "RUNNING"}


def test_a_killed_replica_fails_its_requests_with_503_and_comes_back(client, cluster):
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    try:
        before = _running_replicas()
        victim = sorted(before)[0]

        def one(i: int):
            stream = i % 3 == 0  # a third streamed: one cut mid-stream ends with an error event
            try:
                reply = client.chat.completions.with_raw_response.create(
                    model=BASE, messages=[{"role": "user", "content": f"Tell a story about the number {i}."}],
                    max_tokens=64, temperature=0.0, stream=stream)
                replica = reply.headers["x-alignserve-replica"]
                if stream:
                    try:
                        "".join(c.choices[0].delta.content or "" for c in reply.parse() if c.choices)
                    except openai.APIError as exc:
                        assert "replica" in exc.message, exc.message
                        return 503, replica, "1"
                return 200, replica, None
            except openai.APIStatusError as exc:
                return exc.status_code, None, exc.response.headers.get("retry-after")

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            wait_for(lambda: cluster_busy(cluster, victim), 120, "requests in flight on the victim")
            ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
            results = [f.result(timeout=600) for f in futures]
        failed = [r for r in results if r[0] != 200]
        assert failed and all(r[0] == 503 and r[2] == "1" and r[1] in (None, victim) for r in failed), results
        ok = [r for r in results if r[0] == 200]
        assert ok and all(r[1] != victim for r in ok), results
        wait_for(lambda: len(_running_replicas()) == 2 and victim not in _running_replicas(), 600,
                 "the killed replica replaced")
        wait_for(lambda: len(cluster.replica_ids()) == 2, 120, "two replicas in /metrics")
        reply = client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=4, temperature=0.0)
        assert reply.choices[0].message.content
    finally:
        ray.shutdown()


def cluster_busy(cluster: Cluster, replica: str) -> bool:
    return cluster.metrics().get(("alignserve_num_requests_admitted", replica, None), 0) > 0
