"""Why batches leave (``stats().flushes``) and what limited the batcher (``stats().limited_by``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

import batchkit
from batchkit._flushes import FLUSH_REASONS, WINDOW_SECONDS, Recent, RecentTotals, limited_by
from tests.conftest import RecordingModel
from tests.test_batching import gather, wait_until
from tests.test_failures import check_invariant

pytestmark = pytest.mark.anyio

NEVER = 60_000  # a max_wait_ms that no test waits out


def check_flushes(stats: batchkit.BatcherStats) -> None:
    """Every reason is listed, and the counts add up to the batches and their requests."""
    assert list(stats.flushes) == list(FLUSH_REASONS) == list(stats.flushed_requests)
    assert sum(stats.flushes.values()) == stats.batches, stats
    assert sum(stats.flushed_requests.values()) == sum(size * n for size, n in stats.batch_sizes.items()), stats
    check_invariant(stats)


def only(stats: batchkit.BatcherStats, **expected: int) -> None:
    """The flushes are exactly ``expected`` (every other reason 0)."""
    check_flushes(stats)
    assert {reason: n for reason, n in stats.flushes.items() if n} == expected, stats.flushes


# -- each reason ---------------------------------------------------------------------------------


async def test_full_groups_leave_as_full() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=4, max_wait_ms=NEVER) as batcher:
        assert await gather(batcher, list(range(8))) == list(range(8))
        stats = batcher.stats()
    only(stats, full=2)
    assert stats.flushed_requests["full"] == 8
    assert stats.mean_flush_size["full"] == 4.0
    assert stats.mean_flush_size["timer"] == 0.0


async def test_a_lone_request_leaves_by_timer_when_its_wait_runs_out() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=4, max_wait_ms=5) as batcher:
        assert await batcher.predict(1) == 1
        stats = batcher.stats()
    only(stats, timer=1)
    assert stats.mean_flush_size["timer"] == 1.0


@pytest.mark.parametrize("wait", [0, "auto"])
async def test_without_a_wait_a_request_leaves_because_a_slot_is_free(wait: Any) -> None:
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=4, max_wait_ms=wait) as batcher:
        for i in range(3):  # "auto" waits 0 until it has learned the model's cost
            assert await batcher.predict(i) == i
        stats = batcher.stats()
    only(stats, idle=3)


async def test_a_deadline_sends_a_batch_before_its_wait_runs_out() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=4, max_wait_ms=NEVER) as batcher:
        assert await gather(batcher, [1, 2], timeout_ms=300) == [1, 2]
        stats = batcher.stats()
    only(stats, deadline=1)
    assert stats.flushed_requests["deadline"] == 2
    assert stats.limited_by == "deadline", stats.limited_by_detail


async def test_a_group_at_max_batch_cost_leaves_as_cost() -> None:
    async with batchkit.Batcher(
        lambda b: b, collate=None, max_batch_size=100, max_wait_ms=NEVER, batch_cost=len, max_batch_cost=10
    ) as batcher:
        words = ["aaaaa", "bbbbb", "ccccc", "ddddd"]  # two of them reach the budget
        assert await gather(batcher, words) == words
        stats = batcher.stats()
    only(stats, cost=2)
    assert stats.flushed_requests["cost"] == 4


async def test_a_group_full_at_the_size_limit_before_its_cost_budget_leaves_as_full() -> None:
    async with batchkit.Batcher(
        lambda b: b, collate=None, max_batch_size=2, max_wait_ms=NEVER, batch_cost=len, max_batch_cost=100
    ) as batcher:
        assert await gather(batcher, ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]
        stats = batcher.stats()
    only(stats, full=2)


async def test_allowed_batch_sizes_lower_the_limit_but_batches_at_it_are_full_not_capped() -> None:
    async with batchkit.Batcher(
        lambda b: b, collate=None, max_batch_size=6, allowed_batch_sizes=[2, 4], max_wait_ms=NEVER
    ) as batcher:
        assert await gather(batcher, list(range(8))) == list(range(8))
        stats = batcher.stats()
    only(stats, full=2)


class OutOfMemoryAbove:
    """A batch function that runs out of memory on batches larger than ``fits``."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.sizes: list[int] = []

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise MemoryError(f"a batch of {len(batch)} does not fit")
        return batch


async def test_batches_cut_at_the_out_of_memory_cap_leave_as_cap() -> None:
    model = OutOfMemoryAbove(fits=2)
    async with batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=NEVER) as batcher:
        assert await gather(batcher, list(range(8))) == list(range(8))  # one full batch, halved to fit
        assert batcher.stats().batch_size_limit == 2
        assert await gather(batcher, list(range(8))) == list(range(8))  # four batches at the cap
        stats = batcher.stats()
    only(stats, full=1, cap=4)
    assert stats.flushed_requests["cap"] == 8
    assert stats.limited_by == "cap", stats.limited_by_detail
    assert "out-of-memory cap (2 of max_batch_size=8)" in stats.limited_by_detail


async def test_closing_sends_what_is_queued_as_drain() -> None:
    model = RecordingModel()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=NEVER)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with batcher:
                for i in range(3):
                    tg.start_soon(batcher.predict, i)
                await wait_until(lambda: batcher.stats().pending == 3)
            # aclose() has drained them
    stats = batcher.stats()
    only(stats, drain=1)
    assert [sorted(batch) for batch in model.batches] == [[0, 1, 2]]  # one batch (trio starts tasks in any order)
    assert stats.completed == 3


class Paced:
    """A step model: row ``n`` runs ``n`` steps; each step waits for a permit from the test."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)

    def start(self, inputs: list[int]) -> list[list[int]]:
        return [[n] for n in inputs]

    def step(self, state: list[list[int]]) -> tuple[list[int], list[bool]]:
        if not self.permits.acquire(timeout=30):
            raise RuntimeError("the test gave no permit")
        items = [row[0] for row in state]
        for row in state:
            row[0] -= 1
        return items, [row[0] == 0 for row in state]

    def join(self, a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
        return a + b

    def select(self, state: list[list[int]], rows: list[int]) -> list[list[int]]:
        return [state[i] for i in rows]


async def test_a_step_batcher_admits_newcomers_into_its_running_state_as_step() -> None:
    model = Paced()
    results: dict[str, list[int]] = {}

    async def run(name: str, n: int) -> None:
        results[name] = await batcher.predict(n)

    with anyio.fail_after(20):
        async with batchkit.StepBatcher(model, max_batch_size=2, max_wait_ms=NEVER) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "long", 3)
                tg.start_soon(run, "short", 1)  # the two fill the state: one "full" admission
                await wait_until(lambda: batcher.stats().in_flight == 2)
                model.permits.release()  # step 1: "short" ends, "long" runs on
                await wait_until(lambda: "short" in results)
                tg.start_soon(run, "late", 1)  # joins the running state at once, without its wait
                await wait_until(lambda: batcher.stats().flushes["step"] == 1)
                model.permits.release(2)
            stats = batcher.stats()
    assert results == {"long": [3, 2, 1], "short": [1], "late": [1]}
    only(stats, full=1, step=1)


# -- what limited the batcher ----------------------------------------------------------------------


async def test_nothing_ran_yet() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None) as batcher:
        stats = batcher.stats()
    assert (stats.limited_by, stats.busy_fraction) == ("none", 0.0)
    only(stats)


async def test_one_caller_at_a_time_is_limited_by_arrivals() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=8, max_wait_ms=1) as batcher:
        for i in range(10):
            await batcher.predict(i)  # one after another: never two queued at once
        stats = batcher.stats()
    only(stats, timer=10)
    assert stats.limited_by == "arrivals", stats.limited_by_detail
    assert "100% of batches left by timer with 1.0 requests on average (limit 8)" in stats.limited_by_detail
    assert stats.busy_fraction < 0.9


async def test_a_saturated_model_on_full_batches_is_limited_by_the_model() -> None:
    def slow(batch: list[int]) -> list[int]:
        time.sleep(0.1)
        return batch

    async with batchkit.Batcher(slow, collate=None, max_batch_size=4, max_wait_ms=NEVER) as batcher:
        assert await gather(batcher, list(range(20))) == list(range(20))
        stats = batcher.stats()
    only(stats, full=5)
    assert stats.limited_by == "model", stats.limited_by_detail
    assert stats.busy_fraction >= 0.9


async def test_requests_refused_for_a_full_queue_make_the_queue_the_limit() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, max_queue_size=1) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            await wait_until(model.entered.is_set)
            tg.start_soon(batcher.predict, "queued")
            await wait_until(lambda: batcher.stats().pending == 1)
            with pytest.raises(batchkit.QueueFullError):
                await batcher.predict("refused")
            stats = batcher.stats()
            model.gate.set()
    assert stats.limited_by == "queue", stats.limited_by_detail
    assert stats.limited_by_detail.startswith("1 requests refused with QueueFullError (max_queue_size=1)")
    check_flushes(stats)


# -- the rule and the window, with times given ---------------------------------------------------------


def totals(busy: float = 0.0, queue_full: int = 0, wall: float = 10.0, **flushes: tuple[int, int]) -> RecentTotals:
    """Window totals: ``reason=(batches, requests)``."""
    counts = [flushes.get(reason, (0, 0)) for reason in FLUSH_REASONS]
    return RecentTotals([c[0] for c in counts], [c[1] for c in counts], busy * wall, queue_full, wall)


@pytest.mark.parametrize(
    ("window", "verdict"),
    [
        (totals(), "none"),
        (totals(busy=1.0, full=(9, 288), queue_full=3), "queue"),  # refusals come first
        (totals(busy=1.0, cap=(5, 40), full=(5, 320)), "cap"),  # half the batches at the cap
        (totals(busy=0.5, deadline=(6, 12), timer=(4, 40)), "deadline"),
        (totals(busy=0.95, full=(6, 192), timer=(4, 40)), "model"),
        (totals(busy=0.95, cost=(6, 60), timer=(4, 40)), "model"),  # full by cost counts as full
        (totals(busy=0.85, full=(10, 320)), "arrivals"),  # full, but the model is idle 15 % of the time
        (totals(busy=0.95, idle=(10, 30)), "arrivals"),  # busy, but batches leave before they are full
        (totals(busy=0.2, timer=(10, 12)), "arrivals"),
    ],
)
def test_the_limited_by_rule(window: RecentTotals, verdict: str) -> None:
    got, detail = limited_by(window, slots=1, limit=32, max_batch_size=32, max_queue_size=100)
    assert got == verdict, detail
    assert detail


def test_busy_fraction_is_per_slot_and_at_most_one() -> None:
    window = totals(busy=1.0, wall=10.0)  # 10 s of model time in 10 s
    assert window.busy_fraction(slots=1) == 1.0
    assert window.busy_fraction(slots=4) == 0.25
    assert totals(busy=3.0).busy_fraction(slots=1) == 1.0  # a run that began before the window


def test_the_window_holds_this_epoch_and_the_last_one() -> None:
    recent = Recent()
    w = WINDOW_SECONDS
    recent.flushed(FLUSH_REASONS.index("timer"), 3, now=100 * w + 1)
    recent.ran(0.5, now=100 * w + 2)
    recent.flushed(FLUSH_REASONS.index("full"), 8, now=101 * w + 1)
    recent.refused(now=101 * w + 2)
    now = 101 * w + 5
    seen = recent.totals(now)
    assert seen.flushes[FLUSH_REASONS.index("timer")] == 1
    assert seen.rows[FLUSH_REASONS.index("timer")] == 3
    assert seen.flushes[FLUSH_REASONS.index("full")] == 1
    assert (seen.busy, seen.queue_full) == (0.5, 1)
    assert seen.wall == pytest.approx(w + 5)  # the last window and this one so far, however late the first event
    later = recent.totals(102 * w + 5)  # the first window has left
    assert sum(later.flushes) == 1
    assert later.busy == 0.0
    assert sum(recent.totals(103 * w).flushes) == 0  # idle for a whole window: nothing stale is kept
    recent.flushed(FLUSH_REASONS.index("idle"), 1, now=110 * w)  # after a gap, older windows are dropped
    assert sum(recent.totals(110 * w + 1).flushes) == 1


# -- Prometheus ------------------------------------------------------------------------------------------


async def test_prometheus_exports_flushes_by_reason_and_the_limit() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from batchkit.prometheus import register

    registry = CollectorRegistry()
    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=4, max_wait_ms=5, name="why") as batcher:
        register(batcher, registry)
        await gather(batcher, list(range(6)))  # one full batch, then two by timer
        stats = batcher.stats()
        text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for reason in FLUSH_REASONS:
        labels = (("batcher", "why"), ("reason", reason))
        assert samples[("batchkit_flushes_total", labels)] == stats.flushes[reason]
        assert samples[("batchkit_flushed_requests_total", labels)] == stats.flushed_requests[reason]
    assert samples[("batchkit_flushes_total", (("batcher", "why"), ("reason", "full")))] == 1
    limits = {labels[1][1]: value for (name, labels), value in samples.items() if name == "batchkit_limited_by"}
    assert limits == {limit: float(limit == stats.limited_by) for limit in limits}
    assert set(limits) == {"none", "arrivals", "model", "queue", "cap", "deadline"}
    assert samples[("batchkit_model_busy_ratio", (("batcher", "why"),))] == pytest.approx(stats.busy_fraction, abs=0.1)
