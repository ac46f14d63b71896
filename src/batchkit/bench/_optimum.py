"""The most requests any batcher could answer within their deadlines, given a trace and a cost curve.

The server is the model: one batch at a time, a batch of ``m`` requests costs
``cost[m - 1]`` seconds (measured), a batch starts once its last member has
arrived and the previous batch is done, and request ``i`` counts when its batch
ends by ``arrival[i] + deadline``. ``optimum`` is the exact maximum over every
schedule, for a scheduler that knows all arrivals in advance.

Why it is exact, in three steps (all deadlines are arrival + the same ``D``):

1. *Served requests can go in arrival order.* If an earlier arrival ``u`` is
   served in a later batch than ``v``, swap them: ``u`` was there before ``v``
   was, and now finishes earlier; ``v`` finishes when ``u`` did, before
   ``u``'s deadline, which is before ``v``'s. Batch sizes, hence times, are unchanged.
2. *Each batch is a run of consecutive arrivals.* A batch whose last member is
   ``r`` and size ``m`` may as well hold ``r - m + 1 .. r``: all have arrived by
   ``r``, and the earliest deadline among them is no earlier. Requests skipped
   between batches are dropped (they could only be served out of order).
3. *A dynamic programme over the last member served.* For each prefix, the
   Pareto front of (requests served, time the server is free) is kept: a state
   that serves fewer and frees the server later is never better. One more rule
   prunes exactly: a state serving ``k`` more requests than another dominates it
   when ``k >= capacity * (its free time - the other's) + max batch``, because
   from the later state one can follow any schedule of the earlier one and lose
   only the batches that start before it is free.

``interval_bound`` is a cheaper upper bound (no dynamic programme over states),
used by the tests as an independent check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CostCurve", "interval_bound", "optimum"]

_EPS = 1e-9
"""Seconds of slack in deadline comparisons (float rounding of arrival + deadline)."""


@dataclass(frozen=True)
class CostCurve:
    """Measured run time of a batch at some sizes, the cost of every size up to the largest derived from it."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError("a cost curve needs as many times as sizes, and at least one")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"cost curve sizes must be increasing positive integers, not {self.sizes}")
        if not all(s > 0 and np.isfinite(s) for s in self.seconds):
            raise ValueError(f"cost curve times must be positive and finite, not {self.seconds}")

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def per_size(self) -> np.ndarray:
        """Seconds for a batch of 1, 2, ..., max_batch_size requests.

        Linear between the measured sizes (constant below the smallest); then a
        batch never costs more than a larger one, since it could be padded to it.
        """
        sizes = np.arange(1, self.max_batch_size + 1)
        interpolated = np.interp(sizes, self.sizes, self.seconds)
        return np.minimum.accumulate(interpolated[::-1])[::-1]

    @property
    def capacity(self) -> float:
        """Requests per second at the best batch size: the most the model can serve."""
        cost = self.per_size()
        return float(np.max(np.arange(1, len(cost) + 1) / cost))

    def best_size(self) -> int:
        cost = self.per_size()
        return int(np.argmax(np.arange(1, len(cost) + 1) / cost)) + 1


def _prune(served: np.ndarray, free: np.ndarray, capacity: float, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front (served up, free time up) of the states, without those dominated by the capacity rule."""
    low = int(served.min())
    earliest = np.full(int(served.max()) - low + 1, np.inf)
    np.minimum.at(earliest, served - low, free)  # the earliest free time for each number served
    later_best = np.minimum.accumulate(earliest[::-1])[::-1]  # ... for that number served or more
    keep = earliest < np.concatenate((later_best[1:], [np.inf]))
    served = np.flatnonzero(keep) + low
    free = earliest[keep]
    if len(served) > 1:
        score = served - capacity * free
        best_after = np.maximum.accumulate(score[::-1])[::-1]
        dominated = np.concatenate((best_after[1:] >= score[:-1] + max_batch, [False]))
        served, free = served[~dominated], free[~dominated]
    return served, free


def optimum(arrivals: Sequence[float] | np.ndarray, deadline_s: float, cost: Sequence[float] | np.ndarray) -> int:
    """The most requests of ``arrivals`` any one-batch-at-a-time server can answer within ``deadline_s``.

    ``cost[m - 1]`` is the run time of a batch of ``m`` (``len(cost)`` is the
    largest batch allowed). Exact (see the module docstring); about ``N``
    steps, each a few array operations over the last ``B`` fronts.
    """
    times = np.sort(np.asarray(arrivals, dtype=float))
    cost = np.asarray(cost, dtype=float)
    count, max_batch = len(times), len(cost)
    if count == 0:
        return 0
    capacity = float(np.max(np.arange(1, max_batch + 1) / cost))
    # The fronts P[0], P[1], ... one after the other in flat arrays; P[l] holds the states whose last served
    # request is before l, with its first request (l) and that request's deadline alongside.
    states = _Fronts()
    states.append(np.zeros(1, dtype=np.int64), np.array([times[0]]), 0, times[0] + deadline_s)
    for r in range(count):
        served, free, first, due = states.since(max(0, r - max_batch + 1))
        sizes = r - first + 1  # a batch of first..r after each state
        done = np.maximum(free, times[r]) + cost[sizes - 1]
        ok = done <= due + _EPS
        served = np.concatenate((states.last_served, served[ok] + sizes[ok]))
        free = np.concatenate((states.last_free, done[ok]))
        if r + 1 < count:
            free = np.maximum(free, times[r + 1])  # the next batch cannot start before its requests arrive
            states.append(*_prune(served, free, capacity, max_batch), r + 1, times[r + 1] + deadline_s)
    return int(served.max())


class _Fronts:
    """The fronts of the dynamic programme in growing flat arrays, so the last ``B`` of them are one slice."""

    def __init__(self) -> None:
        self._served = np.empty(1024, dtype=np.int64)
        self._free = np.empty(1024)
        self._first = np.empty(1024, dtype=np.int64)
        self._due = np.empty(1024)
        self._starts: list[int] = []
        self._end = 0

    def append(self, served: np.ndarray, free: np.ndarray, first: int, due: float) -> None:
        start, end = self._end, self._end + len(served)
        if end > len(self._served):
            grow = max(end, 2 * len(self._served))
            for name in ("_served", "_free", "_first", "_due"):
                old = getattr(self, name)
                new = np.empty(grow, dtype=old.dtype)
                new[:start] = old[:start]
                setattr(self, name, new)
        self._served[start:end] = served
        self._free[start:end] = free
        self._first[start:end] = first
        self._due[start:end] = due
        self._starts.append(start)
        self._end = end

    def since(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The states of the fronts from ``P[index]`` to the last one: served, free time, first request, due."""
        window = slice(self._starts[index], self._end)
        return self._served[window], self._free[window], self._first[window], self._due[window]

    @property
    def last_served(self) -> np.ndarray:
        return self._served[self._starts[-1] : self._end]

    @property
    def last_free(self) -> np.ndarray:
        return self._free[self._starts[-1] : self._end]


def interval_bound(arrivals: Sequence[float] | np.ndarray, deadline_s: float, capacity: float, step_s: float) -> int:
    """An upper bound of ``optimum``: cut time into intervals, at most capacity x length served inside each.

    Requests that arrive and fall due within one interval ``[t0, t1]`` are
    served by batches inside it, so at most ``capacity * (t1 - t0)`` of them;
    each other request counts as served. The best cut points on a grid of
    ``step_s`` are found by a dynamic programme. Loose, but independent of ``optimum``.
    """
    times = np.sort(np.asarray(arrivals, dtype=float))
    if len(times) == 0:
        return 0
    grid = np.arange(times[0], times[-1] + deadline_s + 2 * step_s, step_s)
    before = np.searchsorted(times, grid, side="left")  # arrivals before each grid point
    upto = np.searchsorted(times, grid - deadline_s, side="right")  # arrivals due by each grid point
    best = np.zeros(len(grid))
    for end in range(1, len(grid)):
        starts = np.arange(end)
        inside = np.maximum(0, upto[end] - before[starts])
        rest = (before[end] - before[starts]) - inside
        limit = np.floor(capacity * (grid[end] - grid[starts]) + _EPS)
        best[end] = np.min(best[starts] + np.minimum(inside, limit) + rest)
    return int(best[-1]) + int(len(times) - before[-1])
