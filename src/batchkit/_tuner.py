"""Batches in flight, tuned on their own: ``max_concurrent_batches="auto"`` / ``replicas="auto"``.

Running two batches at once pays when the model waits on something other than
the CPU the event loop needs: an async model awaiting a remote call, a
synchronous one that releases the GIL while a device or a native library works.
It costs when the batches only compete for one resource: each takes longer, and
every request waits longer for no gain. Which case a model is in, and how far
it goes, is measured, not guessed.

The tuner hill-climbs on the throughput measured while the batcher is
saturated (requests still queued when a batch finishes; with a free slot and an
empty queue, throughput says nothing about the limit):

* it measures the throughput at the current limit over a window of batches,
  then *probes* one more batch in flight for a window;
* a probe that raises throughput by at least ``GAIN`` is kept, and the next one
  follows at once, twice as far (1, 2, 4... more); one that does not is undone,
  and the next upward probe (of one step) waits twice as many windows as the
  last (up to ``MAX_PATIENCE``), so a model that gains nothing is probed ever
  more rarely;
* after an upward probe that did not pay, it probes one batch *fewer*: kept
  while throughput stays within ``DOWN`` of the higher limit's (and then one
  fewer again), so the limit comes back down from an overshoot, or when more
  no longer pays (fewer batches in flight, each shorter: lower latency at the
  same throughput); a probe down that loses more is undone, and waits longer
  next time too;
* when the throughput at a settled limit moves by more than twice ``GAIN``
  (the model, or the service it calls, changed speed), it probes again at once,
  patience forgotten.

So the limit settles where one more batch in flight no longer buys throughput,
and at saturation more throughput is lower latency too (a request waits for the
work queued ahead of it). Windows are counted in batches (``WINDOW`` per batch
in flight, and at least ``MIN_SECONDS``), so the decision needs no clock of its
own and works at any speed.
"""

from __future__ import annotations

__all__ = ["ConcurrencyTuner"]


class ConcurrencyTuner:
    """Hill-climbs the number of batches in flight, between 1 and ``maximum``, on saturated throughput."""

    __slots__ = (
        "_base_rate",
        "_batches",
        "_direction",
        "_momentum",
        "_patience",
        "_rows",
        "_started",
        "_step",
        "_wait",
        "limit",
        "maximum",
        "probes",
    )

    WINDOW = 12  # batches per window, per batch in flight
    MIN_SECONDS = 0.1
    GAIN = 0.1  # a probe up must raise throughput by 10 % to be kept (less is within the noise)
    DOWN = 0.05  # a probe down is kept if throughput stays within 5 % of the higher limit's
    MAX_PATIENCE = 32  # windows between probes, at most

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = 1
        self.probes = 0  # probes made (for stats and tests)
        self._base_rate: float | None = None  # rows/s at the settled limit
        self._direction = 0  # the probe in progress: +1, -1, or 0 (measuring the settled limit)
        self._momentum = 0  # the direction of the last probe that was kept: the next goes the same way
        self._step = 1  # the size of the next upward probe: doubles while probes pay
        self._patience = 1  # windows to wait before the next upward probe: doubles each time one fails
        self._wait = 0
        self._rows = 0
        self._batches = 0
        self._started: float | None = None

    def observe(self, rows: int, now: float, *, saturated: bool) -> None:
        """A batch of ``rows`` finished at ``now``; ``saturated``: requests were still queued."""
        if not saturated:
            self._started = None  # demand below capacity: this window says nothing
            self._rows = self._batches = 0
            return
        if self._started is None:
            self._started = now
            return
        self._rows += rows
        self._batches += 1
        elapsed = now - self._started
        if self._batches < self.WINDOW * self.limit or elapsed < self.MIN_SECONDS:
            return
        rate = self._rows / elapsed
        self._started, self._rows, self._batches = now, 0, 0
        self._decide(rate)

    def _decide(self, rate: float) -> None:
        base = self._base_rate
        if self._direction == 0:  # a window at the settled limit
            if base is not None and abs(rate - base) > 2 * self.GAIN * base:
                # The model (or what it waits on) changed speed: look again at once, fewer first if slower.
                self._patience, self._step = 1, 1
                self._settle(rate, momentum=-1 if rate < base else +1)
                return
            self._base_rate = rate if base is None else 0.5 * (base + rate)
            self._wait += 1
            if self._momentum < 0 and self.limit > 1:
                self._probe(-1)  # after a probe up that did not pay, or one down that did: is one fewer as good?
            elif self._momentum > 0 and self.limit < self.maximum:
                self._probe(min(self._step, self.maximum - self.limit))
            elif self._wait >= self._patience:
                if self.limit < self.maximum:
                    self._probe(1)
                elif self.limit > 1:
                    self._probe(-1)
            return
        assert base is not None
        if self._direction > 0:
            if rate >= base * (1 + self.GAIN):
                self._step *= 2
                self._patience = 1
                self._settle(rate, momentum=+1)  # it paid: climb on at once, in longer strides
                return
            self.limit -= self._direction
            self._step = 1
            self._patience = min(self.MAX_PATIENCE, 2 * self._patience)
            self._settle(base, momentum=-1)  # the stride that got here may have gone past the best
            return
        self._step = 1
        if rate >= base * (1 - self.DOWN):
            # As good with fewer: keep fewer, try fewer still. The reference stays the higher
            # limit's rate, so steps down never lose more than DOWN in all.
            self._settle(max(base, rate), momentum=-1)
        else:
            self.limit += 1
            self._patience = min(self.MAX_PATIENCE, 2 * self._patience)
            self._settle(base, momentum=0)

    def _probe(self, direction: int) -> None:
        self.probes += 1
        self._direction = direction
        self.limit += direction

    def _settle(self, rate: float, *, momentum: int) -> None:
        self._direction = 0
        self._momentum = momentum
        self._base_rate = rate
        self._wait = 0
