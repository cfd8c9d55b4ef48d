"""Prometheus metrics shared by the pipeline, the forwarders and the HTTP gateway.

`telenode serve` runs several processes (the supervisor and its SCP workers), so
counters and the latency histogram use prometheus-client's multiprocess mode: every
process writes its values to files under `data_dir/metrics`, and the gateway's
`/metrics` adds them up. `enable()` must run in the supervisor before the workers
start (they inherit the folder through the environment). Without it (the
`anonymize` command, tests) the metrics live in the process.

Queue depth and oldest age are read from the store when scraped, not counted.
Labels are destination names and sources (scp, http, stow) only: never a value
taken from a data set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "telenode"

# Seconds from received bytes to a durable, de-identified instance.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Metrics:
    """The metric objects, built on first use so that multiprocess mode can be chosen first; in a
    registry of their own, so that `enable` can build them again."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def _counter(name: str, text: str, label: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, [label], registry=self.registry)

        self.received = _counter("instances_received", "Instances received (C-STORE, STOW-RS, HTTP)", "source")
        self.stored = _counter("instances_stored", "Instances de-identified and stored durably", "source")
        self.refused = _counter("instances_refused", "Instances refused with a failure status", "source")
        self.quarantined = _counter("instances_quarantined", "Instances held in the quarantine", "source")
        self.forwarded = _counter("instances_forwarded", "Instances a destination accepted", "destination")
        self.failed = _counter("instances_failed", "Instances a destination refused for good", "destination")
        self.latency = Histogram(f"{PREFIX}_processing_seconds",
                                 "Seconds from received data set to durable de-identified instance",
                                 ["source"], buckets=LATENCY_BUCKETS, registry=self.registry)


_metrics: _Metrics | None = None


def get() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def enable(data_dir: Path) -> Path:
    """Supervisor, before any metric is used and any worker starts: multiprocess mode under data_dir/metrics,
    emptied (the files of a previous run belong to processes that are gone)."""
    folder = data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[ENV] = str(folder)
    values.ValueClass = values.get_value_class()  # prometheus_client chose at import; choose again
    global _metrics
    _metrics = None  # any metric built before counted in this process only
    return folder


SOURCES = ("scp", "stow", "http")


def prime(destinations: tuple[str, ...]) -> None:
    """Every series at 0 from the start, so dashboards and rate() see them before the first instance."""
    m = get()
    for source in SOURCES:
        for counter in (m.received, m.stored, m.refused, m.quarantined, m.latency):
            counter.labels(source)
    for name in destinations:
        m.forwarded.labels(name)
        m.failed.labels(name)


def count(name: str, label: str, amount: float = 1) -> None:
    """Add to one counter (`received`, `stored`, `refused`, `quarantined`, `forwarded`, `failed`)."""
    getattr(get(), name).labels(label).inc(amount)


def observe(source: str, seconds: float) -> None:
    get().latency.labels(source).observe(seconds)


QueueReader = Callable[[], dict[str, dict[str, Any]]]


class QueueCollector:
    """Queue depth and oldest pending age per destination, read from the store at scrape time, and
    the originals still waiting for de-identification."""

    def __init__(self, read: QueueReader, destinations: tuple[str, ...],
                 waiting: Callable[[], int] = lambda: 0) -> None:
        self.read = read
        self.destinations = destinations
        self.waiting = waiting  # originals acknowledged on receipt, not de-identified yet (settle.py)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.read()
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Instances waiting or in flight per destination",
                                  labels=["destination"])
        oldest = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                   "Age of the oldest instance waiting per destination (0 when none)",
                                   labels=["destination"])
        for name in sorted(set(self.destinations) | set(status)):
            row = status.get(name, {})
            depth.add_metric([name], row.get("pending", 0) + row.get("inflight", 0))
            oldest.add_metric([name], row.get("oldest_pending_age_s") or 0)
        yield depth
        yield oldest
        yield GaugeMetricFamily(f"{PREFIX}_received_waiting", 'Originals acknowledged on receipt (ack = "received"), '
                                "not de-identified yet", value=self.waiting())


def exposition(queues: QueueCollector | None = None) -> bytes:
    """The Prometheus text format of every process's metrics plus the queue gauges."""
    folder = os.environ.get(ENV)
    if folder:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, folder)
    else:
        registry = get().registry
    text = generate_latest(registry)
    if queues is not None:
        extra = CollectorRegistry()
        extra.register(queues)
        text += generate_latest(extra)
    return text
