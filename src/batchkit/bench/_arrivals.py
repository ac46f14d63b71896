"""Open-loop arrival traces for the goodput scenario: Poisson, and bursty with the same mean.

A trace is the planned arrival times of every request, in seconds from its
start, drawn from a seeded generator: every variant (and the optimum) is given
the very same trace.

``bursty`` is an on/off modulated Poisson process: in the first half of each
period requests arrive at twice the mean rate, in the second half none do. Over
whole periods its mean rate is the requested one.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

__all__ = ["PATTERNS", "arrivals", "bursty", "peak_rate", "poisson", "trace_seed"]

PATTERNS = ("poisson", "bursty")


def poisson(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at ``rate`` per second in ``[0, duration_s)``, sorted."""
    if rate <= 0 or duration_s <= 0:
        return np.empty(0)
    expected = rate * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, chunk))
    while times[-1] < duration_s:  # rare: draw more until past the end
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, chunk))])
    return times[times < duration_s]


def bursty(rate: float, duration_s: float, period_s: float, rng: np.random.Generator) -> np.ndarray:
    """On/off Poisson arrivals: ``2 * rate`` in the first half of each ``period_s``, none in the second half."""
    on = period_s / 2.0
    whole = math.floor(duration_s / period_s)
    on_total = whole * on + min(on, duration_s - whole * period_s)
    on_times = poisson(2.0 * rate, on_total, rng)  # time spent "on", mapped back onto the clock below
    cycle = np.floor(on_times / on)
    return cycle * period_s + (on_times - cycle * on)


def trace_seed(pattern: str, rate: float, seed: int = 0) -> int:
    """A seed of its own for each (pattern, rate): the same trace every run, for every variant."""
    return zlib.crc32(f"{pattern}:{rate:.9g}:{seed}".encode())


def arrivals(pattern: str, rate: float, duration_s: float, *, period_s: float, seed: int = 0) -> np.ndarray:
    """The trace of ``pattern`` (``poisson`` or ``bursty``) at a mean ``rate`` over ``duration_s``."""
    rng = np.random.default_rng(trace_seed(pattern, rate, seed))
    if pattern == "poisson":
        return poisson(rate, duration_s, rng)
    if pattern == "bursty":
        return bursty(rate, duration_s, period_s, rng)
    raise ValueError(f"unknown arrival pattern {pattern!r} (choose from {', '.join(PATTERNS)})")


def peak_rate(pattern: str, rate: float) -> float:
    """The highest instantaneous rate of the pattern: what the load generator must keep up with."""
    return 2.0 * rate if pattern == "bursty" else rate
