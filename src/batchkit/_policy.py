"""When to flush: the rule that turns a queue into batches.

A group of pending requests is flushed as soon as a slot is free and either

* it is full (``max_batch_size`` requests, or ``max_batch_cost``), or
* the policy's flush time for it has come (or its earliest deadline needs it:
  see ``_deadlines.flush_by``).

``FixedWait`` puts that time ``max_wait`` after the group's oldest request
arrived: a request never waits longer than that for batch-mates (it may still
wait for the model to finish the batch ahead of it). With ``max_wait=0`` a group
is due at once: the worker sends whatever is queued whenever it is free, and
requests that arrive while the model runs form the next batch.

``AdaptiveWait`` (``max_wait_ms="auto"``) reads the cost model (``_cost.py``):

* With one slot, a group is due as soon as the slot is free. For a batch server
  this greedy rule is within a few percent of the best fixed wait at every load:
  once one request arrives per fixed cost the server is always busy and the
  batch size settles where it keeps up; waiting with the slot free only delays
  every request queued and every one behind them.
* With ``S`` slots (``replicas``, ``max_concurrent_batches``; with ``"auto"``, the
  tuner's limit now, less slots a hung call blocks), the slots act as
  one server ``S`` times as fast: free again ``expected(n) / S`` after the last
  batch (of ``n``) was sent. Batches go out evenly spaced instead of ``S`` tiny
  ones at once that keep every slot busy while the queue grows. A batch waits
  for that only when the fixed cost is at least half of a batch's run time
  (else more batches side by side serve better than larger ones) and a request
  is expected to arrive meanwhile (the arrival rate ``λ``, smoothed over 50 ms).
* ``max_latency_ms``, when given, caps that spacing so that the oldest request's
  expected answer stays within the budget.

``OomCap`` is the batch size cap learned from out-of-memory errors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sized
from typing import Protocol

from ._cost import CostModel
from ._queue import Request
from ._settings import Settings

__all__ = [
    "AdaptiveWait",
    "ArrivalRate",
    "CostModel",
    "FixedWait",
    "FlushPolicy",
    "OomCap",
    "RunningBatch",
    "make_policy",
]


class ArrivalRate:
    """Requests per second, smoothed over about ``horizon`` seconds (short: load changes fast)."""

    __slots__ = ("_count", "_horizon", "_time", "rate")

    def __init__(self, horizon: float = 0.05) -> None:
        self._horizon = horizon
        self._time: float | None = None
        self._count = 0
        self.rate = 0.0

    def observe(self, total_requests: int, now: float) -> None:
        if self._time is None:
            self._time, self._count = now, total_requests
            return
        elapsed = now - self._time
        if elapsed < 0.0005:  # too short to say anything
            return
        sample = (total_requests - self._count) / elapsed
        weight = 1.0 - math.exp(-elapsed / self._horizon)
        self.rate += weight * (sample - self.rate)
        self._time, self._count = now, total_requests


class FlushPolicy(Protocol):
    """Decides when a group that is not yet full should be flushed."""

    def flush_at(self, oldest: Request, size: int, limit: int) -> float:
        """The clock time at which this group should be sent to the model."""
        ...


class FixedWait:
    """Flush when the oldest request has waited ``max_wait`` seconds."""

    __slots__ = ("max_wait",)

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def flush_at(self, oldest: Request, size: int, limit: int) -> float:
        return oldest.enqueued_at + self.max_wait


class RunningBatch(Protocol):
    """What the adaptive wait reads of a batch that is running: when it started and how large it is."""

    @property
    def started_at(self) -> float: ...

    @property
    def requests(self) -> Sized: ...


class AdaptiveWait:
    """``max_wait_ms="auto"``: the slots act as one server, sent work whenever it is free.

    One slot: a group goes as soon as the slot is free (greedy), which for a
    single batch server is within a few percent of the best fixed wait at every
    load (docs/scheduling.md has the measurements and the reasoning). ``S`` slots
    act as one server ``S`` times as fast: it is free again ``expected(n) / S``
    after it was last sent a batch of ``n``, so batches go out evenly spaced,
    not ``S`` tiny ones at once that keep every slot busy while the queue grows.
    """

    __slots__ = ("_arrivals", "_clock", "_cost", "_max_latency", "_running", "_slots")

    def __init__(
        self,
        cost: CostModel,
        max_latency: float | None,
        running: Collection[RunningBatch] = (),
        slots: Callable[[], int] = lambda: 1,
        arrivals: ArrivalRate | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._cost = cost
        self._max_latency = max_latency
        self._running = running
        self._slots = slots
        self._arrivals = arrivals
        self._clock = clock

    def free_at(self) -> float:
        """When the slots, taken as one server, are free for the next batch (``-inf``: now).

        Spacing batches out saves fixed costs, and only pays when they are most
        of a batch's time (a cost mostly per sample is served better by more
        batches side by side) and when a request is expected to arrive and join
        in the meantime; otherwise the batch goes to a free slot at once.
        """
        slots = self._slots()
        running = self._running
        cost = self._cost
        if slots == 1 or not running or not cost.knows():
            return -math.inf
        last = max(running, key=_started_at)
        expected = cost.expected(len(last.requests))
        if cost.coefficients()[0] < 0.5 * expected:
            return -math.inf
        at = last.started_at + expected / slots
        if self._arrivals is not None and self._arrivals.rate * (at - self._clock()) < 1.0:
            return -math.inf
        return at

    def flush_at(self, oldest: Request, size: int, limit: int) -> float:
        at = self.free_at()
        if self._max_latency is not None:  # the oldest's expected answer stays within max_latency_ms
            at = min(at, oldest.enqueued_at + self._max_latency - self._cost.expected(size))
        return max(oldest.enqueued_at, at)  # no wait at all: the oldest's own arrival (a flush reason of "idle")


def _started_at(batch: RunningBatch) -> float:
    return batch.started_at


def make_policy(
    settings: Settings,
    cost: CostModel,
    running: Collection[RunningBatch] = (),
    arrivals: ArrivalRate | None = None,
    clock: Callable[[], float] = time.perf_counter,
    slots: Callable[[], int] | None = None,
) -> FlushPolicy:
    """The flush policy ``settings.max_wait_ms`` asks for.

    ``running``: the batches running now; ``slots``: how many may run at once now
    (default: all of ``settings.slots``).
    """
    if settings.max_wait_ms == "auto":
        all_slots = settings.slots
        return AdaptiveWait(cost, settings.max_latency, running, slots or (lambda: all_slots), arrivals, clock)
    return FixedWait(settings.max_wait_ms / 1000)


class OomCap:
    """How large a batch may be after the model ran out of memory, and how it recovers.

    A batch that ran out of memory is halved until its parts fit (see
    ``Executor``); the largest part that fit becomes the cap. An input that runs
    out of memory even alone is that input's error, not evidence about batch
    size: it leaves the cap alone. After ``patience`` clean batches in a row at
    the cap, the cap doubles, until it no longer binds (memory pressure passes:
    another model unloaded, long inputs gone). A doubling that runs out of memory
    again doubles the patience, so a hard limit is probed ever more rarely.
    ``configure(max_batch_size=...)`` resets it.
    """

    __slots__ = ("_clean", "_patience", "_probing", "value")

    PATIENCE = 64

    def __init__(self) -> None:
        self.value: int | None = None
        self._clean = 0
        self._patience = self.PATIENCE
        self._probing = False

    def reset(self) -> None:
        self.value, self._clean, self._patience, self._probing = None, 0, self.PATIENCE, False

    def observe(self, fit: int | None, size: int, limit: int) -> bool:
        """Learn from one batch of ``size`` (``fit``: the largest size that fit after an OOM).

        Returns True if the cap changed.
        """
        if fit is not None:
            if self._probing:
                self._patience *= 2  # the last doubling was too hopeful
            self._probing = False
            self._clean = 0
            if fit >= 1 and (self.value is None or fit < self.value) and fit < limit:
                self.value = fit
                return True
            return False
        if self.value is None or size < self.value:
            return False  # a batch below the cap says nothing about larger ones
        self._clean += 1
        if self._clean < self._patience:
            return False
        self._clean = 0
        self._probing = True
        self.value = None if 2 * self.value >= limit else 2 * self.value
        return True

    def limit(self, limit: int) -> int:
        return limit if self.value is None else min(limit, self.value)
