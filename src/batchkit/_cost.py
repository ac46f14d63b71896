"""The cost model: how long a batch of ``n`` takes to run, learned online from the batches that ran.

Every time the scheduler predicts a time (how long to wait for batch-mates, when
to flush for a deadline, whether a request can still make its deadline, whether
to admit it at all), it asks a ``CostModel``: ``expected(n)`` seconds for a batch
of ``n``, with its ``spread(n)`` (a standard deviation).

Sizes are grouped into log-spaced buckets, two per octave (1, 2, 3, 4-5, 6-7,
8-11, 12-15, 16-23, ...). Each bucket keeps a fading mean and variance of the run
times and the mean size of the batches that fell in it (each new batch weighs
``ALPHA``, or an equal share while the bucket has fewer than ``1 / ALPHA``), so a
model that warms up or a device that gets busier is followed within a few dozen
batches (one whose bucket had no batch for ``STALE_AFTER`` starts it afresh);
a run far above its bucket's mean (a stall of the machine) counts as
four standard deviations (or half the mean) above it, so one outlier cannot
make the model refuse work. A size whose bucket has no batch yet is read off the line between the
nearest buckets that have one on either side, or extended from the nearest one
with the slope of a least-squares line ``a + b * n`` fitted to all recent
batches. Costs per sample that fall with the batch size (a CPU model, a GPU
kernel with a launch cost) are followed bucket by bucket, which one straight
line cannot do. An update and a query are O(1) and allocate nothing but floats.

``CostBook`` holds one model for all of a batcher's batches and one per group
(collate key, with its ``batch_key``), for the 16 groups used most recently:
where groups differ in shape (sequence buckets padded to different lengths),
each group's batches cost what its own shape costs. A group with fewer than
``WARMUP`` batches of its own is predicted by the batcher-wide model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from statistics import NormalDist

__all__ = ["STALE_AFTER", "WARMUP", "CostBook", "CostModel", "bucket_of"]

_BUCKETS = 64  # two per octave: sizes up to 2**31 each get their own; larger ones share the last
WARMUP = 3
"""Batches a model needs before its predictions are used to wait, refuse or fail anything."""
STALE_AFTER = 1.0
"""Seconds after a model's last batch when its predictions are no longer acted on (and a size's are replaced)."""


def bucket_of(size: int) -> int:
    """The bucket of a batch size: two per octave (1 → 0, 2 → 2, 3 → 3, 4-5 → 4, 6-7 → 5, 8-11 → 6, ...)."""
    bits = size.bit_length()
    if bits < 2:
        return 0
    return min(_BUCKETS - 1, 2 * (bits - 1) + ((size >> (bits - 2)) & 1))


class CostModel:
    """Expected run time of a batch by its size, with its spread, from recent batches."""

    __slots__ = (
        "_count",
        "_mean",
        "_s0",
        "_s1",
        "_s2",
        "_seen",
        "_size",
        "_t0",
        "_t1",
        "_var",
        "_when",
        "batches",
        "last",
    )

    ALPHA = 0.1  # a new batch's weight in its bucket: about the last 10-20 batches of a size count
    DECAY = 0.95  # the linear fit's weight of the past per new batch: about the last 20 batches count

    def __init__(self) -> None:
        self._count = [0] * _BUCKETS
        self._size = [0.0] * _BUCKETS
        self._mean = [0.0] * _BUCKETS
        self._var = [0.0] * _BUCKETS
        self._when = [0.0] * _BUCKETS  # when each bucket last had a batch
        self._seen = 0  # bit i set: bucket i has a batch
        self.last = -math.inf  # when the last batch was observed
        self._s0 = self._s1 = self._s2 = self._t0 = self._t1 = 0.0
        self.batches = 0

    def observe(self, size: int, seconds: float, now: float = 0.0) -> None:
        """Learn from one batch of ``size`` that ran for ``seconds``, observed at clock time ``now``."""
        i = bucket_of(size)
        count = self._count[i]
        if now - self._when[i] > STALE_AFTER:
            count = 0  # what this size cost a while ago says little now: start its mean afresh
        self._when[i] = self.last = now
        mean = self._mean[i]
        if count >= WARMUP:  # one stall (a GC pause, a busy machine) moves the mean by a bounded step
            seconds = min(seconds, mean + max(4.0 * math.sqrt(self._var[i]), 0.5 * mean))
        if count < 10:  # 1 / ALPHA
            count = self._count[i] = count + 1
            alpha = 1.0 / count
        else:
            alpha = self.ALPHA
        diff = seconds - mean
        step = alpha * diff
        self._mean[i] = mean + step
        self._var[i] = (1.0 - alpha) * (self._var[i] + diff * step)
        self._size[i] += alpha * (size - self._size[i])
        self._seen |= 1 << i
        d = self.DECAY
        self._s0 = d * self._s0 + 1
        self._s1 = d * self._s1 + size
        self._s2 = d * self._s2 + size * size
        self._t0 = d * self._t0 + seconds
        self._t1 = d * self._t1 + size * seconds
        self.batches += 1

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)`` of the least-squares line ``seconds = a + b * size`` over recent batches.

        Cautious where the data say little: with batches all of one size there is
        no telling fixed from per-request cost, so it is all counted per request
        (``a = 0``); and the fixed cost is never taken to exceed what the smallest
        batches seen took.
        """
        if not self._s0:
            return 0.0, 0.0
        spread = self._s0 * self._s2 - self._s1 * self._s1
        if spread <= 1e-9 * self._s0 * self._s0:
            return 0.0, self._t0 / self._s1 if self._s1 else 0.0
        b = max(0.0, (self._s0 * self._t1 - self._s1 * self._t0) / spread)
        a = max(0.0, (self._t0 - b * self._s1) / self._s0)
        smallest = (self._seen & -self._seen).bit_length() - 1
        return min(a, self._mean[smallest]), b

    def expected(self, size: int) -> float:
        """Expected seconds for a batch of ``size`` (0 before the first batch)."""
        seen = self._seen
        if not seen:
            return 0.0
        i = bucket_of(size)
        slope = self.coefficients()[1]
        if seen >> i & 1:
            return max(0.0, self._mean[i] + slope * (size - self._size[i]))
        below = seen & ((1 << i) - 1)
        above = seen >> (i + 1)
        lo = below.bit_length() - 1
        if above:
            hi = i + (above & -above).bit_length()
            hi_size, hi_mean = self._size[hi], self._mean[hi]
            if lo >= 0:  # between two seen buckets: on the line joining them
                lo_size, lo_mean = self._size[lo], self._mean[lo]
                return lo_mean + (hi_mean - lo_mean) * (size - lo_size) / (hi_size - lo_size)
            # Below every size seen: down the fitted slope, but never below a cost proportional to size.
            return max(hi_mean - slope * (hi_size - size), hi_mean * size / hi_size)
        return self._mean[lo] + slope * (size - self._size[lo])  # above every size seen: up the slope

    def spread(self, size: int) -> float:
        """Standard deviation of the run time of a batch of ``size`` (its bucket's, or its neighbours')."""
        seen = self._seen
        if not seen:
            return 0.0
        i = bucket_of(size)
        if seen >> i & 1 and self._count[i] > 1:
            return math.sqrt(self._var[i])
        # No spread of its own yet: the larger relative spread of the nearest buckets that have one.
        below = seen & ((1 << i) - 1)
        above = seen >> (i + 1)
        relative = 0.0
        for j in (below.bit_length() - 1, i + (above & -above).bit_length() if above else -1):
            if j >= 0 and self._count[j] > 1 and self._mean[j] > 0:
                relative = max(relative, math.sqrt(self._var[j]) / self._mean[j])
        return relative * self.expected(size)

    def quantile(self, size: int, q: float) -> float:
        """The ``q`` quantile of a batch of ``size``'s run time (a normal approximation, at least 0)."""
        return max(0.0, self.expected(size) + NormalDist().inv_cdf(q) * self.spread(size))

    def fresh(self, size: int, now: float) -> bool:
        """Whether the estimate for ``size`` is not an old one: its bucket had a batch within
        ``STALE_AFTER`` of ``now``, or never had one (it is then read off the sizes around it)."""
        i = bucket_of(size)
        return not self._seen >> i & 1 or now - self._when[i] <= STALE_AFTER

    def knows(self) -> bool:
        """Whether enough batches ran for predictions to act on (``WARMUP``)."""
        return self.batches >= WARMUP

    def current(self, now: float) -> bool:
        """Whether predictions may refuse or fail requests at ``now``: warmed up, and a batch ran lately.

        A prediction that every request is hopeless stops the batches that would
        correct it; after ``STALE_AFTER`` without a batch it is not acted on, so
        the next request runs and its batch replaces the stale estimate.
        """
        return self.batches >= WARMUP and now - self.last <= STALE_AFTER


class CostBook:
    """A batcher's cost models: one for all its batches, and one per recently used group."""

    __slots__ = ("_groups", "all")

    GROUPS = 16

    def __init__(self) -> None:
        self.all = CostModel()
        self._groups: OrderedDict[Hashable, CostModel] = OrderedDict()

    def observe(self, group: Hashable, size: int, seconds: float, now: float = 0.0) -> None:
        """Learn from one batch of ``group`` (observed at clock time ``now``)."""
        self.all.observe(size, seconds, now)
        groups = self._groups
        model = groups.get(group)
        if model is None:
            if len(groups) >= self.GROUPS:
                groups.popitem(last=False)
            model = groups[group] = CostModel()
        else:
            groups.move_to_end(group)
        model.observe(size, seconds, now)

    def model(self, group: Hashable) -> CostModel:
        """The model that predicts ``group``'s batches: its own once warm, else the batcher-wide one."""
        model = self._groups.get(group)
        return model if model is not None and model.batches >= WARMUP else self.all

    def own(self, group: Hashable) -> CostModel | None:
        """``group``'s own model once warm, else None: what may refuse or fail its requests.

        The batcher-wide model predicts a group it has no data on (to flush in
        time), but does not refuse it: another group's cost says nothing sure
        about this one, and a group refused on it would never run to learn its own.
        """
        model = self._groups.get(group)
        return model if model is not None and model.batches >= WARMUP else None
