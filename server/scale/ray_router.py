"""Ray Serve request router for the engine deployment: `routing.AffinityPolicy` on Ray's API.

Ray Serve calls `choose_replicas(candidates, pending_request)` for each request the ingress
sends through its deployment handle; the request's call arguments are visible there, and the
ingress passes the `RoutingKey` dict as the first argument of every replica call (Ray's own
multiplexed model id would also carry an adapter name, but not a prefix hash or a pin). Load is
this router's count of requests it sent each replica and that have not completed
(`on_request_routed` / `on_request_completed`); residency comes from each replica's
`record_routing_stats` ({"adapters": [...]}), refreshed every `request_routing_stats_period_s`.
Ranks go back to Ray, which still probes queue lengths and skips replicas that are full.
NOTE: Ray matches a chosen replica to its request by `internal_request_id`, which calls made
while serving one HTTP request inherit from it; the ingress therefore sends its fan-out calls
(broadcasts, /metrics) one at a time, or two would share an id and one would never be routed.

Imports Ray: loaded only inside a Ray Serve deployment (`--replicas N`).
"""
from __future__ import annotations

from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from server.scale.routing import AffinityPolicy, ReplicaView, RoutingConfig, RoutingKey


class AffinityRequestRouter(RequestRouter):
    """Adapter affinity, then prefix affinity, then least loaded (see server/scale/routing.py).

    NOTE: no `FIFOMixin`: it hands a chosen replica to the oldest pending request, not to the
    one it was chosen for, which would send a request pinned to replica A (or an adapter's
    request) to B. The base router matches a choice to its own request.
    """

    def initialize_state(self, imbalance_threshold: int = 8, prefix_chars: int = 1024, **_: object) -> None:
        self._policy = AffinityPolicy(RoutingConfig(imbalance_threshold=imbalance_threshold,
                                                    prefix_chars=prefix_chars))
        self._ongoing: Counter[str] = Counter()
        self._request_replica: dict[str, str] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = RoutingKey()
        if pending_request is not None and pending_request.args and isinstance(pending_request.args[0], dict):
            key = RoutingKey.from_dict(pending_request.args[0])
        views = [ReplicaView(r.replica_id.unique_id, self._ongoing[r.replica_id.unique_id],
                             frozenset((r.routing_stats or {}).get("adapters", ())))
                 for r in candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        # NOTE: one rank per replica: within a rank Ray picks by its own (possibly stale) queue
        # lengths, across ranks it keeps our order.
        return [[by_id[i]] for i in self._policy.order(key, views) if i in by_id]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._ongoing[replica_id.unique_id] += 1
        self._request_replica[pending_request.metadata.internal_request_id] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._request_replica.pop(internal_request_id, None) is not None:
            self._ongoing[replica_id.unique_id] = max(0, self._ongoing[replica_id.unique_id] - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._policy.forget(replica_id.unique_id)
        self._ongoing.pop(replica_id.unique_id, None)
