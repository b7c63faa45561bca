"""Prometheus metrics of a server, under vLLM's names with the `raas_jax:` prefix, in a registry of its own."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def gauge(name, doc):
            return Gauge(f"raas_jax:{name}", doc, labels, registry=self.registry).labels(model_name)

        self.running = gauge("num_requests_running", "Requests holding a row (decoding).")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a row.")
        self.rows_in_use = gauge("rows_in_use", "Rows of the decode state holding a request.")
        self.rows = gauge("rows_total", "Rows of the decode state (fixed KV rows).")
        self.generation_tokens = Counter("raas_jax:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter("raas_jax:prompt_tokens", "Prompt tokens prefilled.", labels,
                                     registry=self.registry).labels(model_name)
        self.preemptions = Counter("raas_jax:num_preemptions", "Preempted requests (rows are never preempted).",
                                   labels, registry=self.registry).labels(model_name)
        self.success = Counter("raas_jax:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("raas_jax:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("raas_jax:time_per_output_token_seconds", "Time per output token after the first.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("raas_jax:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.preemptions.inc(0)

    def gauges(self, *, running: int, waiting: int, rows_in_use: int, rows: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.rows_in_use.set(rows_in_use)
        self.rows.set(rows)

    def tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def request_started(self, request: Any) -> None:
        self.prompt_tokens.inc(len(request.ids))
        self.ttft.observe(request.first_token_at - request.arrival)

    def request_finished(self, request: Any, completion_tokens: int, reason: str) -> None:
        now = time.perf_counter()
        self.e2e.observe(now - request.arrival)
        if completion_tokens > 1 and request.first_token_at is not None:
            self.tpot.observe((now - request.first_token_at) / (completion_tokens - 1))
        self.success.labels(self.model_name, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
