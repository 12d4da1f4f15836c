"""Prometheus metrics for one server instance (own registry: no process-wide state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.engine.profiler import PHASES

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Request counts, latency histograms and engine gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alignserve_requests", "Requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("alignserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("alignserve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("alignserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("alignserve_inter_token_latency_seconds", "Time between output chunks",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("alignserve_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("alignserve_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("alignserve_num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_usage = Gauge("alignserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_used_blocks = Gauge("alignserve_kv_cache_used_blocks", "KV blocks referenced by live sequences",
                                    registry=r)
        self.preemptions = Gauge("alignserve_num_preemptions", "Preemptions since start", registry=r)
        self.model_requests = Counter("alignserve_model_requests", "Completed requests per model/adapter",
                                      ["model"], registry=r)
        self.adapters_loaded = Gauge("alignserve_lora_adapters_loaded", "LoRA adapters registered", registry=r)
        self.adapter_events = Counter("alignserve_lora_events",
                                      "Adapter slot loads, unloads and evictions", ["event"], registry=r)
        self.admitted = Gauge("alignserve_num_requests_admitted",
                              "Generation requests admitted and not yet answered in full", registry=r)
        self.queue_capacity = Gauge("alignserve_queue_capacity",
                                    "Most generation requests admitted at once (max_num_seqs + --max-queue-len)",
                                    registry=r)
        self.rejected = Counter("alignserve_requests_rejected", "Requests refused before admission",
                                ["reason"], registry=r)
        self.request_timeout = Gauge("alignserve_request_timeout_seconds",
                                     "Per-request deadline (--request-timeout; 0: none)", registry=r)
        self.timeouts = Counter("alignserve_request_timeouts", "Requests aborted at their deadline",
                                ["endpoint"], registry=r)
        # Where the engine thread's time goes (server.engine.profiler): a load test reads these
        # before and after to split its wall time per step (bench.peer_runs records them).
        self.steps = Counter("alignserve_engine_steps", "Engine steps that ran the model", registry=r)
        self.step_seconds = Counter("alignserve_engine_step_seconds", "Engine thread time per step phase",
                                    ["phase"], registry=r)
        # The engine's running totals (stats keys) and the counter each one advances.
        # NOTE: token counts come from the engine, so aborted requests and best-of candidates count.
        self._totals = {
            "num_prompt_tokens": self.prompt_tokens, "num_generation_tokens": self.generation_tokens,
            "adapter_loads": self.adapter_events.labels("load"),
            "adapter_unloads": self.adapter_events.labels("unload"),
            "adapter_evictions": self.adapter_events.labels("eviction"),
            "num_steps": self.steps,
            **{f"step_{phase}_seconds": self.step_seconds.labels(phase) for phase in PHASES}}
        self._last = dict.fromkeys(self._totals, 0.0)

    def update_engine(self, stats: dict[str, float]) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_usage"])
        self.kv_used_blocks.set(stats["num_used_blocks"])
        self.preemptions.set(stats["num_preemptions"])
        self.adapters_loaded.set(stats["num_adapters"])
        for key, counter in self._totals.items():
            if stats[key] > self._last[key]:
                counter.inc(stats[key] - self._last[key])
                self._last[key] = stats[key]
