"""Prometheus metrics of one server (prefix `aptp_`, base units, label `code` and never the prompt).

Each app owns a `CollectorRegistry`, so several apps (tests) never collide in the process-wide default registry.
Event metrics (counters, histograms) are recorded where the event happens; state gauges (queue depth, running
batches) are read from a `SchedulerStats` snapshot at scrape time, as vLLM's exporters do.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .scheduler import SchedulerStats

# Generation takes seconds to minutes on CPU and tens of milliseconds to seconds on a GPU.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
# The router is one small encoder call, far below a second.
ROUTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# Why a request got no image: a full queue (429), a draining server (503), a queue timeout (504), a request the
# API refused (422/400), a missing or wrong API key (401).
REJECTION_REASONS = ("queue_full", "draining", "queue_timeout", "invalid", "unauthorized")
REQUEST_STATUSES = ("ok", "error", "timeout", "cancelled")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# What /metrics answers before the bundle is loaded (the per-code series need its codes).
LOADING_METRICS = (
    b"# HELP aptp_ready 1 when the server admits requests, 0 while loading or draining.\n"
    b"# TYPE aptp_ready gauge\naptp_ready 0.0\n"
)


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler at scrape time."""

    def __init__(self, stats: Callable[[], SchedulerStats]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        depth = GaugeMetricFamily("aptp_queue_depth", "Requests waiting in the queue, per code.", labels=["code"])
        images = GaugeMetricFamily(
            "aptp_queue_images", "Images asked for by queued requests, per code.", labels=["code"]
        )
        for code, count in stats.queued_requests.items():
            depth.add_metric([str(code)], count)
            images.add_metric([str(code)], stats.queued_images[code])
        yield depth
        yield images
        yield GaugeMetricFamily("aptp_running_batches", "Batches being computed.", value=stats.running_batches)


class ServerMetrics:
    """Every metric the server exports, in one registry.

    Parameters:
        code_macs (`list[int]`): MACs per U-Net call of each code (exported as a gauge, for dashboards).
    """

    def __init__(self, code_macs: list[int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aptp_requests", "Finished generation requests by code and status.", ["code", "status"], registry=r
        )
        self.rejections = Counter("aptp_rejections", "Requests refused or dropped, by reason.", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        self.degraded = Counter(
            "aptp_degraded_requests",
            "Requests served by a cheaper code than their own because its queue was full.",
            ["requested_code", "code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "aptp_batch_size", "Images per computed batch.", ["code"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "aptp_queue_wait_seconds",
            "Time from arrival to batch start.",
            ["code"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "aptp_compute_seconds", "Time to compute one batch.", ["code"], buckets=SECONDS_BUCKETS, registry=r
        )
        self.end_to_end = Histogram(
            "aptp_request_seconds",
            "Time from arrival to answer of successful requests.",
            ["code"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.macs = Counter("aptp_macs", "Multiply-accumulates spent in U-Net calls.", ["code"], registry=r)
        self.images = Counter("aptp_images", "Images generated.", ["code"], registry=r)
        self.router = Histogram(
            "aptp_router_seconds", "Time to route one request's prompt.", buckets=ROUTER_BUCKETS, registry=r
        )
        self.ready = Gauge("aptp_ready", "1 when the server admits requests, 0 while loading or draining.", registry=r)
        code_gauge = Gauge("aptp_code_macs_per_call", "MACs of one U-Net call of each code.", ["code"], registry=r)
        for code, macs in enumerate(code_macs):
            code_gauge.labels(code=str(code)).set(macs)
            for status in REQUEST_STATUSES:
                self.requests.labels(code=str(code), status=status)  # export zeros so rates exist from the start
            for child in (self.batch_size, self.queue_wait, self.compute, self.end_to_end, self.macs, self.images):
                child.labels(code=str(code))

    def watch_scheduler(self, stats: Callable[[], SchedulerStats]) -> None:
        self.registry.register(_SchedulerCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
