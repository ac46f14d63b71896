"""When to flush: the rule that turns a queue into batches.

A group of pending requests is flushed as soon as a slot is free and either

* it is full (``max_batch_size`` requests, or ``max_batch_cost``), or
* the policy's flush time for it has come.

``FixedWait`` puts that time ``max_wait`` after the group's oldest request
arrived: a request never waits longer than that for batch-mates (it may still
wait for the model to finish the batch ahead of it). With ``max_wait=0`` a group
is due at once: the worker sends whatever is queued whenever it is free, and
requests that arrive while the model runs form the next batch.

``AdaptiveWait`` (``max_wait_ms="auto"``) chooses the wait from what it learns
online: the model's cost per batch, ``cost(B) = a + b*B`` (least squares over
recent batches, older ones fading out), and the arrival rate ``λ``.

* When fewer than one request is expected per fixed cost (``λ·a < 1``), batching
  cannot pay: the batch goes at once, so a lone request at low load goes
  straight to the model.
* Otherwise, the batch size that keeps up with arrivals is ``B* = λa / (1 - λb)``
  (the size at which a batch takes as long as it takes ``B*`` requests to
  arrive; ``max_batch_size`` when ``λb >= 1``). A group smaller than ``B*`` waits
  for the arrivals it is missing, but never longer than ``a``, the fixed cost of
  one batch: waiting longer than a whole batch's overhead cannot pay off (the
  ski-rental bound), so the added delay is at most one fixed cost.
* ``max_latency_ms``, when given, caps the wait so that the expected end of the
  batch stays within that budget from the oldest request's arrival.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from ._queue import Request
from ._settings import Settings

__all__ = ["AdaptiveWait", "ArrivalRate", "CostModel", "FixedWait", "FlushPolicy", "OomCap", "make_policy"]


class CostModel:
    """Online least-squares fit of a batch's run time: ``seconds = a + b * size``."""

    __slots__ = ("_recent", "_s0", "_s1", "_s2", "_t0", "_t1", "batches")

    DECAY = 0.95  # weight of the past per new batch: about the last 20 batches count

    def __init__(self) -> None:
        self._s0 = self._s1 = self._s2 = self._t0 = self._t1 = 0.0
        self._recent: deque[float] = deque(maxlen=32)
        self.batches = 0

    def observe(self, size: int, seconds: float) -> None:
        d = self.DECAY
        self._s0 = d * self._s0 + 1
        self._s1 = d * self._s1 + size
        self._s2 = d * self._s2 + size * size
        self._t0 = d * self._t0 + seconds
        self._t1 = d * self._t1 + size * seconds
        self._recent.append(seconds)
        self.batches += 1

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)``: fixed seconds per batch, seconds per request.

        Cautious where the data say little: with batches all of one size there is
        no telling fixed from per-request cost, so it is all counted per request
        (``a = 0``: no reason to wait); and the fixed cost is never taken to be
        more than the fastest recent batch took.
        """
        if not self._s0:
            return 0.0, 0.0
        spread = self._s0 * self._s2 - self._s1 * self._s1
        if spread <= 1e-9 * self._s0 * self._s0:
            return 0.0, self._t0 / self._s1 if self._s1 else 0.0
        b = max(0.0, (self._s0 * self._t1 - self._s1 * self._t0) / spread)
        a = max(0.0, (self._t0 - b * self._s1) / self._s0)
        return min(a, self.fastest_recent()), b

    def expected(self, size: int) -> float:
        a, b = self.coefficients()
        return a + b * size

    def fastest_recent(self) -> float:
        """The shortest of the last 32 batch run times (0 before the first)."""
        return min(self._recent, default=0.0)


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


class AdaptiveWait:
    """``max_wait_ms="auto"``: wait only as long as batching is expected to pay off."""

    __slots__ = ("_arrivals", "_cost", "_max_latency")

    WARMUP_BATCHES = 3

    def __init__(self, cost: CostModel, arrivals: ArrivalRate, max_latency: float | None) -> None:
        self._cost = cost
        self._arrivals = arrivals
        self._max_latency = max_latency

    def target_size(self, limit: int) -> float:
        """``B*``: the batch size that keeps up with the arrival rate (at most ``limit``)."""
        a, b = self._cost.coefficients()
        lam = self._arrivals.rate
        if lam * b >= 1.0:
            return float(limit)
        return min(float(limit), lam * a / (1.0 - lam * b))

    def wait_for(self, size: int, limit: int) -> float:
        """Seconds the oldest request of a group of ``size`` should wait for batch-mates."""
        if self._cost.batches < self.WARMUP_BATCHES:
            return 0.0
        a, _ = self._cost.coefficients()
        lam = self._arrivals.rate
        if lam * a < 1.0:
            return 0.0
        target = self.target_size(limit)
        if size >= target:
            return 0.0
        wait = min(a, (target - size) / lam)
        if self._max_latency is not None:
            wait = min(wait, max(0.0, self._max_latency - self._cost.expected(math.ceil(target))))
        return wait

    def flush_at(self, oldest: Request, size: int, limit: int) -> float:
        return oldest.enqueued_at + self.wait_for(size, limit)


def make_policy(settings: Settings, cost: CostModel, arrivals: ArrivalRate) -> FlushPolicy:
    """The flush policy ``settings.max_wait_ms`` asks for."""
    if settings.max_wait_ms == "auto":
        return AdaptiveWait(cost, arrivals, settings.max_latency)
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
