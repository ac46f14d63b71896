"""Prometheus metrics for batchers, read from ``stats()`` at scrape time.

Nothing runs on the hot path: a ``BatcherCollector`` calls each batcher's
``stats()`` only when Prometheus scrapes. Needs ``prometheus-client`` (the
``prometheus`` extra); ``import batchkit`` alone never imports it.

Metrics, each labelled ``batcher="<name>"``:

=====================================  =========  ==================================================
name                                   type       meaning
=====================================  =========  ==================================================
``batchkit_requests_total``            counter    ``predict`` calls
``batchkit_completed_total``           counter    requests answered with their result
``batchkit_failed_total``              counter    requests answered with an error
``batchkit_rejected_total``            counter    refused at once (queue full, closed)
``batchkit_timed_out_total``           counter    deadline passed first
``batchkit_cancelled_total``           counter    caller cancelled first
``batchkit_batches_total``             counter    batches sent to the model
``batchkit_oom_splits_total``          counter    batches halved after out-of-memory
``batchkit_hung_batches_total``        counter    batches abandoned past ``run_timeout_ms``
``batchkit_flushes_total``             counter    batches by ``reason`` they left (full, cap, cost,
                                                  timer, idle, deadline, drain, step)
``batchkit_flushed_requests_total``    counter    requests in those batches, by ``reason``
``batchkit_cache_hits_total``          counter    answered from the result cache (``cache_size``)
``batchkit_cache_misses_total``        counter    looked up in the result cache, not found
``batchkit_deduplicated_total``        counter    answered by an identical request's computation
``batchkit_pending_requests``          gauge      queued now
``batchkit_in_flight_requests``        gauge      in a running batch now
``batchkit_batch_size_limit``          gauge      largest batch formed now
``batchkit_model_busy_ratio``          gauge      share of slot time the model ran (last 10-20 s)
``batchkit_concurrency_limit``         gauge      batches allowed in flight now (tuned with "auto")
``batchkit_limited_by``                gauge      1 for the ``limit`` that held throughput back
                                                  (last 10-20 s), 0 for the others
``batchkit_batch_size``                histogram  batch sizes (buckets 1, 2, 4, ... 1024)
``batchkit_queue_wait_seconds``        gauge      queue wait, by ``quantile`` (0.5, 0.9, 0.99, 1 = max)
``batchkit_run_time_seconds``          gauge      per-batch model time, by ``quantile``
``batchkit_latency_seconds``           gauge      ``predict`` latency, by ``quantile``
=====================================  =========  ==================================================

The quantiles are those of ``stats()``: over the most recent 10,000 samples, so
they are gauges (a window, not a cumulative summary).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

from ._extras import require

require("prometheus_client", "prometheus", "batchkit.prometheus")

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric  # noqa: E402
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry  # noqa: E402

from ._flushes import FLUSH_REASONS, LIMITS  # noqa: E402
from ._stats import BatcherStats, LatencySummary  # noqa: E402

__all__ = ["BATCH_SIZE_BUCKETS", "BatcherCollector", "StatsSource", "register", "unregister"]

BATCH_SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the ``batchkit_batch_size`` histogram's buckets (then ``+Inf``)."""

_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max"))

_COUNTERS = (
    ("requests", "predict calls made"),
    ("completed", "Requests answered with their result"),
    ("failed", "Requests answered with an error"),
    ("rejected", "Requests refused at once (queue full or batcher closed)"),
    ("timed_out", "Requests whose deadline passed first"),
    ("cancelled", "Requests whose caller was cancelled first"),
    ("batches", "Batches sent to the model"),
    ("oom_splits", "Times a batch was halved because the model ran out of memory"),
    ("hung_batches", "Batches that ran past run_timeout_ms and were abandoned"),
    ("cache_hits", "Requests answered from the result cache"),
    ("cache_misses", "Requests whose dedup_key the result cache did not hold"),
    ("deduplicated", "Requests answered by an identical request's computation instead of their own"),
)
_GAUGES = (
    ("pending_requests", "pending", "Requests queued now"),
    ("in_flight_requests", "in_flight", "Requests in a batch that is running now"),
    ("batch_size_limit", "batch_size_limit", "The largest batch formed now"),
    ("model_busy_ratio", "busy_fraction", "Share of its slots' time the model ran (last 10 to 20 s)"),
    ("concurrency_limit", "concurrency_limit", 'Batches allowed in flight now (tuned with "auto")'),
)
_BY_REASON = (
    ("flushes", "flushes", "Batches sent to the model, by the reason they left"),
    ("flushed_requests", "flushed_requests", "Requests in the batches sent, by the reason they left"),
)
_SUMMARIES = (
    ("queue_wait_seconds", "queue_wait_ms", "Time from predict to the request's batch being sent (recent window)"),
    ("run_time_seconds", "run_time_ms", "Per-batch collate, model call and split time (recent window)"),
    ("latency_seconds", "latency_ms", "Time from predict to its answer (recent window)"),
)


class StatsSource(Protocol):
    """Anything with a ``stats()`` method: a ``Batcher`` or a ``SyncBatcher``."""

    def stats(self) -> BatcherStats: ...


def _default_name(batcher: StatsSource) -> str:
    for attribute in ("name", "_name"):
        value = getattr(batcher, attribute, None)
        if isinstance(value, str) and value:
            return value
    return f"{type(batcher).__name__}@{id(batcher):x}"


def _snapshot(batcher: StatsSource) -> BatcherStats:
    # stats() reads the batcher's counters; a scrape runs on another thread than
    # the event loop that updates them, and a sample window changing while it is
    # read raises RuntimeError ("deque mutated during iteration"). Read again.
    for _ in range(9):
        try:
            return batcher.stats()
        except RuntimeError:
            continue
    return batcher.stats()


class BatcherCollector(Collector):
    """A Prometheus collector that reports the ``stats()`` of one or more batchers.

    ```python
    from prometheus_client import REGISTRY
    from batchkit.prometheus import BatcherCollector

    REGISTRY.register(BatcherCollector([batcher]))
    ```

    Batchers are held by weak reference: a batcher that is garbage collected
    drops out of the metrics. Each is labelled by its name (``name=`` given to
    ``Batcher``, or the model function's qualified name); names must be unique
    within one collector.

    Most code calls ``register()`` instead, which keeps one collector per
    registry, so that any number of batchers can be added to the same registry.
    """

    def __init__(self, batchers: Iterable[StatsSource] = (), *, namespace: str = "batchkit") -> None:
        self._namespace = namespace
        self._lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary[StatsSource, str] = weakref.WeakKeyDictionary()
        for batcher in batchers:
            self.add(batcher)

    def add(self, batcher: StatsSource, name: str | None = None) -> None:
        """Report ``batcher`` too, labelled ``name`` (default: the batcher's name).

        Raises:
            ValueError: another batcher in this collector already has that name.
        """
        label = name if name is not None else _default_name(batcher)
        with self._lock:
            for other, other_label in list(self._batchers.items()):
                if other_label == label and other is not batcher:
                    raise ValueError(f"a batcher named {label!r} is already reported; pass name= to tell them apart")
            self._batchers[batcher] = label

    def remove(self, batcher: StatsSource) -> None:
        """Stop reporting ``batcher`` (no error if it was not reported)."""
        with self._lock:
            self._batchers.pop(batcher, None)

    @property
    def names(self) -> list[str]:
        """The ``batcher`` label of each batcher reported now."""
        with self._lock:
            return sorted(self._batchers.values())

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (lets a registry check names up front)."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Read every batcher's ``stats()`` now and return the metric families."""
        with self._lock:
            batchers = list(self._batchers.items())
        families = self._families()
        for batcher, label in sorted(batchers, key=lambda item: item[1]):
            self._add_samples(families, label, _snapshot(batcher))
        return list(families)

    # -- building the families ----------------------------------------------------

    def _families(self) -> _Families:
        ns = self._namespace
        return _Families(
            counters={field: CounterMetricFamily(f"{ns}_{field}", doc, labels=["batcher"]) for field, doc in _COUNTERS},
            gauges={
                field: GaugeMetricFamily(f"{ns}_{metric}", doc, labels=["batcher"]) for metric, field, doc in _GAUGES
            },
            batch_size=HistogramMetricFamily(f"{ns}_batch_size", "Sizes of the batches sent", labels=["batcher"]),
            summaries={
                field: GaugeMetricFamily(f"{ns}_{metric}", doc, labels=["batcher", "quantile"])
                for metric, field, doc in _SUMMARIES
            },
            by_reason={
                field: CounterMetricFamily(f"{ns}_{metric}", doc, labels=["batcher", "reason"])
                for metric, field, doc in _BY_REASON
            },
            limited_by=GaugeMetricFamily(
                f"{ns}_limited_by",
                "1 for what limited throughput over the last 10 to 20 s",
                labels=["batcher", "limit"],
            ),
        )

    @staticmethod
    def _add_samples(families: _Families, label: str, stats: BatcherStats) -> None:
        for field, family in families.counters.items():
            family.add_metric([label], float(getattr(stats, field)))
        for field, gauge in families.gauges.items():
            gauge.add_metric([label], float(getattr(stats, field)))
        buckets: list[tuple[str, float]] = []
        for bound in BATCH_SIZE_BUCKETS:
            buckets.append((str(float(bound)), float(sum(n for size, n in stats.batch_sizes.items() if size <= bound))))
        buckets.append(("+Inf", float(sum(stats.batch_sizes.values()))))
        total = float(sum(size * n for size, n in stats.batch_sizes.items()))
        families.batch_size.add_metric([label], buckets, total)
        for field, gauge in families.summaries.items():
            summary: LatencySummary = getattr(stats, field)
            for quantile, attribute in _QUANTILES:
                gauge.add_metric([label, quantile], getattr(summary, attribute) / 1000.0)
        for field, family in families.by_reason.items():
            counts = getattr(stats, field)
            for reason in FLUSH_REASONS:
                family.add_metric([label, reason], float(counts.get(reason, 0)))
        for limit in LIMITS:
            families.limited_by.add_metric([label, limit], 1.0 if stats.limited_by == limit else 0.0)


class _Families:
    __slots__ = ("batch_size", "by_reason", "counters", "gauges", "limited_by", "summaries")

    def __init__(
        self,
        counters: dict[str, CounterMetricFamily],
        gauges: dict[str, GaugeMetricFamily],
        batch_size: HistogramMetricFamily,
        summaries: dict[str, GaugeMetricFamily],
        by_reason: dict[str, CounterMetricFamily],
        limited_by: GaugeMetricFamily,
    ) -> None:
        self.counters = counters
        self.gauges = gauges
        self.batch_size = batch_size
        self.summaries = summaries
        self.by_reason = by_reason
        self.limited_by = limited_by

    def __iter__(self) -> Iterator[Metric]:
        yield from self.counters.values()
        yield from self.gauges.values()
        yield self.batch_size
        yield from self.summaries.values()
        yield from self.by_reason.values()
        yield self.limited_by


_registered: weakref.WeakKeyDictionary[CollectorRegistry, BatcherCollector] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def register(
    batcher: StatsSource, registry: CollectorRegistry | None = None, name: str | None = None
) -> BatcherCollector:
    """Export ``batcher``'s stats to ``registry`` (default: prometheus_client's global one).

    ```python
    import batchkit.prometheus
    batchkit.prometheus.register(batcher)      # then scrape as usual
    ```

    Every batcher registered with the same registry shares one
    ``BatcherCollector`` (returned), labelled by ``name`` (default: the
    batcher's name). Reading the stats happens at scrape time only.

    Raises:
        ValueError: a batcher with the same name is already registered there.
    """
    registry = REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.get(registry)
        if collector is None:
            collector = BatcherCollector()
            registry.register(collector)
            _registered[registry] = collector
    collector.add(batcher, name)
    return collector


def unregister(batcher: StatsSource, registry: CollectorRegistry | None = None) -> None:
    """Stop exporting ``batcher`` to ``registry`` (no error if it was not registered)."""
    registry = REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.get(registry)
    if collector is not None:
        collector.remove(batcher)
