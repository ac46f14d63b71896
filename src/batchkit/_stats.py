"""A point-in-time snapshot of a batcher's counters."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._flushes import FLUSH_REASONS, Recent, limited_by

__all__ = ["BatcherStats", "Histogram", "LatencySummary"]

WINDOW = 10_000
"""Samples per histogram window: summaries cover the last 10,000 to 20,000 samples."""


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of the most recent samples of one duration, in milliseconds.

    Percentiles are read from log-spaced buckets (within 4.5 %); ``mean`` and
    ``max`` are exact.
    """

    count: int
    """Samples summarized (the last 10,000 to 20,000)."""
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


class Histogram:
    """Recent durations in log-spaced buckets: O(1) to record, O(buckets) to summarize.

    Buckets are 1/16 of an octave wide (under 4.5 % apart) from 1 µs to about a
    day. Two windows of ``WINDOW`` samples each take turns, so a summary covers
    between the last ``WINDOW`` and ``2 * WINDOW`` samples: recent, and never a
    sort on the event loop. Batches of durations are binned with numpy.
    """

    __slots__ = ("_count", "_counts", "_max", "_older", "_sum")

    PER_OCTAVE = 16
    BUCKETS = 37 * PER_OCTAVE  # 1 µs * 2**37 is about 38 hours
    _EDGES = 1e-6 * np.exp2((np.arange(BUCKETS) + 0.5) / PER_OCTAVE)  # a bucket's representative value

    def __init__(self) -> None:
        self._counts = np.zeros(self.BUCKETS, dtype=np.int64)
        self._older: tuple[np.ndarray, int, float, float] | None = None
        self._count = 0
        self._sum = 0.0
        self._max = 0.0

    def _rotate(self) -> None:
        if self._count >= WINDOW:
            self._older = (self._counts, self._count, self._sum, self._max)
            self._counts = np.zeros(self.BUCKETS, dtype=np.int64)
            self._count, self._sum, self._max = 0, 0.0, 0.0

    def add(self, seconds: float) -> None:
        self._rotate()
        index = int(math.log2(seconds * 1e6) * self.PER_OCTAVE) if seconds > 1e-6 else 0
        self._counts[min(index, self.BUCKETS - 1)] += 1
        self._count += 1
        self._sum += seconds
        if seconds > self._max:
            self._max = seconds

    def add_since(self, now: float, starts: list[float]) -> None:
        """Record ``now - start`` for each of ``starts``."""
        n = len(starts)
        if n < 8:
            for start in starts:
                self.add(now - start)
            return
        self._rotate()
        durations = now - np.asarray(starts)
        index = np.log2(np.maximum(durations, 1e-6) * 1e6) * self.PER_OCTAVE
        self._counts += np.bincount(np.minimum(index.astype(np.int64), self.BUCKETS - 1), minlength=self.BUCKETS)
        self._count += n
        total = float(durations.sum())
        self._sum += total
        self._max = max(self._max, now - min(starts))

    def summary(self) -> LatencySummary:
        counts, n, total, peak = self._counts.copy(), self._count, self._sum, self._max
        older = self._older
        if older is not None:
            counts += older[0]
            n, total, peak = n + older[1], total + older[2], max(peak, older[3])
        if not n:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        cumulative = np.cumsum(counts)
        binned = int(cumulative[-1])  # equals n, unless read mid-update from another thread

        def rank(q: float) -> float:
            index = int(np.searchsorted(cumulative, min(binned, int(q * binned) + 1)))
            return min(float(self._EDGES[index]), peak) * 1000.0

        return LatencySummary(n, total / n * 1000.0, rank(0.50), rank(0.90), rank(0.99), peak * 1000.0)


@dataclass(frozen=True)
class BatcherStats:
    """Counters since the batcher was created; see ``Batcher.stats()``.

    Every ``predict`` call is counted once in ``requests`` and ends in exactly one
    of ``completed``, ``failed``, ``rejected``, ``timed_out`` or ``cancelled``;
    until then it is ``pending`` (queued) or ``in_flight`` (in a running batch):

    ```python
    requests == completed + failed + rejected + timed_out + cancelled
                + pending + in_flight
    ```
    """

    requests: int
    """``predict`` calls made."""
    batches: int
    """Batches sent to the model."""
    completed: int
    """Requests answered with their result."""
    failed: int
    """Requests answered with an error (the model raised, bad input, shutdown)."""
    rejected: int
    """Requests refused at once: queue full or batcher closed."""
    timed_out: int
    """Requests whose deadline passed first, or that were predicted to miss it (refused, or failed early)."""
    cancelled: int
    """Requests whose caller was cancelled first."""
    pending: int
    """Requests queued now, waiting for a batch."""
    in_flight: int
    """Requests in a batch that is running now."""
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    """Histogram: batch size -> number of batches of that size."""
    queue_wait_ms: LatencySummary = LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    """From ``predict`` to the request's batch being sent to the model."""
    run_time_ms: LatencySummary = LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    """Per batch: collate, model call and split."""
    latency_ms: LatencySummary = LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    """From ``predict`` to its answer, for requests answered with a result or an error."""
    oom_splits: int = 0
    """Times a batch was halved because the model ran out of memory."""
    batch_size_limit: int = 0
    """The largest batch formed now: ``max_batch_size``, lowered by ``allowed_batch_sizes``
    and by the largest size that fit after an out-of-memory error."""
    hung_batches: int = 0
    """Batches that ran past ``run_timeout_ms`` and were abandoned."""
    oldest_queued_ms: float = 0.0
    """How long the oldest queued request has waited (0 when none is queued)."""
    oldest_running_ms: float = 0.0
    """How long the oldest batch still running (or still blocking its slot after a hang) has run."""
    blocked_slots: int = 0
    """Slots whose call ran past ``run_timeout_ms`` and has not returned yet: the model is never
    called twice at once, so they serve nothing until it does. A readiness check should fail
    while every slot is blocked, or ``oldest_running_ms`` grows past what the model can take."""
    concurrency_limit: int = 1
    """Batches allowed in flight now: ``replicas`` or ``max_concurrent_batches``, or with ``"auto"``
    the number the tuner has found to pay."""
    flushes: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(FLUSH_REASONS, 0))
    """Batches by the reason they left, every reason present (they add up to ``batches``):
    ``full`` (the batch size limit), ``cap`` (the out-of-memory cap, below that limit), ``cost``
    (``max_batch_cost``), ``timer`` (the wait ran out), ``idle`` (no wait: a slot was free),
    ``deadline`` (early, for a deadline), ``drain`` (closing), ``step`` (a ``StepBatcher``
    admitted rows into a running state before their wait ran out)."""
    flushed_requests: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(FLUSH_REASONS, 0))
    """Requests sent in the batches of each reason (``mean_flush_size`` divides it by ``flushes``)."""
    busy_fraction: float = 0.0
    """The share of its slots' time the model ran over the last 10 to 20 seconds (0 to 1)."""
    limited_by: str = "none"
    """What limited throughput over the last 10 to 20 seconds: ``"arrivals"`` (batches leave
    before they are full: few requests come at a time), ``"model"`` (the model runs nearly all the
    time on full batches), ``"queue"`` (requests refused with ``QueueFullError``), ``"cap"`` (most
    batches cut at the out-of-memory cap), ``"deadline"`` (most batches sent early for a deadline),
    or ``"none"`` (nothing ran). The rule is in docs/tuning.md ("My batches are small")."""
    limited_by_detail: str = ""
    """One sentence with the numbers behind ``limited_by``."""
    cache_hits: int = 0
    """(``cache_size``) Requests answered from the result cache, without queueing (also ``completed``)."""
    cache_misses: int = 0
    """(``cache_size``) Requests whose ``dedup_key`` the cache did not hold."""
    deduplicated: int = 0
    """(``dedup_key``) Requests answered by an identical request's computation instead of their own
    (with its result or its error; also counted in ``completed`` or ``failed``)."""

    @property
    def mean_batch_size(self) -> float:
        """Mean size of the batches sent so far (0.0 before the first)."""
        if not self.batches:
            return 0.0
        return sum(size * count for size, count in self.batch_sizes.items()) / self.batches

    @property
    def mean_flush_size(self) -> dict[str, float]:
        """Mean batch size by the reason batches left (0.0 for a reason with no batch)."""
        return {
            reason: self.flushed_requests.get(reason, 0) / count if count else 0.0
            for reason, count in self.flushes.items()
        }


class Counters:
    """The live counters of one batcher, kept by its scheduler (on the event loop).

    ``snapshot`` copies them into a ``BatcherStats``; it is safe from any thread
    and costs O(histogram buckets), never a sort.
    """

    __slots__ = (
        "batch_sizes",
        "batches",
        "cache_hits",
        "cache_misses",
        "cancelled",
        "completed",
        "deduplicated",
        "failed",
        "flushed_rows",
        "flushes",
        "hung",
        "in_flight",
        "latency",
        "oom_splits",
        "queue_wait",
        "recent",
        "rejected",
        "requests",
        "run_time",
        "timed_out",
        "version",
    )

    def __init__(self) -> None:
        self.requests = self.batches = self.completed = self.failed = self.rejected = 0
        self.timed_out = self.cancelled = self.in_flight = self.oom_splits = self.hung = 0
        self.cache_hits = self.cache_misses = self.deduplicated = 0
        self.batch_sizes: dict[int, int] = {}
        self.queue_wait = Histogram()
        self.run_time = Histogram()
        self.latency = Histogram()
        self.flushes = [0] * len(FLUSH_REASONS)  # batches by the reason they left (see _flushes)
        self.flushed_rows = [0] * len(FLUSH_REASONS)
        self.recent = Recent(time.perf_counter())
        self.version = 0  # odd while the batch counts are being changed (see snapshot)

    def flushed(self, reason: int, size: int, now: float, *, backlog: bool = False) -> None:
        """Count one batch of ``size`` that left for ``reason`` (an index into ``FLUSH_REASONS``);
        ``backlog``: requests were still queued when it left."""
        self.version += 1
        self.batches += 1
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        self.flushes[reason] += 1
        self.flushed_rows[reason] += size
        self.version += 1
        self.recent.flushed(reason, size, now, backlog)

    def _batch_counts(self) -> tuple[int, dict[int, int], list[int], list[int]]:
        """``batches``, ``batch_sizes``, ``flushes``, ``flushed_rows``, as of one moment.

        Read from another thread, the loop may count a batch in between: the
        copies are taken again until no count changed while they were taken.
        """
        for _ in range(100):
            version = self.version
            if not version % 2:
                counts = (self.batches, self.batch_sizes.copy(), list(self.flushes), list(self.flushed_rows))
                if self.version == version:
                    return counts
            time.sleep(0)  # let the loop's thread finish counting
        return self.batches, self.batch_sizes.copy(), list(self.flushes), list(self.flushed_rows)

    def ran(self, seconds: float, now: float, *, batch: bool = True) -> None:
        """The model ran ``seconds`` (a whole batch, or with ``batch=False`` one step of a ``StepBatcher``)."""
        if batch:
            self.run_time.add(seconds)
        self.recent.ran(seconds, now)

    def snapshot(
        self,
        *,
        pending: int,
        batch_size_limit: int,
        oldest_queued_ms: float = 0.0,
        oldest_running_ms: float = 0.0,
        blocked_slots: int = 0,
        concurrency_limit: int = 1,
        now: float,
        slots: int,
        max_batch_size: int,
        max_queue_size: int,
    ) -> BatcherStats:
        batches, batch_sizes, flushes, flushed_rows = self._batch_counts()
        recent = self.recent.totals(now)
        limit, detail = limited_by(
            recent,
            slots=slots,
            limit=batch_size_limit,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
        )
        return BatcherStats(
            requests=self.requests,
            batches=batches,
            completed=self.completed,
            failed=self.failed,
            rejected=self.rejected,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            pending=pending,
            in_flight=self.in_flight,
            batch_sizes=dict(sorted(batch_sizes.items())),
            queue_wait_ms=self.queue_wait.summary(),
            run_time_ms=self.run_time.summary(),
            latency_ms=self.latency.summary(),
            oom_splits=self.oom_splits,
            batch_size_limit=batch_size_limit,
            hung_batches=self.hung,
            oldest_queued_ms=oldest_queued_ms,
            oldest_running_ms=oldest_running_ms,
            blocked_slots=blocked_slots,
            concurrency_limit=concurrency_limit,
            flushes=dict(zip(FLUSH_REASONS, flushes, strict=True)),
            flushed_requests=dict(zip(FLUSH_REASONS, flushed_rows, strict=True)),
            busy_fraction=recent.busy_fraction(slots),
            limited_by=limit,
            limited_by_detail=detail,
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            deduplicated=self.deduplicated,
        )
