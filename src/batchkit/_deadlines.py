"""What the cost model says about deadlines: when to flush for one, and who can still make theirs.

Three predictions, each from the ``CostModel`` of the request's group:

* **Flush in time** (``flush_by``): a group goes by its earliest deadline minus
  a pessimistic run time of the batch it would form (``upper``: the expected
  time plus two standard deviations, at least a tenth more) and a margin for
  the loop's own latency.
* **Hopeless** (``hopeless_before``): when a batch is formed, a request whose time
  left is shorter than an optimistic run time of that batch (``lower``: the
  expected time less two standard deviations, at least a tenth less) cannot make
  it; it is failed instead of taking a slot.
* **Admission** (``time_to_answer``): a request with a deadline is refused at
  once when even an optimistic prediction of its answer comes after its
  deadline: the requests queued ahead of it in its group go in full batches,
  each on the first slot to free (the batches running now finish first), then
  its own batch runs on the next.

Every prediction is optimistic where it refuses or fails (``lower``) and
pessimistic where it flushes early (``upper``). Nothing is refused or failed
early on an estimate that nothing confirmed lately: before a group's own model
has seen ``WARMUP`` batches (the batcher-wide one is used to flush, not to
refuse), when none of its batches ran for ``STALE_AFTER``, or when no batch of
about the size in question did (a stale "too slow" would otherwise stop the
batches that correct it).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from ._cost import CostModel

__all__ = ["FLUSH_MARGIN", "flush_by", "hopeless_before", "lower", "time_to_answer", "upper"]

_SIMULATED = 256  # full batches ahead placed on slots one by one; beyond, their work is averaged

FLUSH_MARGIN = 0.005
"""The least time a group is flushed ahead of what its earliest deadline needs (timers fire late)."""


def upper(cost: CostModel, size: int) -> float:
    """A pessimistic run time of a batch of ``size``: two standard deviations above the mean, at least 10 %."""
    expected = cost.expected(size)
    return expected + max(2.0 * cost.spread(size), 0.1 * expected)


def lower(cost: CostModel, size: int, now: float | None = None) -> float:
    """An optimistic run time of a batch of ``size``: two standard deviations below the mean, at least 10 %.

    With ``now``: 0 when no batch of about that size ran within ``STALE_AFTER``
    (an old estimate for one size, made at a cold start say, refuses nothing:
    else that size would never run again to correct it).
    """
    if now is not None and not cost.fresh(size, now):
        return 0.0
    expected = cost.expected(size)
    return max(0.0, expected - max(2.0 * cost.spread(size), 0.1 * expected))


def flush_by(cost: CostModel, size: int, deadline: float, waited_from: float) -> float:
    """The latest time a batch of ``size`` can leave and still answer by ``deadline``.

    The margin covers the loop's own latency: a tenth of the request's whole wait
    (``deadline - waited_from``), at least ``FLUSH_MARGIN``.
    """
    margin = max(FLUSH_MARGIN, 0.1 * (deadline - waited_from))
    return deadline - upper(cost, size) - margin


def hopeless_before(cost: CostModel, size: int, now: float, *, backlog: bool) -> float:
    """A request in a batch of ``size`` starting ``now`` is failed if its deadline comes before this time.

    With a ``backlog`` (requests waiting behind this batch), a request that is
    more likely to miss its deadline than to make it (less time left than the
    expected run time) gives its place to one that can; without one, only a
    request that cannot make it even in a quick run (``lower``) is failed.
    """
    if not cost.current(now) or not cost.fresh(size, now):
        return now
    return now + (cost.expected(size) if backlog else lower(cost, size))


def time_to_answer(
    cost: CostModel,
    ahead: int,
    limit: int,
    slots: int,
    running: Iterable[tuple[CostModel, int, float]],
    now: float = 0.0,
) -> float:
    """A prediction of the time from now to the answer of a request queued behind ``ahead`` others in its group.

    ``running`` gives, for each batch running now, its cost model, its size and
    how long it has run. Their remaining time and the full batches ahead (their
    expected run times: a sum of many, so the mean is what counts) are shared
    among ``slots``; then the request's own batch runs, counted optimistically
    (``lower``), so that a lone request is refused only by a clear margin. 0 when
    the model has not seen ``WARMUP`` batches yet, or none lately (at ``now``; see
    ``CostModel.current``): nothing is refused on no data, or on stale data.
    """
    if not cost.current(now) or slots < 1:
        return 0.0
    full, rest = divmod(ahead, limit)
    # When each slot frees: the running batches' remaining times, 0 for a free slot.
    free = sorted(max(0.0, model.expected(size) - elapsed) for model, size, elapsed in running)[:slots]
    free += [0.0] * (slots - len(free))
    if full <= _SIMULATED:  # the full batches ahead take the first slot to free, one after another
        heapq.heapify(free)
        batch = cost.expected(limit)
        for _ in range(full):
            heapq.heapreplace(free, free[0] + batch)
        start = free[0]
    else:  # a long queue: its work shared over the slots
        start = (sum(free) + full * cost.expected(limit)) / slots
    return start + lower(cost, rest + 1, now)
