"""``batchkit bench --scenario goodput``: the traces, the exact optimum, and the scenario end to end.

The optimum is checked on traces small enough to work out by hand, and against
a brute force over every schedule on random small traces. The end-to-end run
uses the tiny model for a fraction of a second: it checks the plumbing and that
every request is accounted for, never how fast anything is.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import numpy as np
import pytest

from batchkit.bench._arrivals import PATTERNS, arrivals, bursty, peak_rate, poisson
from batchkit.bench._optimum import CostCurve, interval_bound, optimum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- the optimum on traces worked out by hand ---------------------------------------------------


def test_a_full_batch_goes_and_the_request_that_cannot_make_it_is_dropped() -> None:
    # Three arrive at once; two fit in a batch (1 s); the third would end at 2 s, past its deadline of 1.5 s.
    assert optimum([0.0, 0.0, 0.0], 1.5, [1.0, 1.0]) == 2


def test_waiting_for_a_batch_mate_beats_starting_at_once() -> None:
    # Starting A alone at 0 ends at 1; B+C then run 1..2.2; D alone 2.2..3.2 misses 3.1: 3 answered.
    # Waiting for B (A+B at 0.5, ends 1.7), then C+D at 1.7 (ends 2.9, C is due at 3.0): all 4.
    assert optimum([0.0, 0.5, 1.0, 1.1], 2.0, [1.0, 1.2]) == 4


def test_dropping_the_oldest_can_pay() -> None:
    # A alone at 0 ends at 1, then B+C end at 2 (due 1.5): 1 answered. Dropping A, B+C at 0.5 end at 1.5: 2.
    assert optimum([0.0, 0.5, 0.5], 1.0, [1.0, 1.0]) == 2


def test_sparse_arrivals_are_all_answered_and_hopeless_ones_never() -> None:
    assert optimum([0.0, 10.0, 20.0], 1.0, [0.5]) == 3
    assert optimum([0.0, 10.0, 20.0], 0.4, [0.5]) == 0  # a batch of one takes longer than the deadline
    assert optimum([], 1.0, [0.5]) == 0


def test_overload_is_served_at_capacity() -> None:
    # 100 requests arrive at once, a batch of 4 takes 1 s, deadline 10 s: 10 batches of 4 fit in time.
    assert optimum([0.0] * 100, 10.0, [0.4, 0.6, 0.8, 1.0]) == 40


def _set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]
        yield [[first], *partition]


def _brute_force(times: list[float], deadline: float, cost: list[float]) -> int:
    """The most requests answered in time over every subset, every split into batches, every batch order."""
    for count in range(len(times), 0, -1):
        for subset in itertools.combinations(range(len(times)), count):
            for partition in _set_partitions(list(subset)):
                if any(len(batch) > len(cost) for batch in partition):
                    continue
                for order in itertools.permutations(partition):
                    free = -np.inf
                    for batch in order:
                        free = max(free, *(times[i] for i in batch)) + cost[len(batch) - 1]
                        if any(free > times[i] + deadline + 1e-9 for i in batch):
                            break
                    else:
                        return count
    return 0


def test_the_optimum_matches_a_brute_force_over_every_schedule() -> None:
    rng = random.Random(14)
    for _ in range(150):
        times = sorted(round(rng.uniform(0.0, 2.0), 1) for _ in range(rng.randint(1, 6)))
        cost = [round(rng.uniform(0.2, 1.5), 1) for _ in range(rng.randint(1, 4))]  # not even monotone
        deadline = round(rng.uniform(0.3, 3.0), 1)
        assert optimum(times, deadline, cost) == _brute_force(times, deadline, cost), (times, deadline, cost)


def test_the_interval_bound_is_never_below_the_optimum() -> None:
    curve = CostCurve((1, 8, 32), (0.001, 0.002, 0.005))
    cost = curve.per_size()
    deadline = 4 * float(cost[-1])
    for pattern in PATTERNS:
        for load in (0.5, 1.0, 1.5):
            times = arrivals(pattern, load * curve.capacity, 0.2, period_s=8 * deadline)
            best = optimum(times, deadline, cost)
            bound = interval_bound(times, deadline, curve.capacity, deadline / 8)
            assert best <= bound <= len(times), (pattern, load)
            if load <= 0.5 and pattern == "poisson":
                assert best == len(times)  # half the capacity, a deadline of 4 full batches: everyone in time
            if load >= 1.5:
                assert best < len(times)


# -- the cost curve -----------------------------------------------------------------------------


def test_cost_curve_interpolates_pads_and_finds_the_capacity() -> None:
    curve = CostCurve((1, 2, 4, 8), (1.0, 3.0, 2.0, 4.0))
    cost = curve.per_size()
    # Linear between measured sizes; a batch of 2 or 3 could be padded to 4 (2.0), so it costs no more.
    assert cost.tolist() == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.5, 3.0, 3.5, 4.0])
    assert curve.capacity == pytest.approx(2.0)  # 4 requests in 2.0 s, and 8 in 4.0 s
    assert curve.best_size() == 4
    assert curve.max_batch_size == 8


@pytest.mark.parametrize(
    ("sizes", "seconds"), [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 1.0)), ((0, 1), (1.0, 1.0)), ((1,), (0.0,))]
)
def test_a_bad_cost_curve_is_refused(sizes: tuple[int, ...], seconds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="cost curve"):
        CostCurve(sizes, seconds)


def test_curve_sizes_reach_the_largest_batch() -> None:
    from batchkit.bench._goodput import curve_sizes

    assert curve_sizes(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert curve_sizes(10) == [1, 2, 3, 4, 6, 8, 10]
    assert curve_sizes(1) == [1]


# -- arrival traces -----------------------------------------------------------------------------


def test_traces_are_seeded_sorted_and_inside_the_duration() -> None:
    for pattern in PATTERNS:
        first = arrivals(pattern, 500.0, 2.0, period_s=0.1)
        again = arrivals(pattern, 500.0, 2.0, period_s=0.1)
        assert np.array_equal(first, again)
        assert not np.array_equal(first, arrivals(pattern, 500.0, 2.0, period_s=0.1, seed=1))
        assert np.all(np.diff(first) >= 0)
        assert first.min() >= 0.0
        assert first.max() < 2.0
    other_rate = arrivals("poisson", 501.0, 2.0, period_s=0.1)
    assert not np.array_equal(arrivals("poisson", 500.0, 2.0, period_s=0.1), other_rate)
    with pytest.raises(ValueError, match="unknown arrival pattern"):
        arrivals("steady", 500.0, 2.0, period_s=0.1)


def test_poisson_and_bursty_have_the_requested_mean_rate() -> None:
    rate, duration = 2000.0, 10.0
    for pattern in PATTERNS:
        times = arrivals(pattern, rate, duration, period_s=0.2)
        assert len(times) / duration == pytest.approx(rate, rel=0.03), pattern


def test_bursty_arrives_only_in_the_first_half_of_each_period_and_is_burstier() -> None:
    rng = np.random.default_rng(3)
    period = 0.2
    times = bursty(1000.0, 10.0, period, rng)
    assert np.all(times % period < period / 2 + 1e-12)
    # Counts per half-period: Poisson's variance is its mean; on/off's is far larger.
    windows = np.arange(0.0, 10.0 + 1e-9, period / 2)
    bursty_counts = np.histogram(times, windows)[0]
    poisson_counts = np.histogram(poisson(1000.0, 10.0, rng), windows)[0]
    assert poisson_counts.var() < 2 * poisson_counts.mean()
    assert bursty_counts.var() > 10 * bursty_counts.mean()
    assert peak_rate("bursty", 1000.0) == 2000.0
    assert peak_rate("poisson", 1000.0) == 1000.0


def test_a_partial_period_keeps_the_on_off_shape() -> None:
    times = bursty(1000.0, 0.25, 0.2, np.random.default_rng(0))  # one period and a quarter: on, off, on
    assert times.max() < 0.25
    assert not np.any((times >= 0.1) & (times < 0.2))
