"""Which replica should serve a request: routing keys and the affinity policy (no Ray here).

In: the request's path and raw body (at the ingress) -> a `RoutingKey` (adapter name, hash of a
long prompt prefix, or a pinned replica id for broadcasts); per decision, a `ReplicaView` per
live replica (ongoing requests, adapters it reports resident). Out: replica ids, most preferred
first (ray_router.py gives Ray one rank per replica, so Ray keeps this order and only skips a
replica that is full).

Policy, in order:
  1. pinned: only that replica (the ingress broadcasts adapter loads and /metrics this way);
  2. adapter affinity: a replica that holds the requested adapter (reported resident, or already
     given it by this policy); another replica gets it only when every holder is loaded beyond
     `imbalance_threshold` ongoing requests over the least-loaded replica;
  3. prefix affinity: requests whose prompts share their first `prefix_chars` characters go
     where that prefix went before (its KV blocks are cached there), under the same threshold;
  4. least loaded otherwise.
This module does not send requests, probe queues or know about HTTP beyond reading the body.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingConfig:
    """Knobs of the affinity policy (`request_router_kwargs` of the deployment)."""

    imbalance_threshold: int = 8  # ongoing requests a holder may exceed the least-loaded by
    prefix_chars: int = 1024  # prompt characters hashed; shorter prompts get no prefix key
    max_prefixes: int = 10_000  # prefix -> replica entries remembered (LRU)


@dataclass(frozen=True)
class RoutingKey:
    """What the router may use about one request; travels as a dict in the call's arguments."""

    adapter: str | None = None
    prefix: str | None = None
    replica: str | None = None  # pin to this replica id (broadcasts)

    def as_dict(self) -> dict:
        return {"adapter": self.adapter, "prefix": self.prefix, "replica": self.replica}

    @classmethod
    def from_dict(cls, data: dict | None) -> RoutingKey:
        data = data or {}
        return cls(data.get("adapter"), data.get("prefix"), data.get("replica"))


@dataclass(frozen=True)
class ReplicaView:
    """One live replica as the policy sees it."""

    replica_id: str
    load: int  # ongoing requests this router sent it
    adapters: frozenset[str] = frozenset()  # adapters the replica reports resident


def _prompt_text(body: dict) -> str:
    """The prompt's text in order: chat message contents, or a completion prompt."""
    if isinstance(body.get("messages"), list):
        parts = []
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if len(prompt) == 1 else None
    return prompt if isinstance(prompt, str) else ""


def routing_key(path: str, body: bytes, base_model: str, config: RoutingConfig = RoutingConfig()) -> RoutingKey:
    """Routing key of a request; a body that is not a JSON object gets none (the replica
    answers it, 400 included, exactly as one server would)."""
    if path not in ("/v1/chat/completions", "/v1/completions") or not body:
        return RoutingKey()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return RoutingKey()
    if not isinstance(data, dict):
        return RoutingKey()
    model = data.get("model")
    adapter = model if isinstance(model, str) and model and model != base_model else None
    text = _prompt_text(data)
    prefix = None
    if len(text) >= config.prefix_chars:
        # NOTE: the adapter is part of the key because our prefix cache is namespaced by adapter.
        raw = f"{adapter or ''}\x00{text[:config.prefix_chars]}".encode("utf-8", "surrogatepass")
        prefix = hashlib.blake2b(raw, digest_size=8).hexdigest()
    return RoutingKey(adapter=adapter, prefix=prefix)


class AffinityPolicy:
    """Ranks replicas for a key; remembers where it placed adapters and prefixes.

    NOTE: one policy lives in each router (one per ingress replica); what it remembers is its own
    placements, and replica-reported residency corrects it when another router placed an adapter.
    """

    def __init__(self, config: RoutingConfig = RoutingConfig()) -> None:
        self.config = config
        self._adapter_homes: dict[str, set[str]] = {}
        self._prefix_homes: OrderedDict[str, str] = OrderedDict()

    def order(self, key: RoutingKey, replicas: list[ReplicaView]) -> list[str]:
        """Replica ids for `key`, most preferred first; [] when a pinned replica is not live."""
        if not replicas:
            return []
        by_load = sorted(replicas, key=lambda r: (r.load, r.replica_id))
        if key.replica is not None:
            return [key.replica] if any(r.replica_id == key.replica for r in replicas) else []
        if key.adapter is not None:
            first = self._place_adapter(key.adapter, by_load)
        elif key.prefix is not None:
            first = self._place_prefix(key.prefix, by_load)
        else:
            return [r.replica_id for r in by_load]
        return [*first, *(r.replica_id for r in by_load if r.replica_id not in first)]

    def _within_threshold(self, replica: ReplicaView, least: ReplicaView) -> bool:
        return replica.load <= least.load + self.config.imbalance_threshold

    def _place_adapter(self, adapter: str, by_load: list[ReplicaView]) -> list[str]:
        live = {r.replica_id for r in by_load}
        homes = self._adapter_homes.setdefault(adapter, set())
        homes &= live  # dead replicas hold nothing
        holders = [r for r in by_load if r.replica_id in homes or adapter in r.adapters]
        others = [r for r in by_load if r not in holders]
        if holders and (not others or self._within_threshold(holders[0], by_load[0])):
            homes.update(r.replica_id for r in holders)
            return [r.replica_id for r in holders]
        if holders:
            # Every holder is overloaded: spill to the least-loaded other replica, which now holds it too.
            homes.add(others[0].replica_id)
            return [others[0].replica_id, *(r.replica_id for r in holders)]
        # Not resident anywhere: the replica holding fewest adapters, then the least loaded.
        held = {r.replica_id: sum(r.replica_id in h for h in self._adapter_homes.values()) for r in by_load}
        first = min(by_load, key=lambda r: (held[r.replica_id], r.load, r.replica_id))
        if not self._within_threshold(first, by_load[0]):
            first = by_load[0]
        homes.add(first.replica_id)
        return [first.replica_id]

    def _place_prefix(self, prefix: str, by_load: list[ReplicaView]) -> list[str]:
        home = self._prefix_homes.get(prefix)
        target = next((r for r in by_load if r.replica_id == home), None)
        if target is None or not self._within_threshold(target, by_load[0]):
            target = by_load[0]
        self._prefix_homes[prefix] = target.replica_id
        self._prefix_homes.move_to_end(prefix)
        while len(self._prefix_homes) > self.config.max_prefixes:
            self._prefix_homes.popitem(last=False)
        return [target.replica_id]

    def forget(self, replica_id: str) -> None:
        """A replica died: it holds no adapters and no prefixes any more."""
        for homes in self._adapter_homes.values():
            homes.discard(replica_id)
        for prefix in [p for p, r in self._prefix_homes.items() if r == replica_id]:
            del self._prefix_homes[prefix]
