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
  deadline: the batches running now finish, the requests queued ahead of it in
  its group go in full batches, then its own batch runs, spread over the slots.

Every prediction is optimistic where it refuses or fails (``lower``) and
pessimistic where it flushes early (``upper``); before a model has seen
``WARMUP`` batches, or when none ran for ``STALE_AFTER``, nothing is refused or
failed early (a stale "too slow" would otherwise stop the batches that correct it).
"""

from __future__ import annotations

from collections.abc import Iterable

from ._cost import CostModel

__all__ = ["FLUSH_MARGIN", "flush_by", "hopeless_before", "lower", "time_to_answer", "upper"]

FLUSH_MARGIN = 0.005
"""The least time a group is flushed ahead of what its earliest deadline needs (timers fire late)."""


def upper(cost: CostModel, size: int) -> float:
    """A pessimistic run time of a batch of ``size``: two standard deviations above the mean, at least 10 %."""
    expected = cost.expected(size)
    return expected + max(2.0 * cost.spread(size), 0.1 * expected)


def lower(cost: CostModel, size: int) -> float:
    """An optimistic run time of a batch of ``size``: two standard deviations below the mean, at least 10 %."""
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
    if not cost.current(now):
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
    work = full * cost.expected(limit)
    busy = 0
    for model, size, elapsed in running:
        work += max(0.0, model.expected(size) - elapsed)
        busy += 1
    start = 0.0 if full < slots - busy else work / slots  # a slot is free for it: it starts now
    return start + lower(cost, rest + 1)
