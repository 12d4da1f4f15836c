"""The affinity policy (server/scale/routing.py) on exact replica ids, and routing keys; no Ray."""
from __future__ import annotations

import json

from server.scale.routing import AffinityPolicy, ReplicaView, RoutingConfig, RoutingKey, routing_key

BASE = "SmolLM2-135M-Instruct"


def views(loads: dict[str, int], adapters: dict[str, set[str]] | None = None) -> list[ReplicaView]:
    adapters = adapters or {}
    return [ReplicaView(r, load, frozenset(adapters.get(r, ()))) for r, load in loads.items()]


def chat(model: str, text: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()


def test_routing_key_names_the_adapter_and_hashes_long_prefixes():
    assert routing_key("/v1/chat/completions", chat(BASE, "hi"), BASE) == RoutingKey()
    assert routing_key("/v1/chat/completions", chat("a1", "hi"), BASE) == RoutingKey(adapter="a1")
    long = "x" * 2000
    one = routing_key("/v1/chat/completions", chat(BASE, long + " one"), BASE)
    two = routing_key("/v1/chat/completions", chat(BASE, long + " two"), BASE)
    assert one.prefix is not None and one.prefix == two.prefix
    # Our prefix cache is namespaced by adapter: so is the key.
    assert routing_key("/v1/chat/completions", chat("a1", long), BASE).prefix != one.prefix
    completion = json.dumps({"model": BASE, "prompt": long}).encode()
    assert routing_key("/v1/completions", completion, BASE).prefix is not None
    # Not JSON, not an object, not a generation route: no key (the replica answers as one server).
    assert routing_key("/v1/chat/completions", b"{nope", BASE) == RoutingKey()
    assert routing_key("/v1/chat/completions", b"[1]", BASE) == RoutingKey()
    assert routing_key("/v1/models", b"", BASE) == RoutingKey()
    assert RoutingKey.from_dict(RoutingKey("a", "p", "r").as_dict()) == RoutingKey("a", "p", "r")


def test_an_adapter_stays_on_its_replica_until_it_is_overloaded():
    policy = AffinityPolicy(RoutingConfig(imbalance_threshold=2))
    # First placement: the least-loaded replica holding fewest adapters.
    assert policy.order(RoutingKey(adapter="a1"), views({"r1": 0, "r2": 0})) == ["r1", "r2"]
    # The second adapter goes to the replica holding none.
    assert policy.order(RoutingKey(adapter="a2"), views({"r1": 0, "r2": 0})) == ["r2", "r1"]
    # Within the threshold, a1 stays on r1 even though r1 is busier.
    assert policy.order(RoutingKey(adapter="a1"), views({"r1": 2, "r2": 0})) == ["r1", "r2"]
    # Beyond it, a1 spills to r2, which then holds it too.
    assert policy.order(RoutingKey(adapter="a1"), views({"r1": 3, "r2": 0})) == ["r2", "r1"]
    assert policy.order(RoutingKey(adapter="a1"), views({"r1": 0, "r2": 1})) == ["r1", "r2"]


def test_reported_residency_counts_and_dead_replicas_hold_nothing():
    policy = AffinityPolicy(RoutingConfig(imbalance_threshold=2))
    # Another router placed a3 on r2: the replica's report says so.
    assert policy.order(RoutingKey(adapter="a3"), views({"r1": 0, "r2": 1}, {"r2": {"a3"}})) == ["r2", "r1"]
    policy.forget("r2")
    assert policy.order(RoutingKey(adapter="a3"), views({"r1": 0, "r3": 0})) == ["r1", "r3"]


def test_prefix_affinity_then_least_loaded_then_pins():
    policy = AffinityPolicy(RoutingConfig(imbalance_threshold=1))
    assert policy.order(RoutingKey(prefix="p"), views({"r1": 1, "r2": 0})) == ["r2", "r1"]
    assert policy.order(RoutingKey(prefix="p"), views({"r1": 0, "r2": 1})) == ["r2", "r1"]
    assert policy.order(RoutingKey(prefix="p"), views({"r1": 0, "r2": 2})) == ["r1", "r2"]
    assert policy.order(RoutingKey(), views({"r1": 3, "r2": 1, "r3": 2})) == ["r2", "r3", "r1"]
    assert policy.order(RoutingKey(replica="r3"), views({"r1": 0, "r3": 9})) == ["r3"]
    assert policy.order(RoutingKey(replica="gone"), views({"r1": 0})) == []
    assert policy.order(RoutingKey(adapter="a"), []) == []
