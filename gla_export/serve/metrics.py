"""Prometheus metrics of one server (its own registry, so that several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "gla_serve_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter(p + "generations_finished", "Generations ended, by finish reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens actually prefilled", registry=r)
        self.saved_tokens = Counter(p + "prefill_tokens_saved", "Prompt tokens not prefilled thanks to the prefix cache",
                                    registry=r)
        self.generated_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge(p + "running_requests", "Requests holding a slot (prefilling or decoding)", registry=r)
        self.decoding = Gauge(p + "decoding_requests", "Requests in the decode batch", registry=r)
        self.slots = Gauge(p + "slots", "State slots in the pool", registry=r)
        self.occupancy = Histogram(p + "batch_occupancy", "Fraction of the slots decoding, per step",
                                   buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.cache_hits = Counter(p + "cache_hits", "Prefix cache lookups that found a state", registry=r)
        self.cache_misses = Counter(p + "cache_misses", "Prefix cache lookups that found none", registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.cache_entries = Gauge(p + "cache_entries", "States held by the prefix cache", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two tokens of a stream",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram(p + "iteration_seconds", "One scheduler iteration (prefill chunks + a step)",
                                      buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
