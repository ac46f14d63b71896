"""Starting, closing and re-using a batcher; the decorator; stats."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit
from tests.conftest import RecordingModel
from tests.test_batching import gather, wait_until
from tests.test_failures import check_invariant

pytestmark = pytest.mark.anyio


def batchkit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batchkit-")]


async def test_starts_lazily_on_first_predict(no_thread_leak: None) -> None:
    batcher = batchkit.Batcher(lambda b: b, collate=None, name="lazy")
    assert not [t for t in batchkit_threads() if "lazy" in t.name]
    assert await batcher.predict(3) == 3
    assert [t for t in batchkit_threads() if "lazy" in t.name]
    await batcher.aclose()
    assert not [t for t in batchkit_threads() if "lazy" in t.name]


async def test_aclose_answers_every_accepted_request_at_once(no_thread_leak: None) -> None:
    model = RecordingModel(gated=True)
    # max_wait of an hour: without aclose flushing, the queued requests would wait it out
    batcher = batchkit.Batcher(model, max_batch_size=4, max_wait_ms=3_600_000, collate=None)
    results: dict[int, Any] = {}

    async def caller(i: int) -> None:
        results[i] = await batcher.predict(i)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(caller, i)
            await wait_until(lambda: batcher.stats().pending + batcher.stats().in_flight == 10)
            tg.start_soon(batcher.aclose)
            await wait_until(lambda: batcher.closed)
            with pytest.raises(batchkit.BatcherClosedError):
                await batcher.predict(100)  # refused: closing
            model.gate.set()
    assert results == {i: i for i in range(10)}
    stats = batcher.stats()
    assert (stats.completed, stats.rejected, stats.pending, stats.in_flight) == (10, 1, 0, 0)
    check_invariant(stats)


async def test_predict_after_aclose_is_refused(no_thread_leak: None) -> None:
    async with batchkit.Batcher(lambda b: b, collate=None) as batcher:
        assert await batcher.predict(1) == 1
    assert batcher.closed
    with pytest.raises(batchkit.BatcherClosedError, match="closed"):
        await batcher.predict(2)
    with pytest.raises(batchkit.BatcherClosedError):
        async with batcher:
            pass
    await batcher.aclose()  # idempotent
    assert batcher.stats().rejected == 1


async def test_aclose_of_a_never_started_batcher() -> None:
    batcher = batchkit.Batcher(lambda b: b)
    await batcher.aclose()
    with pytest.raises(batchkit.BatcherClosedError):
        await batcher.predict(1)


async def test_concurrent_aclose_calls_all_wait_for_the_drain(no_thread_leak: None) -> None:
    model = RecordingModel(gated=True)
    batcher = batchkit.Batcher(model, collate=None)
    closed = []

    async def closer() -> None:
        await batcher.aclose()
        closed.append(batcher.stats().in_flight)

    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.predict, 1)
        await wait_until(model.entered.is_set)
        tg.start_soon(closer)
        tg.start_soon(closer)
        await anyio.sleep(0.01)
        assert closed == []  # still draining
        model.gate.set()
    assert closed == [0, 0]


def living_tasks(anyio_backend: str) -> int:
    if anyio_backend == "trio":
        import trio

        return int(trio.lowlevel.current_statistics().tasks_living)
    return len(asyncio.all_tasks())


@pytest.mark.parametrize("is_async", [True, False])
async def test_aclose_leaves_no_task_or_thread_behind(anyio_backend: str, is_async: bool, no_thread_leak: None) -> None:
    async def async_model(batch: list[int]) -> list[int]:
        return batch

    before = living_tasks(anyio_backend)
    batcher = batchkit.Batcher(async_model if is_async else (lambda b: b), collate=None)
    await gather(batcher, [1, 2, 3])
    assert living_tasks(anyio_backend) == before + 1  # the worker
    await batcher.aclose()
    await anyio.lowlevel.checkpoint()
    assert living_tasks(anyio_backend) == before


def test_a_batcher_outlives_its_event_loop_and_restarts_on_the_next(anyio_backend: str) -> None:
    batcher = batchkit.Batcher(lambda b: [x * 2 for x in b], collate=None)

    async def use() -> Any:
        return await batcher.predict(21)

    assert anyio.run(use, backend=anyio_backend) == 42  # never closed: the loop's end stops it
    assert anyio.run(use, backend=anyio_backend) == 42
    gc.collect()


async def test_using_a_running_batcher_from_another_event_loop_is_a_clear_error() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None) as batcher:
        assert await batcher.predict(1) == 1

        def elsewhere() -> None:
            async def call() -> None:
                await batcher.predict(2)

            with pytest.raises(RuntimeError, match="one Batcher per event loop"):
                asyncio.run(call())

        await anyio.to_thread.run_sync(elsewhere)
        assert await batcher.predict(3) == 3


async def test_decorator_on_a_function() -> None:
    calls = []

    @batchkit.batch(max_batch_size=5, max_wait_ms=10, collate=None)
    def double(batch: list[int]) -> list[int]:
        """Double each input."""
        calls.append(len(batch))
        return [x * 2 for x in batch]

    assert isinstance(double, batchkit.Batcher)
    assert double.max_batch_size == 5
    assert double.__doc__ == "Double each input."
    assert double.__name__ == "double"
    async with double:
        results = await gather(double, list(range(12)))
        assert await double.predict(4) == 8
    assert results == [x * 2 for x in range(12)]
    assert max(calls) <= 5


async def test_bare_decorator_uses_the_defaults() -> None:
    @batchkit.batch
    async def plus_one(batch: Any) -> Any:
        return batch + 1

    assert plus_one.max_batch_size == 32
    assert plus_one.max_wait_ms == 2.0
    async with plus_one:
        assert await plus_one(1) == 2


async def test_decorator_on_a_method_gives_each_instance_its_own_batcher() -> None:
    class Model:
        def __init__(self, factor: int) -> None:
            self.factor = factor
            self.batches: list[list[int]] = []

        @batchkit.batch(max_batch_size=4, max_wait_ms=5, collate=None)
        def predict(self, batch: list[int]) -> list[int]:
            self.batches.append(batch)
            return [x * self.factor for x in batch]

    a, b = Model(2), Model(3)
    assert a.predict is a.predict  # created once, then cached on the instance
    assert a.predict is not b.predict
    assert isinstance(Model.predict, batchkit.Batcher)
    results_a = await gather(a.predict, list(range(6)))
    results_b = await gather(b.predict, list(range(6)))
    assert results_a == [x * 2 for x in range(6)]
    assert results_b == [x * 3 for x in range(6)]
    assert sum(map(len, a.batches)) == 6
    assert max(map(len, a.batches)) <= 4
    await a.predict.aclose()
    await b.predict.aclose()


async def test_stats_snapshot() -> None:
    model = RecordingModel()
    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=5, collate=None) as batcher:
        await gather(batcher, list(range(10)))
        stats = batcher.stats()
    assert isinstance(stats, batchkit.BatcherStats)
    assert stats.requests == 10
    assert stats.completed == 10
    assert stats.batches == len(model.batches)
    assert sum(stats.batch_sizes.values()) == stats.batches
    assert stats.mean_batch_size == pytest.approx(10 / stats.batches)
    assert (stats.failed, stats.rejected, stats.timed_out, stats.cancelled) == (0, 0, 0, 0)
    check_invariant(stats)
    with pytest.raises(AttributeError):
        stats.requests = 0  # type: ignore[misc]


def test_constructor_rejects_bad_options() -> None:
    def fn(b: Any) -> Any:
        return b

    with pytest.raises(TypeError, match="fn must be callable"):
        batchkit.Batcher(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        batchkit.Batcher(fn, max_batch_size=0)
    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        batchkit.Batcher(fn, max_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait_ms must be finite and at least 0"):
        batchkit.Batcher(fn, max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queue_size"):
        batchkit.Batcher(fn, max_queue_size=0)
    with pytest.raises(ValueError, match="timeout_ms must be finite and greater than 0"):
        batchkit.Batcher(fn, timeout_ms=0)
    with pytest.raises(ValueError, match="collate='stack' is not known"):
        batchkit.Batcher(fn, collate="stack")
    with pytest.raises(TypeError, match="collate must be"):
        batchkit.Batcher(fn, collate=42)  # type: ignore[arg-type]


def test_repr_names_the_function_and_state() -> None:
    def my_model(b: Any) -> Any:
        return b

    text = repr(batchkit.Batcher(my_model, max_batch_size=8))
    assert "my_model" in text
    assert "idle" in text
    assert "max_batch_size=8" in text
