"""Prometheus metrics of one server, in a registry of its own (two apps in one process, as in the
tests, never share counters)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .batching import BatchStats

#: seconds; a tiny-model request takes ~0.1 s on a CPU, an SD 1.5 512² one seconds to a minute.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

#: every error the server answers with, as the ``kind`` label.
ERROR_KINDS = ("invalid_argument", "unauthorized", "queue_full", "timeout", "not_ready", "shutting_down",
               "payload_too_large", "internal")


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdfast_requests", "image generation requests answered, by HTTP status",
                                ["status"], registry=r)
        self.latency = Histogram("sdfast_request_seconds", "time from arrival to answer of successful "
                                 "generation requests", buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("sdfast_in_flight", "generation requests accepted and not yet answered",
                               registry=r)
        self.queue_depth = Gauge("sdfast_queue_depth", "requests waiting for the pipeline", registry=r)
        self.batch_requests = Histogram("sdfast_batch_size", "requests per denoising loop",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_images = Histogram("sdfast_batch_images", "images per denoising loop",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("sdfast_batch_seconds", "seconds per denoising loop",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_splits = Counter("sdfast_batch_splits", "batches that failed and were re-run member by "
                                    "member", registry=r)
        self.images = Counter("sdfast_images", "images generated", registry=r)
        self.errors = Counter("sdfast_errors", "error answers, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)  # present at 0 from the start, so rates exist
        self.ready = Gauge("sdfast_ready", "1 once warm-up finished and until shutdown begins", registry=r)
        self.batch_invariant = Gauge("sdfast_batch_invariant", "1 when the warm-up probe found batched "
                                     "rows bit-identical to lone runs, 0 when not, -1 before/untested",
                                     registry=r)
        self.batch_invariant.set(-1)
        self.lora_swap = Histogram("sdfast_lora_swap_seconds", "seconds to fuse a request's LoRA set in place of "
                                   "the one before (requests with different sets never share a loop)",
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                   registry=r)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_requests.observe(stats.requests)
        self.batch_images.observe(stats.images)
        self.batch_seconds.observe(stats.seconds)
        self.images.inc(stats.images)
        if stats.split:
            self.batch_splits.inc()

    def error(self, kind: str, status: int) -> None:
        self.errors.labels(kind=kind).inc()
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
