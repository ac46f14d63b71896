"""A discrete-event simulation of batchkit's scheduler on a virtual clock: the policy alone, without noise.

The real ``Scheduler`` (queue, flush policy, deadlines, cost model, admission)
is driven by simulated arrivals and batch completions: time jumps from one
event to the next (an arrival, the end of a batch, a flush time the scheduler
asked for), so a run of seconds takes milliseconds, and the same arrivals give
the same answer on every machine, loaded or not. What it leaves out is what a
real run adds: the event loop's latency, threads, the other processes on the
machine. ``benchmarks/adaptive_wait.py`` and ``benchmarks/goodput.py`` run both.

A batch of ``n`` holds its slot for ``cost(n) + overhead`` seconds (``overhead``:
the hand-off to and from the slot's thread, which the cost model does not see)
and reports ``cost(n)`` as its run time, like the executor does.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import batchkit._scheduler as scheduler_module
from batchkit._errors import RequestTimeoutError
from batchkit._execute import Outcome
from batchkit._scheduler import Batch, Scheduler
from batchkit._settings import Settings

__all__ = ["SimResult", "simulate"]


@dataclass
class SimResult:
    """What every request went through (times in seconds)."""

    latencies: list[float] = field(default_factory=list)  # answered with a result
    refused: int = 0  # refused at admission (RequestTimeoutError from submit)
    timed_out: int = 0  # failed with RequestTimeoutError later (early, queued or running)
    on_time: int = 0  # answered with a result within their deadline
    batches: int = 0
    elapsed: float = 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else math.nan

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed

    @property
    def goodput(self) -> float:
        return self.on_time / self.elapsed

    @property
    def mean_batch(self) -> float:
        return len(self.latencies) / self.batches if self.batches else 0.0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def _virtual_clock() -> Iterator[_Clock]:
    clock = _Clock()
    real = scheduler_module.clock
    scheduler_module.clock = clock
    try:
        yield clock
    finally:
        scheduler_module.clock = real


class _Backend:
    """The part of a ``Backend`` that the scheduler uses, recording answers on the virtual clock."""

    def __init__(self, clock: _Clock, result: SimResult, arrived: dict[int, tuple[float, float]]) -> None:
        self._clock = clock
        self._result = result
        self._arrived = arrived  # id(request) -> (arrival, deadline)

    def is_current(self) -> bool:
        return True

    def withdrawn(self, request: Any) -> bool:
        return False

    def resolve(self, requests: Any, values: Any) -> None:
        now = self._clock.now
        for request in requests:
            arrival, deadline = self._arrived.pop(id(request))
            self._result.latencies.append(now - arrival)
            self._result.on_time += now <= deadline

    def fail(self, request: Any, error: BaseException) -> None:
        self._arrived.pop(id(request), None)
        if isinstance(error, RequestTimeoutError):
            self._result.timed_out += 1


def simulate(
    cost: Callable[[int], float],
    arrivals: np.ndarray,
    *,
    slots: int = 1,
    overhead: float = 0.0,
    jitter: float = 0.0,
    timer_resolution: float = 0.0,
    timeout_ms: float | None = None,
    guard: bool = True,
    seed: int = 0,
    **options: Any,
) -> SimResult:
    """Run ``arrivals`` (seconds, ascending) through a scheduler with ``options`` (``Batcher`` options).

    ``guard``: admission and early failure on (off: a plain FIFO); ``jitter``: the
    run time's spread (lognormal sigma); ``timer_resolution``: the grid a sleeping
    worker wakes on (asyncio's selector sleeps whole milliseconds).
    """
    rng = np.random.default_rng(seed)
    settings = Settings.build(is_async=slots > 1, max_concurrent_batches=slots, **options)
    result = SimResult()
    arrived: dict[int, tuple[float, float]] = {}
    with _virtual_clock() as clock:
        scheduler = Scheduler(settings, lambda x: None, padded_cost=False, name="sim")
        scheduler.attach(_Backend(clock, result, arrived))  # type: ignore[arg-type]
        scheduler.guard_deadlines = guard
        running: list[tuple[float, int, Batch, float]] = []  # (ends at, tiebreak, batch, run time)
        free, i, sequence, slept_at = slots, 0, 0, 0.0
        n = len(arrivals)
        while i < n or running or scheduler.pending:
            next_arrival = arrivals[i] if i < n else math.inf
            next_end = running[0][0] if running else math.inf
            next_flush = scheduler.flush_at if free and scheduler.pending else math.inf
            if timer_resolution and next_flush < math.inf:  # a timer fires on the resolution's grid, not before
                next_flush = slept_at + math.ceil((next_flush - slept_at) / timer_resolution) * timer_resolution
            now = min(next_arrival, next_end, max(next_flush, clock.now))
            if now == math.inf:
                break
            clock.now = now
            woken = now >= next_flush  # the worker sleeps until a flush time, a batch ends, or a push wakes it
            while running and running[0][0] <= now:
                _, _, batch, seconds = heapq.heappop(running)
                outcome = Outcome()
                outcome.outputs = list(batch.items)
                outcome.seconds = seconds
                scheduler.finish(batch, outcome)
                free += 1
                woken = True
            while i < n and arrivals[i] <= now:
                # A push wakes the worker when the queue was empty, or when it fills its group.
                woken = woken or not scheduler.pending or scheduler.pending + 1 >= settings.limit
                try:
                    request = scheduler.submit(None, timeout_ms, 0)
                except RequestTimeoutError:
                    result.refused += 1
                else:
                    arrived[id(request)] = (now, request.deadline)
                i += 1
            if not (woken and free):
                continue
            scheduler.expire(now)
            while free:
                batch = scheduler.take(now)
                if batch is None:
                    slept_at = now
                    break
                size = len(batch.requests)
                seconds = cost(size) * (float(rng.lognormal(0.0, jitter)) if jitter else 1.0)
                sequence += 1
                heapq.heappush(running, (now + seconds + overhead, sequence, batch, seconds))
                free -= 1
                result.batches += 1
        result.elapsed = clock.now
    return result
