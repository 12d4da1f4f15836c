"""`alignserve serve --replicas N [--ray-address ADDR]`: start (or join) Ray, deploy, wait, stop.

With no address a local single-node Ray instance is started and shut down with the server; with
one, the application joins that cluster and is deleted on exit, the cluster left running.
Serve's HTTP proxy listens on --host/--port (127.0.0.1 keeps the API on loopback).
NOTE: Ray 2.60 itself cannot be held to loopback: it turns 127.0.0.1 into the node's address
(`resolve_ip_for_localhost`) and its GCS/raylet ports listen on every interface, guarded by the
cluster token that Ray 2.60 generates and requires by default (~/.ray/auth_token). The deployment: `Ingress` (no CPUs) ->
`EngineReplica` x N with `AffinityRequestRouter` (server/scale/ray_serve.py, ray_router.py).
This module imports Ray at call time only, so the CLI loads without it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from server.api.app import Limits
from server.config import GIL_SWITCH_INTERVAL_MS, EngineConfig
from server.scale.routing import RoutingConfig

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # requests and chunks are small; keep RAM for engines


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to build its engine and app (picklable; the CLI fills it)."""

    engine_config: EngineConfig
    model_name: str
    api_key: str | None = None
    adapter_root: Path | None = None
    limits: Limits = Limits()
    index_root: Path | None = None  # NOTE: shared storage: every replica reads the same collections
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, absolute path) loaded at start
    num_threads: int = 1
    gil_switch_interval_ms: float = GIL_SWITCH_INTERVAL_MS  # `serve --gil-switch-interval-ms`


def replica_spec(config: EngineConfig, model_name: str, api_key: str | None, adapter_root: Path | None,
                 limits: Limits, index_root: Path | None, lora_modules: list[str],
                 gil_switch_interval_ms: float = GIL_SWITCH_INTERVAL_MS) -> ReplicaSpec:
    """The CLI's options as a ReplicaSpec; paths made absolute, since replicas run elsewhere."""
    modules = []
    for item in lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--lora-modules expects name=path, got {item!r}")
        modules.append((name, str(Path(path).resolve())))
    if Path(config.model).is_dir():
        config = replace(config, model=str(Path(config.model).resolve()))
    return ReplicaSpec(config, model_name, api_key, adapter_root and adapter_root.resolve(), limits,
                       index_root and index_root.resolve(), tuple(modules),
                       gil_switch_interval_ms=gil_switch_interval_ms)


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise typer.BadParameter("--replicas needs Ray Serve: pip install 'alignserve[ray]' (or make ray)") from exc
    return ray, serve


def build_application(spec: ReplicaSpec, replicas: int, replica_cpus: float, routing: RoutingConfig = RoutingConfig()):
    """The Serve application: Ingress bound to N EngineReplicas routed by adapter and prefix."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from server.scale.ray_serve import APP_NAME, REPLICA_DEPLOYMENT, EngineReplica, Ingress, manifest_name

    capacity = spec.engine_config.scheduler.max_num_seqs + spec.limits.max_queue_len
    router = RequestRouterConfig(
        request_router_class="server.scale.ray_router:AffinityRequestRouter",
        request_router_kwargs={"imbalance_threshold": routing.imbalance_threshold,
                               "prefix_chars": routing.prefix_chars},
        request_routing_stats_period_s=1.0, request_routing_stats_timeout_s=5.0)
    # NOTE: our own admission control (429 past --max-queue-len) stays in each replica, so Serve
    # may send a replica as many requests as it admits.
    engines = serve.deployment(EngineReplica).options(
        name=REPLICA_DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=capacity,
        ray_actor_options={"num_cpus": replica_cpus}, request_router_config=router,
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", max_ongoing_requests=capacity * replicas + 64, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines.bind(spec, manifest_name(APP_NAME)), spec.model_name, manifest_name(APP_NAME),
                        APP_NAME, routing)


def serve_replicas(spec: ReplicaSpec, replicas: int, ray_address: str | None, host: str, port: int) -> None:
    """Deploy `replicas` engines behind one OpenAI ingress on host:port until SIGTERM/SIGINT."""
    ray, serve = _import_ray()
    from server.scale.ray_serve import APP_NAME, NAMESPACE, AdapterManifest, manifest_name

    local = ray_address is None
    if local:
        cpus = os.cpu_count() or 1
        ray.init(address="local", include_dashboard=False,
                 num_cpus=max(cpus, replicas), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 namespace=NAMESPACE)
        replica_cpus = max(1, cpus // replicas)
    else:
        ray.init(address=ray_address, namespace=NAMESPACE)
        replica_cpus = 1
    spec = replace(spec, num_threads=replica_cpus)
    stop = threading.Event()
    manifest = None
    try:
        # NOTE: detached so that it outlives whichever replica created it; killed below.
        manifest = AdapterManifest.options(name=manifest_name(APP_NAME), namespace=NAMESPACE,
                                           lifetime="detached", get_if_exists=True).remote()
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(spec, replicas, replica_cpus), name=APP_NAME, route_prefix="/")
        typer.echo(f"alignserve: {replicas} replica(s) of {spec.model_name} on Ray Serve "
                   f"({'local, 127.0.0.1' if local else ray_address}); http://{host}:{port}/v1")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):  # NOTE: a timed wait lets the signal handlers run
            pass
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            if manifest is not None:
                ray.kill(manifest)
        finally:
            ray.shutdown()
