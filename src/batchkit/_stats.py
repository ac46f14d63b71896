"""A point-in-time snapshot of a batcher's counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["BatcherStats"]


@dataclass(frozen=True)
class BatcherStats:
    """Counters since the batcher was created; see ``Batcher.stats()``.

    Every ``predict`` call is counted once in ``requests`` and ends in exactly one
    of ``completed``, ``failed``, ``rejected``, ``timed_out`` or ``cancelled``;
    until then it is ``pending`` (queued) or ``in_flight`` (in a running batch)::

        requests == completed + failed + rejected + timed_out + cancelled
                    + pending + in_flight
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

    @property
    def mean_batch_size(self) -> float:
        """Mean size of the batches sent so far (0.0 before the first)."""
        if not self.batches:
            return 0.0
        return sum(size * count for size, count in self.batch_sizes.items()) / self.batches
