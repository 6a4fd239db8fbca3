"""Prometheus metrics of one server, in their own registry (no process-global state between servers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..protocol import Chunk
    from .pool import Entry

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()           # no *_created series: noise for every label set
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vlm_requests_total", "HTTP requests answered", ["endpoint", "model", "status"],
                                registry=r)
        self.rejected = Counter("vlm_requests_rejected_total", "Requests refused because the model's queue was full",
                                ["model"], registry=r)
        self.queue_depth = Gauge("vlm_queue_depth", "Requests waiting for the model (not yet running)", ["model"],
                                 registry=r)
        self.running = Gauge("vlm_requests_running", "Requests being generated", ["model"], registry=r)
        self.loaded = Gauge("vlm_model_loaded", "1 while the model is loaded", ["model"], registry=r)
        self.ttft = Histogram("vlm_time_to_first_token_seconds", "From the model's turn to the first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.decode_tps = Histogram("vlm_decode_tokens_per_second", "Decode speed of each answer", ["model"],
                                    buckets=_TPS_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vlm_prompt_tokens_total", "Prompt tokens (incl. reused KV prefix)", ["model"],
                                     registry=r)
        self.prompt_eval_tokens = Counter("vlm_prompt_eval_tokens_total", "Prompt tokens evaluated (not reused)",
                                          ["model"], registry=r)
        self.completion_tokens = Counter("vlm_completion_tokens_total", "Generated tokens", ["model"], registry=r)

    def observe_entry(self, entry: "Entry", present: bool) -> None:
        self.queue_depth.labels(entry.id).set(max(0, entry.waiting) if present else 0)
        self.running.labels(entry.id).set(entry.running if present else 0)
        self.loaded.labels(entry.id).set(1 if present and entry.backend is not None else 0)

    def observe_answer(self, model: str, last: "Chunk") -> None:
        self.ttft.labels(model).observe(last.ttft_s)
        if last.completion_tokens > 1 and last.decode_s > 0:
            self.decode_tps.labels(model).observe((last.completion_tokens - 1) / last.decode_s)
        self.prompt_tokens.labels(model).inc(last.prompt_tokens)
        self.prompt_eval_tokens.labels(model).inc(last.prompt_eval_tokens)
        self.completion_tokens.labels(model).inc(last.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
