"""Batching itself: when batches form, how big they get, who gets which result."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import batchkit
from tests.conftest import RecordingModel

pytestmark = pytest.mark.anyio


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` on the event loop (a hang is caught by fail_after)."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


async def gather(batcher: batchkit.Batcher[Any, Any], inputs: list[Any], **kwargs: Any) -> list[Any]:
    results: list[Any] = [None] * len(inputs)

    async def one(i: int) -> None:
        results[i] = await batcher.predict(inputs[i], **kwargs)

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)
    return results


async def gather_settled(batcher: batchkit.Batcher[Any, Any], inputs: list[Any]) -> list[Any]:
    """Like gather, but each slot holds the result or the exception of its call."""
    results: list[Any] = [None] * len(inputs)

    async def one(i: int) -> None:
        try:
            results[i] = await batcher.predict(inputs[i])
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)
    return results


async def test_concurrent_requests_are_batched() -> None:
    model = RecordingModel(lambda b: b * 10)
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=20) as batcher:
        results = await gather(batcher, list(range(50)))
    assert results == [i * 10 for i in range(50)]
    assert len(model.batches) < 50
    assert max(len(b) for b in model.batches) <= 8
    assert sorted(model.seen) == list(range(50))
    stats = batcher.stats()
    assert stats.batches == len(model.batches)
    assert stats.completed == 50
    assert sum(stats.batch_sizes.values()) == stats.batches
    assert sum(size * n for size, n in stats.batch_sizes.items()) == 50


@pytest.mark.parametrize("seed", range(3))
async def test_each_caller_gets_its_own_result_under_random_interleavings(seed: int) -> None:
    rng = random.Random(seed)
    sizes = []

    def model(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(rng.random() * 0.003)
        return batch * 3 + 1

    inputs = [np.array([i, -i], dtype=np.int64) for i in range(300)]
    delays = [rng.random() * 0.02 for _ in inputs]
    results: dict[int, Any] = {}

    async def caller(i: int) -> None:
        await anyio.sleep(delays[i])
        results[i] = await batcher.predict(inputs[i])

    async with batchkit.Batcher(model, max_batch_size=rng.choice([4, 16, 64]), max_wait_ms=rng.random() * 3) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(caller, i)
    for i, x in enumerate(inputs):
        np.testing.assert_array_equal(results[i], x * 3 + 1)
    assert sum(sizes) == len(inputs)
    assert max(sizes) <= batcher.max_batch_size


async def test_full_batch_is_sent_without_waiting_for_max_wait() -> None:
    model = RecordingModel()
    # max_wait of an hour: only "batch full" can flush these.
    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=3_600_000, collate=None) as batcher:
        with anyio.fail_after(10):
            results = await gather(batcher, [1, 2, 3, 4])
    assert results == [1, 2, 3, 4]
    assert [sorted(b) for b in model.batches] == [[1, 2, 3, 4]]  # trio starts tasks in any order


async def test_partial_batch_is_sent_after_max_wait() -> None:
    model = RecordingModel()
    async with batchkit.Batcher(model, max_batch_size=100, max_wait_ms=5, collate=None) as batcher:
        with anyio.fail_after(10):
            results = await gather(batcher, [1, 2, 3])
    assert results == [1, 2, 3]
    assert [sorted(b) for b in model.batches] == [[1, 2, 3]]


async def test_oldest_request_bounds_the_wait_not_the_newest() -> None:
    """A steady trickle must not postpone the flush forever."""
    model = RecordingModel()
    async with batchkit.Batcher(model, max_batch_size=1000, max_wait_ms=30, collate=None) as batcher:

        async def trickle() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(batcher.predict, i)
                    await anyio.sleep(0.005)  # 40 x 5 ms = 200 ms >> 30 ms

        with anyio.fail_after(10):
            await trickle()
    assert len(model.batches) >= 3, model.batches
    assert sorted(model.seen) == list(range(40))


async def test_max_wait_zero_sends_what_is_queued_when_the_worker_is_free() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=64, max_wait_ms=0, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "first")
            await wait_until(model.entered.is_set)
            for i in range(10):  # queued while "first" runs
                tg.start_soon(batcher.predict, i)
            await wait_until(lambda: batcher.stats().pending == 10)
            model.gate.set()
    assert [sorted(b, key=str) for b in model.batches] == [["first"], list(range(10))]


async def test_next_batch_collects_while_the_model_runs() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=32, max_wait_ms=1, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, -1)
            await wait_until(model.entered.is_set)
            for i in range(20):
                tg.start_soon(batcher.predict, i)
            await anyio.sleep(0.02)  # far beyond max_wait: they still wait for the worker
            assert batcher.stats().pending == 20
            assert batcher.stats().in_flight == 1
            model.gate.set()
    assert [sorted(b) for b in model.batches] == [[-1], list(range(20))]


async def test_a_large_burst_is_cut_into_full_batches() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=10, max_wait_ms=1, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, -1)
            await wait_until(model.entered.is_set)
            for i in range(35):  # one at a time, so that arrival order is known
                tg.start_soon(batcher.predict, i)
                await wait_until(lambda i=i: batcher.stats().pending == i + 1)
            model.gate.set()
    assert [len(b) for b in model.batches] == [1, 10, 10, 10, 5]
    assert model.seen == [-1, *range(35)]  # FIFO


async def test_sync_fn_runs_on_a_worker_thread() -> None:
    model = RecordingModel()
    async with batchkit.Batcher(model, collate=None) as batcher:
        await gather(batcher, list(range(10)))
    assert threading.get_ident() not in model.threads
    assert len(model.threads) == 1  # always the same, dedicated thread


async def test_async_fn_is_awaited_on_the_event_loop() -> None:
    threads = set()
    sizes = []

    async def model(batch: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        sizes.append(len(batch))
        await anyio.sleep(0.001)
        return [x + 1 for x in batch]

    async with batchkit.Batcher(model, max_batch_size=8, collate=None) as batcher:
        results = await gather(batcher, list(range(30)))
    assert results == [x + 1 for x in range(30)]
    assert threads == {threading.get_ident()}
    assert max(sizes) <= 8
    assert len(sizes) < 30


async def test_async_callable_object_is_detected() -> None:
    class Model:
        async def __call__(self, batch: list[int]) -> list[int]:
            return [x * 2 for x in batch]

    async with batchkit.Batcher(Model(), collate=None) as batcher:
        assert await batcher.predict(21) == 42


async def test_a_blocking_model_does_not_block_the_event_loop() -> None:
    """Side by side: the heartbeat's worst delay with batchkit vs calling the model inline."""
    block = 0.05

    def model(batch: Any) -> Any:
        time.sleep(block)  # a CPU- or GIL-releasing model that takes 50 ms per batch
        return batch

    async def worst_heartbeat_gap(work: Callable[[], Any]) -> float:
        gaps = []
        done = False

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not done:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await anyio.sleep(0.005)
            await work()
            done = True
        return max(gaps)

    async with batchkit.Batcher(model, max_batch_size=4, collate=None) as batcher:

        async def with_batchkit() -> None:
            await gather(batcher, list(range(12)))

        async def inline() -> None:
            for _ in range(3):
                model([0])
                await anyio.lowlevel.checkpoint()

        batched_gap = await worst_heartbeat_gap(with_batchkit)
        inline_gap = await worst_heartbeat_gap(inline)
    assert inline_gap >= block  # the naive call blocks the loop for the whole model run
    assert batched_gap < inline_gap / 2, (batched_gap, inline_gap)


async def test_batches_never_exceed_max_batch_size_under_heavy_load() -> None:
    model = RecordingModel(lambda b: b)
    async with batchkit.Batcher(model, max_batch_size=7, max_wait_ms=0.5, collate=None) as batcher:
        results = await gather(batcher, list(range(1000)))
    assert results == list(range(1000))
    assert max(len(b) for b in model.batches) <= 7
    assert batcher.stats().batch_sizes.keys() <= set(range(1, 8))
