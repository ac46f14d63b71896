"""``batchkit bench --scenario goodput``: the traces, the exact optimum, and the scenario end to end.

The optimum is checked on traces small enough to work out by hand, and against
a brute force over every schedule on random small traces. The end-to-end run
uses the tiny model for a fraction of a second: it checks the plumbing and that
every request is accounted for, never how fast anything is.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import importlib.util
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit.bench._arrivals import PATTERNS, arrivals, bursty, peak_rate, poisson
from batchkit.bench._optimum import CostCurve, interval_bound, optimum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

bench_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module in ("torch", "rich", "matplotlib")),
    reason="needs torch and the bench extra",
)


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


def test_model_speed_compares_the_calls_with_the_cost_curve() -> None:
    from batchkit.bench._goodput import model_speed

    cost = np.array([1.0, 1.5, 2.0])
    assert model_speed([(0.0, 1.0, 1), (5.0, 7.0, 3)], cost) == pytest.approx(1.0)  # as fast as measured
    assert model_speed([(0.0, 2.0, 1), (5.0, 9.0, 3)], cost) == pytest.approx(0.5)  # twice as slow
    assert model_speed([], cost) is None


@bench_extras
def test_cost_curve_is_measured_at_every_size_for_the_optimum_and_for_the_model_alone() -> None:
    from batchkit.bench._goodput import measure_cost_curve
    from batchkit.bench._model import MODELS, Model

    model = Model(MODELS["tiny"], "cpu")
    whole, alone = measure_cost_curve(model, 6, rounds=3)
    assert whole.sizes == alone.sizes == (1, 2, 3, 4, 6)
    assert all(s > 0 for s in whole.seconds + alone.seconds)
    assert model.run_log() == []  # the measurement leaves no calls behind for the cells to count


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


# -- replaying a trace: every request ends in exactly one bucket ---------------------------------


@pytest.fixture
def _collect_leftovers() -> Iterator[None]:
    """A benchmark run can leave an unclosed event loop behind (see test_bench): collect it here."""
    yield
    gc.collect()


@bench_extras
@pytest.mark.usefixtures("_collect_leftovers")
def test_replay_puts_every_request_in_one_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchkit
    from batchkit.bench import _replay
    from batchkit.bench._model import MODELS, Model

    monkeypatch.setattr(_replay, "GRACE_S", 0.01)
    model = Model(MODELS["tiny"], "cpu")
    inputs = _replay.Inputs.make(model)
    never = asyncio.Event()

    async def send(x: Any, seconds_left: float | None) -> Any:
        index = next(i for i, item in enumerate(inputs.items) if item is x)
        kind = index % 6
        if kind == 1:
            raise batchkit.QueueFullError("full")
        if kind == 2:
            raise batchkit.RequestTimeoutError("too late")
        if kind == 3:
            raise RuntimeError("model bug")
        if kind == 4:
            return model.run_list([inputs.items[(index + 1) % len(inputs.items)]])[0]  # someone else's answer
        if kind == 5:
            await never.wait()  # never answered
        assert seconds_left is not None
        assert seconds_left > 0
        return model.run_list([x])[0]

    times = np.linspace(0.0, 0.02, 12)  # requests 0..11: two of each kind
    out = asyncio.run(
        _replay.replay(send, model, inputs, times, deadline_s=0.3, duration_s=0.02, warmup_s=0.0, warm_clients=1)
    )
    assert (out.good, out.refused, out.timed_out, out.errors, out.wrong, out.unanswered) == (2, 2, 2, 2, 2, 2)
    assert out.late == 0
    assert out.total == len(times)
    assert len(out.latencies) == 4  # the good and the wrong answers


# -- the scenario end to end --------------------------------------------------------------------

GOODPUT = ["--scenario", "goodput", "--model", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "0.05"]


@bench_extras
@pytest.mark.usefixtures("_collect_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_goodput_scenario_writes_table_csv_json_and_plot(tmp_path: Path) -> None:
    from batchkit.bench.__main__ import main

    argv = [
        *GOODPUT,
        "--duration", "0.2", "--rates", "300", "--deadline-ms", "100", "--variants", "batchkit,batchkit-deadline,floor",
        "--settings", "1:8,auto:8", "--reference", "1:8", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["scenario"] == "goodput"
    assert document["settings"]["deadline_ms"] == 100.0
    assert document["settings"]["capacity_rps"] > 0
    assert document["model"]["cost_curve"]["sizes"] == [1, 2, 3, 4, 6, 8]
    references = {ref["load"]: ref for ref in document["optimum"]}
    assert set(references) == {"poisson 300/s", "bursty 300/s"}
    for ref in references.values():
        assert ref["speed"] > 0  # the model ran in the cells, at some speed against its curve
        assert 0 < ref["optimum_at_speed_rps"] <= ref["offered_rps"]
    cells = document["results"]
    assert {c["variant"] for c in cells} == {
        "batchkit[w=1,b=8]", "batchkit[w=auto,b=8]", "batchkit-deadline[w=1,b=8]", "batchkit-deadline[w=auto,b=8]",
        "floor[w=1,b=8]",
    }  # fmt: skip
    assert len(cells) == 5 * 2
    for cell in cells:
        ref = references[cell["load"]]
        assert ref["requests"] > 0
        assert cell["requests"] == ref["requests"]
        outcomes = ("good", "late", "refused", "timed_out", "errors", "wrong", "unanswered")
        assert sum(cell[key] for key in outcomes) == cell["requests"], cell
        assert cell["wrong"] == 0, cell
        assert cell["errors"] == 0, cell
        assert cell["good"] <= ref["optimum"] <= ref["requests"], cell  # the optimum bounds every variant
        assert cell["goodput_rps"] <= cell["optimum_rps"]
        assert cell["of_optimum"] is None or 0.0 <= cell["of_optimum"] <= 1.0
    for family in ("batchkit", "floor"):  # not told the deadline: nothing refused or given up on
        assert all(c["timed_out"] == 0 for c in cells if c["family"] == family)
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(cells)
    assert {row["variant"] for row in rows} == {c["variant"] for c in cells}
    text = (tmp_path / "results.md").read_text()
    assert "| **optimum (exact)** | **poisson 300/s** |" in text
    assert "| floor[w=1,b=8] | bursty 300/s |" in text
    assert "best fixed wait measured" in text
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_goodput_plan_defaults_and_quick() -> None:
    from batchkit.bench.__main__ import make_plan

    plan = make_plan(["--scenario", "goodput"])
    assert plan.open_fractions == (0.5, 0.8, 1.0, 1.1, 1.5)
    assert plan.patterns == ("poisson", "bursty")
    assert [s.label for s in plan.settings] == ["w=2,b=64", "w=auto,b=64"]
    assert plan.reference.label == "w=2,b=64"
    assert plan.deadline_ms is None
    quick = make_plan(["--scenario", "goodput", "--quick", "--patterns", "bursty", "--deadline-ms", "20"])
    assert quick.duration_s < plan.duration_s
    assert quick.open_fractions == plan.open_fractions
    assert (quick.patterns, quick.deadline_ms) == (("bursty",), 20.0)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--scenario", "goodput", "--closed", "8"], "--closed is not for --scenario goodput"),
        (["--scenario", "goodput", "--variants", "step"], "has no variants step"),
        (["--scenario", "goodput", "--open", "", "--rates", ""], "no load to measure"),
        (["--scenario", "goodput", "--patterns", "steady"], "unknown pattern 'steady'"),
        (["--scenario", "goodput", "--deadline-ms", "0"], "not a positive number"),
        (["--patterns", "poisson"], "--patterns is for --scenario goodput"),
        (["--scenario", "generate", "--deadline-ms", "5"], "--deadline-ms is for --scenario goodput"),
        (["--variants", "batchkit-deadline"], "are for --scenario goodput"),
    ],
)
def test_goodput_options_are_checked(argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    from batchkit.bench.__main__ import make_plan

    with pytest.raises(SystemExit) as exited:
        make_plan(argv)
    assert exited.value.code == 2
    assert reason in capsys.readouterr().err.strip().splitlines()[-1]


# -- the report ---------------------------------------------------------------------------------


def _cell(variant: str, load: str, fraction: float, **fields: Any) -> Any:
    from batchkit.bench._goodput import GoodputCell

    family, _, setting = variant.partition("[")
    values: dict[str, Any] = {
        "variant": variant, "family": family, "max_wait_ms": "auto" if "w=auto" in setting else 2.0,
        "max_batch_size": 64, "pattern": load.split()[0], "load": load, "load_fraction": fraction,
        "offered_rps": 1000.0 * fraction, "requests": 1000, "good": 900, "late": 100, "refused": 0, "timed_out": 0,
        "errors": 0, "wrong": 0, "unanswered": 0, "goodput_rps": 900.0, "optimum_rps": 950.0, "of_optimum": 0.95,
        "of_capacity": 0.9, "p50_ms": 5.0, "p99_ms": 10.0, "mean_batch_size": 8.0, "model_busy": 0.5,
        "model_speed": 1.0, "lag_p99_ms": 1.0,
    }  # fmt: skip
    values.update(fields)
    return GoodputCell(**values)


def _reference(load: str, fraction: float, optimum_rps: float, **fields: Any) -> Any:
    from batchkit.bench._goodput import Reference

    pattern = load.split()[0]
    return Reference(pattern, load, fraction, 1000, 1000.0 * fraction, int(optimum_rps), optimum_rps, **fields)


@bench_extras
def test_headline_judges_both_targets_from_the_cells() -> None:
    from batchkit.bench._report_goodput import headline, markdown_table

    capacity = 1000.0
    refs = [_reference("poisson 50%", 0.5, 500.0)]
    refs.append(_reference("poisson 150%", 1.5, 980.0, speed=0.8, optimum_at_speed_rps=790.0))
    refs.append(_reference("bursty 150%", 1.5, 600.0))
    cells = [
        _cell("batchkit[w=2,b=64]", "poisson 50%", 0.5, p99_ms=10.0),
        _cell("batchkit[w=auto,b=64]", "poisson 50%", 0.5, p99_ms=10.5),
        _cell("batchkit-deadline[w=2,b=64]", "poisson 50%", 0.5, p99_ms=10.0),
        _cell("batchkit-deadline[w=auto,b=64]", "poisson 50%", 0.5, p99_ms=12.0),
        _cell("batchkit[w=auto,b=64]", "poisson 150%", 1.5, goodput_rps=400.0, of_capacity=0.4),
        _cell("batchkit-deadline[w=auto,b=64]", "poisson 150%", 1.5, goodput_rps=950.0, of_capacity=0.95),
        _cell("batchkit-deadline[w=auto,b=64]", "bursty 150%", 1.5, goodput_rps=590.0, of_capacity=0.59),
        _cell("floor[w=2,b=64]", "poisson 150%", 1.5, goodput_rps=100.0, of_capacity=0.1, of_optimum=0.1),
    ]
    lines = headline(cells, refs, capacity)
    text = "\n".join(lines)
    assert "poisson 50%: batchkit[w=auto,b=64] p99 10.5 ms against 10 ms" in text
    assert "1.05x (target <= 1.1x: met)" in text
    assert "batchkit-deadline[w=auto,b=64] p99 12 ms against 10 ms" in text
    assert "1.20x (target <= 1.1x: NOT met)" in text
    assert "batchkit[w=auto,b=64] answered 400/s in time, 0.40x capacity (target >= 0.9x: NOT met)" in text
    assert "batchkit-deadline[w=auto,b=64] answered 950/s in time, 0.95x capacity (target >= 0.9x: met)" in text
    assert "out of reach on this trace, where the optimum is 0.60x" in text
    assert "at the 0.80x speed the model ran at, the optimum is 0.79x capacity" in text
    assert "floor" not in text  # the targets are batchkit's
    table = markdown_table(cells, refs, capacity)
    assert "| **optimum (exact)** | **poisson 150%** | **1,500** | **980** | **100%** | **98%** |" in table
    assert "| **optimum at 0.80x speed** | **poisson 150%** | **1,500** | **790** | **81%** | **79%** |" in table
    assert "| floor[w=2,b=64] | poisson 150% | 1,500 | 100 | 10% | 10% |" in table
