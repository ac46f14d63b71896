"""A point-in-time snapshot of a batcher's counters."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["BatcherStats", "LatencySummary", "LatencyWindow"]

WINDOW = 10_000
"""How many recent samples the latency summaries are computed over."""


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of the most recent samples of one duration, in milliseconds."""

    count: int
    """Samples in the window (at most the last 10,000)."""
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_ms: Iterable[float]) -> LatencySummary:
        ordered = sorted(samples_ms)
        n = len(ordered)
        if not n:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)

        def rank(q: float) -> float:
            return ordered[min(n - 1, int(q * n))]

        return cls(n, sum(ordered) / n, rank(0.50), rank(0.90), rank(0.99), ordered[-1])


class LatencyWindow:
    """The last ``WINDOW`` durations recorded (seconds in, milliseconds out)."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def extend(self, seconds: Iterable[float]) -> None:
        self._samples.extend(seconds)

    def summary(self) -> LatencySummary:
        samples = self._samples.copy()  # atomic: safe while the event loop appends
        return LatencySummary.of(s * 1000.0 for s in samples)


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
    """Requests whose deadline passed first."""
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

    @property
    def mean_batch_size(self) -> float:
        """Mean size of the batches sent so far (0.0 before the first)."""
        if not self.batches:
            return 0.0
        return sum(size * count for size, count in self.batch_sizes.items()) / self.batches
