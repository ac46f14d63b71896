"""Why each batch left, and what limited the batcher lately.

The scheduler names one *reason* for every batch it forms, at the moment it
decides to flush (``Scheduler._due_group``):

============  ================================================================
``full``      the group reached the batch size limit (``max_batch_size``,
              lowered by ``allowed_batch_sizes``)
``cap``       the group reached the out-of-memory cap, a limit below that
``cost``      the group reached ``max_batch_cost`` before the size limit
``timer``     the policy's wait ran out (``max_wait_ms``, or the wait
              ``"auto"`` chose)
``idle``      no wait at all (``max_wait_ms=0``, or ``"auto"`` chose 0): sent
              because a slot was free
``deadline``  sent before the wait ran out, so that a request's deadline is met
``drain``     sent without waiting because the batcher is closing
``step``      a ``StepBatcher`` admitted rows into a running state before
              their wait ran out
============  ================================================================

A batch counts under the first that holds: full (``full``, ``cap``, ``cost``),
then the wait (``timer``, ``idle``), then ``deadline``, then ``drain`` or
``step``. So a batch that waited out ``max_wait_ms`` is ``timer`` even while
the batcher closes, and with ``max_wait_ms=0`` a ``StepBatcher``'s admissions
are ``idle``.

Counting is two list increments per batch (and one count per refused request).
``Recent`` keeps the same counts,
the model's busy time and the ``QueueFullError`` refusals per 10-second window,
and ``limited_by`` reads the last two windows (10 to 20 seconds) to say what
limited throughput there: see its rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "CAP",
    "COST",
    "DEADLINE",
    "DRAIN",
    "FLUSH_REASONS",
    "FULL",
    "IDLE",
    "LIMITS",
    "STEP",
    "TIMER",
    "Recent",
    "RecentTotals",
    "limited_by",
]

FLUSH_REASONS: tuple[str, ...] = ("full", "cap", "cost", "timer", "idle", "deadline", "drain", "step")
"""Why a batch left, in the order ``BatcherStats.flushes`` lists them."""
FULL, CAP, COST, TIMER, IDLE, DEADLINE, DRAIN, STEP = range(len(FLUSH_REASONS))

LIMITS: tuple[str, ...] = ("none", "arrivals", "model", "queue", "cap", "deadline")
"""The values of ``BatcherStats.limited_by``."""

WINDOW_SECONDS = 10.0
"""Length of one window: ``limited_by`` reads the current one and the one before."""
BUSY = 0.9
"""The model counts as saturated when its slots ran at least this share of the time."""
MOST = 0.5
"""A share of the window's batches that decides a verdict (at least half)."""
_NEVER = -(2**62)  # the epoch of a window that never was


class _Window:
    """The counts of one ``WINDOW_SECONDS`` epoch."""

    __slots__ = ("backlogged", "busy", "epoch", "flushes", "queue_full", "rows")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.flushes = [0] * len(FLUSH_REASONS)
        self.rows = [0] * len(FLUSH_REASONS)
        self.busy = 0.0  # seconds the model ran (batches that finished in this window)
        self.queue_full = 0
        self.backlogged = 0  # batches that left with requests still queued behind them


class RecentTotals:
    """The last two windows added up: what ``limited_by`` decides from."""

    __slots__ = ("backlogged", "busy", "flushes", "queue_full", "rows", "wall")

    def __init__(
        self, flushes: list[int], rows: list[int], busy: float, queue_full: int, wall: float, backlogged: int = 0
    ) -> None:
        self.flushes = flushes
        self.rows = rows
        self.busy = busy
        self.queue_full = queue_full
        self.wall = wall  # seconds the two windows cover up to now (from the batcher's creation, if later)
        self.backlogged = backlogged

    def busy_fraction(self, slots: int) -> float:
        """The share of the slots' time the model ran (0 to 1)."""
        if self.wall <= 0.0:
            return 0.0
        return min(1.0, self.busy / (self.wall * slots))


class Recent:
    """Flushes by reason, model time and queue-full refusals, per 10-second window.

    Windows are aligned to the clock (``epoch = now // 10 s``) and made when
    their first event comes, so an idle batcher keeps nothing stale: a read
    adds up the windows of this epoch and the last one only. O(1) per event.
    Written on the event loop; ``totals`` may be read from any thread (a read
    may miss an event in progress).
    """

    __slots__ = ("_born", "_current", "_previous")

    def __init__(self, born: float = -math.inf) -> None:
        self._born = born  # when the batcher was made: windows cover no time before it
        self._current = _Window(_NEVER)
        self._previous = _Window(_NEVER)

    def _window(self, now: float) -> _Window:
        current = self._current
        epoch = int(now // WINDOW_SECONDS)
        if current.epoch != epoch:
            self._previous = current if current.epoch == epoch - 1 else _Window(epoch - 1)
            current = self._current = _Window(epoch)
        return current

    def flushed(self, reason: int, size: int, now: float, backlog: bool = False) -> None:
        window = self._window(now)
        window.flushes[reason] += 1
        window.rows[reason] += size
        window.backlogged += backlog

    def ran(self, seconds: float, now: float) -> None:
        self._window(now).busy += seconds

    def refused(self, now: float) -> None:
        self._window(now).queue_full += 1

    def totals(self, now: float) -> RecentTotals:
        epoch = int(now // WINDOW_SECONDS)
        current = self._current  # before _previous: a rotation in between shows one window twice, not none
        previous = self._previous
        windows = [w for w in ((current,) if previous is current else (previous, current)) if epoch - w.epoch in (0, 1)]
        flushes = [0] * len(FLUSH_REASONS)
        rows = [0] * len(FLUSH_REASONS)
        for window in windows:
            for reason in range(len(FLUSH_REASONS)):
                flushes[reason] += window.flushes[reason]
                rows[reason] += window.rows[reason]
        start = max((epoch - 1) * WINDOW_SECONDS, self._born)  # the last window and this one so far
        return RecentTotals(
            flushes,
            rows,
            sum(w.busy for w in windows),
            sum(w.queue_full for w in windows),
            max(0.0, now - start) if windows else 0.0,
            sum(w.backlogged for w in windows),
        )


def limited_by(
    recent: RecentTotals, *, slots: int, limit: int, max_batch_size: int, max_queue_size: int
) -> tuple[str, str]:
    """What limited the batcher over the last 10 to 20 seconds, and a sentence saying why.

    The first rule that holds, in this order:

    1. ``"none"``: no batch left and no request was refused.
    2. ``"queue"``: a request was refused with ``QueueFullError``.
    3. ``"cap"``: at least half the batches left at the out-of-memory cap.
    4. ``"deadline"``: at least half the batches left early for a deadline.
    5. ``"model"``: at least half the batches left full (``full`` or
       ``cost``), and either the slots ran the model at least 90 % of the
       time, or at least half the batches left with requests still queued
       behind them (a standing queue: requests wait for the model, or for its
       turn on a shared executor, not for each other; the time between
       batches then goes to handing them over).
    6. ``"arrivals"``: otherwise. Batches leave before they are full (by
       timer, idle slot...), so they hold what arrived: more concurrent
       requests, or a longer wait, would make them larger.
    """
    batches = sum(recent.flushes)
    busy = recent.busy_fraction(slots)
    if not batches and not recent.queue_full:
        return "none", f"no batch in the last {WINDOW_SECONDS:g} to {2 * WINDOW_SECONDS:g} s"
    if recent.queue_full:
        return "queue", (
            f"{recent.queue_full} requests refused with QueueFullError (max_queue_size={max_queue_size}); "
            f"the model ran {busy:.0%} of the time"
        )

    def share(*reasons: int) -> float:
        return sum(recent.flushes[r] for r in reasons) / batches

    if share(CAP) >= MOST:
        return "cap", (
            f"{share(CAP):.0%} of batches left at the out-of-memory cap ({limit} of max_batch_size={max_batch_size}); "
            f"the model ran {busy:.0%} of the time"
        )
    if share(DEADLINE) >= MOST:
        return "deadline", (
            f"{share(DEADLINE):.0%} of batches left early to meet a deadline, "
            f"{_mean(recent, (DEADLINE,)):.1f} requests on average: timeouts leave little time to wait"
        )
    backlog = recent.backlogged / batches
    if share(FULL, COST) >= MOST and (busy >= BUSY or backlog >= MOST):
        return "model", (
            f"the model ran {busy:.0%} of the time, {share(FULL, COST):.0%} of batches full "
            f"({_mean(recent, (FULL, COST)):.1f} requests on average), {backlog:.0%} with requests still "
            "queued behind them: throughput is the model's"
        )
    early = (TIMER, IDLE, DEADLINE, DRAIN, STEP)  # left before they were full
    top = max(early, key=lambda r: recent.flushes[r])
    if not recent.flushes[top]:
        return "arrivals", f"the model ran {busy:.0%} of the time, on full batches: it keeps up with bursts"
    why = (
        "the model is nearly saturated on batches that are not full" if busy >= BUSY else "few requests come at a time"
    )
    return "arrivals", (
        f"the model ran {busy:.0%} of the time; {share(top):.0%} of batches left by {FLUSH_REASONS[top]} "
        f"with {_mean(recent, (top,)):.1f} requests on average (limit {limit}): {why}"
    )


def _mean(recent: RecentTotals, reasons: Sequence[int]) -> float:
    flushes = sum(recent.flushes[r] for r in reasons)
    return sum(recent.rows[r] for r in reasons) / flushes if flushes else 0.0
