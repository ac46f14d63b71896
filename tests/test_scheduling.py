"""Scheduling: priorities with aging, deadline order, cost budgets, adaptive waiting, live reconfiguration."""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from tests.conftest import RecordingModel
from tests.test_batching import gather, wait_until
from tests.test_failures import check_invariant

pytestmark = pytest.mark.anyio


async def queue_behind_a_running_batch(
    batcher: batchkit.Batcher[Any, Any], model: RecordingModel, calls: list[tuple[Any, dict[str, Any]]]
) -> None:
    """Hold one batch in the model, queue ``calls`` one by one in order, then release."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.predict, "blocker")
        await wait_until(model.entered.is_set)
        for n, (item, options) in enumerate(calls, start=1):
            tg.start_soon(lambda item=item, options=options: batcher.predict(item, **options))
            await wait_until(lambda n=n: batcher.stats().pending == n)
        model.gate.set()


async def test_higher_priority_goes_into_the_next_batch_first() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, collate=None) as batcher:
        calls = [("low1", {}), ("low2", {}), ("high1", {"priority": 5}), ("low3", {}), ("high2", {"priority": 5})]
        await queue_behind_a_running_batch(batcher, model, calls)
    assert model.batches == [["blocker"], ["high1", "high2"], ["low1", "low2"], ["low3"]]


async def test_a_long_waiting_low_priority_request_is_not_starved() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, priority_aging_ms=5, collate=None) as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.predict, "blocker")
            await wait_until(model.entered.is_set)
            tg.start_soon(b.predict, "old-low")
            await wait_until(lambda: b.stats().pending == 1)
            await anyio.sleep(0.05)  # 50 ms of waiting beats one priority level (5 ms)
            tg.start_soon(lambda: b.predict("new-high", priority=1))
            await wait_until(lambda: b.stats().pending == 2)
            model.gate.set()
    assert model.seen == ["blocker", "old-low", "new-high"]


async def test_earliest_deadline_first_among_equal_priorities() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, timeout_ms=60_000, collate=None) as batcher:
        calls = [("default", {}), ("relaxed", {"timeout_ms": 90_000}), ("urgent", {"timeout_ms": 5_000})]
        await queue_behind_a_running_batch(batcher, model, calls)
    assert model.seen == ["blocker", "urgent", "default", "relaxed"]


async def test_a_request_that_cannot_meet_its_deadline_fails_early_and_is_never_sent() -> None:
    def model(batch: list[str]) -> list[str]:
        time.sleep(0.05)
        return batch

    recorder = RecordingModel(model)
    async with batchkit.Batcher(recorder, max_wait_ms=0, collate=None) as batcher:
        for _ in range(3):
            await batcher.predict("teach the cost model")  # batches take >= 50 ms
        start = time.perf_counter()
        with pytest.raises(batchkit.RequestTimeoutError, match="cannot finish within its 20 ms timeout"):
            await batcher.predict("hopeless", timeout_ms=20)
        fast_fail = time.perf_counter() - start
        assert await batcher.predict("fine", timeout_ms=60_000) == "fine"
    assert "hopeless" not in recorder.seen
    assert fast_fail < 0.05  # it did not wait out a batch it could never make
    check_invariant(batcher.stats())


async def test_max_batch_cost_bounds_the_sum_of_costs() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(
        model, max_batch_size=100, max_wait_ms=0, collate=None, batch_cost=len, max_batch_cost=10
    ) as batcher:
        calls = [("x" * n, {}) for n in (4, 4, 4, 9, 1, 12, 2)]
        await queue_behind_a_running_batch(batcher, model, calls)
    batches = model.batches[1:]
    assert sorted(model.seen[1:]) == sorted(c for c, _ in calls)
    for batch in batches:
        assert len(batch) == 1 or sum(map(len, batch)) <= 10, batches  # a lone input may exceed it
    assert [len(b) for b in batches] == [2, 1, 2, 1, 1]  # 4+4 | 4 (+9 too much) | 9+1 | 12 | 2


async def test_cost_budget_with_padding_counts_padded_positions() -> None:
    seen = []

    def model(batch: batchkit.PaddedBatch) -> Any:
        seen.append(batch.values.shape)
        return batch.lengths

    async with batchkit.Batcher(
        model, max_batch_size=100, max_wait_ms=30, collate=batchkit.pad_sequences(), batch_cost=len, max_batch_cost=12
    ) as batcher:
        lengths = [2, 2, 2, 6, 2, 2]
        results = await gather(batcher, [np.zeros(n) for n in lengths])
    assert sorted(int(r) for r in results) == sorted(lengths)
    for size, width in seen:
        assert size == 1 or size * width <= 12, seen


def test_a_refused_configure_changes_nothing() -> None:
    batcher = batchkit.Batcher(lambda b: b, max_batch_size=16, max_wait_ms=3, allowed_batch_sizes=(4, 8))
    with pytest.raises(ValueError, match="no size <= max_batch_size=2"):
        batcher.configure(max_batch_size=2, max_wait_ms=0)
    assert (batcher.max_batch_size, batcher.max_wait_ms) == (16, 3)
    assert batcher.stats().batch_size_limit == 8


def test_batch_cost_options_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        batchkit.Batcher(lambda b: b, batch_cost=len)
    with pytest.raises(ValueError, match="go together"):
        batchkit.Batcher(lambda b: b, max_batch_cost=5)


async def test_configure_while_serving() -> None:
    model = RecordingModel(lambda b: b)
    async with batchkit.Batcher(model, max_batch_size=50, max_wait_ms=3_600_000, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(batcher.predict, i)
            await wait_until(lambda: batcher.stats().pending == 5)
            assert model.batches == []  # waiting out an hour
            batcher.configure(max_wait_ms=0, max_batch_size=2)  # wakes the worker: due now, in 2s
        assert [len(b) for b in model.batches] == [2, 2, 1]
        assert batcher.max_batch_size == 2
        assert batcher.max_wait_ms == 0
        batcher.configure(timeout_ms=1000)
        assert batcher.timeout_ms == 1000
        batcher.configure(timeout_ms=None)
        assert batcher.timeout_ms is None
        with pytest.raises(ValueError, match="max_batch_size"):
            batcher.configure(max_batch_size=0)
        assert batcher.max_batch_size == 2  # a rejected change changes nothing
        assert await batcher.predict(7) == 7


async def test_configure_under_load_keeps_every_answer() -> None:
    async with batchkit.Batcher(lambda b: [x * 2 for x in b], max_batch_size=8, max_wait_ms=1, collate=None) as b:
        results: dict[int, int] = {}

        async def caller(i: int) -> None:
            results[i] = await b.predict(i)

        async def reconfigure() -> None:
            for size in (1, 16, 3, 64, 2):
                await anyio.sleep(0.002)
                b.configure(max_batch_size=size, max_wait_ms=size / 4)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reconfigure)
            for i in range(600):
                tg.start_soon(caller, i)
                if i % 50 == 0:
                    await anyio.sleep(0.001)
    assert results == {i: 2 * i for i in range(600)}
    check_invariant(b.stats())


async def test_auto_wait_sends_a_lone_request_at_once() -> None:
    """At low load, auto must not add the fixed wait: compare side by side with a 30 ms fixed wait."""

    def model(batch: list[int]) -> list[int]:
        time.sleep(0.002)
        return batch

    async def latency(batcher: batchkit.Batcher[Any, Any]) -> float:
        samples = []
        async with batcher:
            for i in range(8):
                start = time.perf_counter()
                await batcher.predict(i)
                samples.append(time.perf_counter() - start)
                await anyio.sleep(0.01)  # well spaced: low load
        return sorted(samples)[len(samples) // 2]

    auto = await latency(batchkit.Batcher(model, max_wait_ms="auto", collate=None))
    fixed = await latency(batchkit.Batcher(model, max_wait_ms=30, collate=None))
    assert auto < fixed / 2, (auto, fixed)


async def test_auto_wait_still_batches_under_load() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.004 + 0.0001 * len(batch))
        return batch

    async with batchkit.Batcher(model, max_batch_size=64, max_wait_ms="auto", collate=None) as batcher:
        results = await gather(batcher, list(range(400)))
        stats = batcher.stats()
    assert results == list(range(400))
    assert stats.mean_batch_size > 4
    assert batcher.max_wait_ms == "auto"
