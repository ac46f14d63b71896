"""Regressions found by an adversarial review of the core's second pass, each through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import threading
import time
import weakref
from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from tests._reliability import check_settled, wait_until


def test_a_loop_closed_with_requests_outstanding_leaves_nothing_behind_for_the_next() -> None:
    """Loop 1 closes without cleanup while 4 requests run and 2 are queued: loop 2's callers are
    answered, and the dead loop's requests are counted as failed, not left in flight."""

    def model(batch: list[int]) -> list[int]:
        time.sleep(0.1)
        return [x * 10 for x in batch]

    batcher = batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=1)

    async def first() -> None:
        tasks = [asyncio.ensure_future(batcher.predict(i)) for i in range(6)]
        await asyncio.sleep(0.02)
        assert not any(task.done() for task in tasks)  # 4 running, 2 queued when the loop is closed

    async def second() -> list[int]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(batcher.predict(100 + i) for i in range(2))), 5)
        finally:
            await batcher.aclose()

    logging.disable(logging.CRITICAL)  # asyncio's "Task was destroyed but it is pending"
    try:
        loop1 = asyncio.new_event_loop()
        loop1.run_until_complete(first())
        loop1.close()
        loop2 = asyncio.new_event_loop()
        try:
            assert loop2.run_until_complete(second()) == [1000, 1010]
        finally:
            loop2.close()
    finally:
        logging.disable(logging.NOTSET)
    stats = batcher.stats()
    assert (stats.in_flight, stats.pending, stats.completed, stats.failed) == (0, 0, 2, 6)
    check_settled(stats)


@pytest.mark.anyio
async def test_a_model_raising_stop_iteration_fails_only_that_input() -> None:
    """StopIteration cannot be set on an asyncio future: the caller gets a RuntimeError, and
    the batch's other callers their results."""

    def model(batch: list[str]) -> list[str]:
        if "bad" in batch:
            next(iter([]))
        return [x.upper() for x in batch]

    batcher = batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=20, on_error="isolate")
    outcomes: dict[str, Any] = {}

    async def one(x: str) -> None:
        try:
            outcomes[x] = await batcher.predict(x)
        except Exception as error:
            outcomes[x] = error

    with anyio.fail_after(10):
        async with batcher, anyio.create_task_group() as tg:
            for x in ("a", "bad", "c", "d"):
                tg.start_soon(one, x)
    assert isinstance(outcomes.pop("bad"), RuntimeError)
    assert outcomes == {"a": "A", "c": "C", "d": "D"}
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_two_tasks_can_each_use_async_with_on_one_batcher() -> None:
    """Each `async with` exits only what it entered: the second never takes the first's task group."""
    batcher = batchkit.Batcher(lambda xs: [x * 2 for x in xs], collate=None, max_batch_size=4, max_wait_ms=1)
    got: list[Any] = []

    async def handler(hold: float) -> None:
        async with batcher:
            got.append(await batcher.predict(1))
            await anyio.sleep(hold)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler, 0.2)
            await wait_until(lambda: len(got) == 1)
            tg.start_soon(handler, 0.0)
    assert got == [2, 2]
    assert batcher.closed


@pytest.mark.anyio
async def test_async_with_nested_in_one_task_across_a_cancel_scope() -> None:
    batcher = batchkit.Batcher(lambda xs: [x * 2 for x in xs], collate=None, max_wait_ms=1)
    with anyio.fail_after(10):
        async with batcher:
            with anyio.CancelScope():
                async with batcher:
                    assert await batcher.predict(3) == 6
    assert batcher.closed


@pytest.mark.anyio
async def test_an_idle_worker_thread_does_not_keep_the_last_batch_alive() -> None:
    batcher = batchkit.Batcher(lambda batch: batch.sum(axis=1), max_batch_size=8, max_wait_ms=1)
    xs = [np.ones(1000) for _ in range(8)]
    refs = [weakref.ref(x) for x in xs]
    with anyio.fail_after(10):
        async with batcher:
            async with anyio.create_task_group() as tg:
                for x in xs:
                    tg.start_soon(batcher.predict, x)
            del xs, x
            await anyio.sleep(0.2)  # the thread is idle, waiting for its next job
            gc.collect()
            alive = sum(r() is not None for r in refs)
            assert alive == 0, f"{alive} of 8 inputs still alive after every caller was answered"


def test_aclose_from_another_running_loop_refuses_and_leaves_the_batcher_open() -> None:
    batcher = batchkit.Batcher(lambda xs: [x * 2 for x in xs], collate=None, max_wait_ms=1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert asyncio.run_coroutine_threadsafe(batcher.predict(1), loop).result(5) == 2

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="event loop it runs on"):
                await batcher.aclose()

        asyncio.run(elsewhere())
        assert not batcher.closed
        assert asyncio.run_coroutine_threadsafe(batcher.predict(2), loop).result(5) == 4
        asyncio.run_coroutine_threadsafe(batcher.aclose(), loop).result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Scaled:
    def __init__(self, scale: int) -> None:
        self.scale = scale

    @batchkit.batch(collate=None, max_wait_ms=5)
    def predict(self, xs: list[int]) -> list[int]:
        return [x * self.scale for x in xs]


@pytest.mark.anyio
async def test_a_call_keeps_its_instance_alive_like_a_bound_method() -> None:
    with anyio.fail_after(10):
        assert await Scaled(3).predict(2) == 6  # the instance is a temporary
        scaled = Scaled(5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(scaled.predict, 2)
            ref = weakref.ref(scaled)
            del scaled  # the call in progress keeps it
            gc.collect()
        gc.collect()
        assert ref() is None  # and once the call is done, nothing does


@pytest.mark.anyio
async def test_a_copied_instance_gets_its_own_batcher() -> None:
    original = Scaled(10)
    with anyio.fail_after(10):
        assert await original.predict(1) == 10
        twin = copy.copy(original)
        twin.scale = 1000
        assert await twin.predict(1) == 1000
        assert twin.predict is not original.predict
        assert await original.predict(1) == 10


@pytest.mark.anyio
async def test_int_and_float_lists_are_batched_apart() -> None:
    """A float payload never turns its batch-mates' integer ids into floats."""
    seen: list[Any] = []

    def model(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.dtype)
        return batch.sum(axis=1)

    batcher = batchkit.Batcher(model, max_batch_size=4, max_wait_ms=20)
    results: dict[str, Any] = {}

    async def one(name: str, x: list[Any]) -> None:
        results[name] = await batcher.predict(x)

    with anyio.fail_after(10):
        async with batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "ints", [1, 2, 3])
                tg.start_soon(one, "floats", [0.5, 1.5, 2.0])
                tg.start_soon(one, "more ints", [4, 5, 6])
            assert await batcher.predict([1, 2**70]) == 2**70 + 1  # exact, in an object array of its own
    assert results == {"ints": 6, "floats": 4.0, "more ints": 15}
    assert sorted(str(dtype) for dtype in seen) == ["float64", "int64", "object"]


# -- second review ---------------------------------------------------------------------------------


def _batchkit_threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_a_batcher_dropped_while_its_loop_is_not_running_stops_its_threads() -> None:
    loop = asyncio.new_event_loop()
    try:
        batcher: batchkit.Batcher[int, int] | None = batchkit.Batcher(
            lambda xs: [x + 1 for x in xs], collate=None, max_wait_ms=1, name="dropped-idle"
        )
        assert batcher is not None
        assert loop.run_until_complete(batcher.predict(1)) == 2
        assert _batchkit_threads("batchkit-dropped-idle")
        del batcher  # the loop is not running: nothing will ever run a callback on it
        gc.collect()
        deadline = time.monotonic() + 5
        while _batchkit_threads("batchkit-dropped-idle") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _batchkit_threads("batchkit-dropped-idle")
    finally:
        logging.disable(logging.CRITICAL)  # "Task was destroyed but it is pending" for the idle worker
        try:
            loop.close()
            gc.collect()
        finally:
            logging.disable(logging.NOTSET)


@pytest.mark.anyio
async def test_after_an_out_of_memory_split_the_next_batch_is_formed_at_the_new_cap() -> None:
    sizes: list[int] = []

    def model(batch: list[float]) -> list[float]:
        sizes.append(len(batch))
        if len(batch) > 4:
            raise MemoryError("too big")
        return batch

    async with batchkit.Batcher(model, collate=None, max_batch_size=16, max_wait_ms=0) as batcher:
        with anyio.fail_after(10):
            await batcher.predict(0.0)
            sizes.clear()
            results = await batcher.predict_many([float(i) for i in range(48)])
        stats = batcher.stats()
    assert results == [float(i) for i in range(48)]
    assert [s for s in sizes if s > 4] == [16, 8, 8]  # one batch split once into fitting halves; none after
    assert stats.oom_splits == 3
    assert stats.batch_size_limit == 4


@pytest.mark.anyio
async def test_int_and_float_scalars_are_batched_apart() -> None:
    seen: list[str] = []

    def model(batch: np.ndarray) -> np.ndarray:
        seen.append(str(batch.dtype))
        return batch * 2

    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=20) as batcher:
        with anyio.fail_after(10):
            assert await batcher.predict_many([1, 2.5, 3, 2**70]) == [2, 5.0, 6, 2**71]
    assert sorted(seen) == ["float64", "int64", "object"]  # a huge int never joins the int64 batch


@pytest.mark.anyio
async def test_an_instance_whose_method_was_used_can_be_deep_copied_and_pickled() -> None:
    import pickle

    original = Scaled(10)
    with anyio.fail_after(10):
        assert await original.predict(1) == 10
        twin = copy.deepcopy(original)
        twin.scale = 7
        assert await twin.predict(1) == 7
        thawed = pickle.loads(pickle.dumps(original))
        thawed.scale = 3
        assert await thawed.predict(1) == 3
        assert await original.predict(1) == 10
        running = batchkit.Batcher(lambda xs: xs, collate=None)
        assert await running.predict(1) == 1
        with pytest.raises(TypeError, match="running Batcher"):
            pickle.dumps(running)
        await running.aclose()


@pytest.mark.anyio
async def test_an_inner_async_with_does_not_close_the_batcher_under_the_outer_block() -> None:
    batcher = batchkit.Batcher(lambda xs: [x * 2 for x in xs], collate=None, max_wait_ms=1)
    with anyio.fail_after(10):
        async with batcher:
            async with batcher:
                assert await batcher.predict(1) == 2
            assert await batcher.predict(2) == 4  # still open: the outer block owns it
    assert batcher.closed


@pytest.mark.anyio
async def test_a_second_task_leaving_its_async_with_does_not_close_the_batcher_for_the_first() -> None:
    batcher = batchkit.Batcher(lambda xs: [x * 2 for x in xs], collate=None, max_wait_ms=1)
    second_left = anyio.Event()
    got: list[int] = []

    async def second() -> None:
        async with batcher:
            got.append(await batcher.predict(1))
        second_left.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, batcher:
            tg.start_soon(second)
            await second_left.wait()
            got.append(await batcher.predict(2))  # the first block is still inside
    assert got == [2, 4]
    assert batcher.closed


@pytest.mark.anyio
@pytest.mark.parametrize("empty", [[], {"ids": []}, ()])
async def test_an_input_with_nothing_to_stack_is_invalid(empty: Any) -> None:
    async with batchkit.Batcher(lambda b: b, max_wait_ms=1) as batcher:
        with anyio.fail_after(10), pytest.raises(batchkit.InvalidInputError, match="empty"):
            await batcher.predict(empty)
        check_settled(batcher.stats())


@pytest.mark.anyio
async def test_numpy_numbers_are_accepted_as_cost_and_priority() -> None:
    async with batchkit.Batcher(
        lambda b: b, collate=None, batch_cost=lambda x: np.int64(len(x)), max_batch_cost=10, max_wait_ms=1
    ) as batcher:
        with anyio.fail_after(10):
            assert await batcher.predict("abc", priority=np.int64(2)) == "abc"
            assert await batcher.predict("de", priority=np.float32(0.5)) == "de"


@pytest.mark.anyio
async def test_deadlines_shorter_than_the_wait_are_met() -> None:
    """The flush leaves a margin for a late timer and the thread hop (the loop's timers are coarse)."""

    async def model(batch: list[int]) -> list[int]:
        return batch

    async with batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=10_000) as batcher:
        with anyio.fail_after(30):
            for i in range(10):  # flushed with 20 ms to spare: a late timer or a busy machine is not enough
                assert await batcher.predict(i, timeout_ms=200) == i
        assert batcher.stats().timed_out == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_generator_function_streams_instead_of_failing_every_call(kind: str) -> None:
    """Once refused, now supported: each yield is one item per request (see test_streaming.py)."""

    def sync_gen(batch: list[Any]) -> Any:
        yield [x * 2 for x in batch]
        yield [x * 3 for x in batch]

    async def async_gen(batch: list[Any]) -> Any:
        for items in sync_gen(batch):
            yield items

    async with batchkit.Batcher(sync_gen if kind == "sync" else async_gen, collate=None, max_wait_ms=1) as batcher:
        with anyio.fail_after(10):
            assert await batcher.predict(5) == [10, 15]


# -- third review ------------------------------------------------------------------------------------


class _Hangs:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, batch: list[Any]) -> list[Any]:
        if "hang" in batch:
            self.release.wait(15)
        return batch


async def _outcome(batcher: batchkit.Batcher[Any, Any], x: Any) -> Any:
    try:
        return await batcher.predict(x)
    except Exception as error:
        return error


@pytest.mark.anyio
async def test_aclose_does_not_wait_for_a_hung_slot_when_another_slot_is_idle() -> None:
    model = _Hangs()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50, replicas=2)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_outcome, batcher, "hang")
                await wait_until(lambda: batcher.stats().blocked_slots == 1)
                assert await batcher.predict("ok") == "ok"  # the other slot serves
                await batcher.aclose()  # nothing queued: returns without the hung call
    finally:
        model.release.set()


def test_blocked_slots_clear_once_the_worker_that_held_them_is_gone() -> None:
    model = _Hangs()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50)

    async def first() -> None:
        assert isinstance(await _outcome(batcher, "hang"), batchkit.ModelTimeoutError)

    async def second() -> None:
        with anyio.fail_after(10):
            assert await batcher.predict("ok") == "ok"
            stats = batcher.stats()
            assert (stats.blocked_slots, stats.oldest_running_ms) == (0, 0.0)
            await batcher.aclose()

    anyio.run(first)  # the loop ends (no aclose) while the call is hung
    model.release.set()
    anyio.run(second)


@pytest.mark.anyio
async def test_oldest_queued_age_forgets_requests_that_left() -> None:
    model = _Hangs()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=0, run_timeout_ms=50)
    try:
        with anyio.fail_after(10):
            async with batcher, anyio.create_task_group() as tg:
                tg.start_soon(_outcome, batcher, "hang")
                await wait_until(lambda: batcher.stats().blocked_slots == 1)
                old = anyio.CancelScope()

                async def withdrawn() -> None:
                    with old:
                        await _outcome(batcher, "old")

                tg.start_soon(withdrawn)
                await anyio.sleep(0.5)
                tg.start_soon(_outcome, batcher, "new")
                await wait_until(lambda: batcher.stats().pending == 2)
                old.cancel()
                await wait_until(lambda: batcher.stats().pending == 1)
                assert batcher.stats().oldest_queued_ms < 400  # the new one's age, not the cancelled one's
                model.release.set()
    finally:
        model.release.set()


@pytest.mark.anyio
async def test_callers_of_a_half_that_failed_after_an_oom_split_get_their_own_error_objects() -> None:
    def model(batch: list[int]) -> list[int]:
        if len(batch) > 2:
            raise MemoryError("does not fit")
        if 0 in batch:
            raise ValueError("a bad half")  # not split further: both of its callers fail
        return batch

    results: dict[int, Any] = {}

    async def one(x: int) -> None:
        results[x] = await _outcome(batcher, x)

    async with batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=20) as batcher:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for x in (0, 1, 2, 3):
                    tg.start_soon(one, x)
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert len(errors) == 2  # 0 and its half-mate 1 fail; 2 and 3 fit
    assert errors[0] is not errors[1]


def test_sync_batcher_error_answers_leave_no_cycles() -> None:
    def failing(batch: list[Any]) -> list[Any]:
        raise ValueError("no")

    with batchkit.SyncBatcher(failing, collate=None, max_wait_ms=0) as sync:
        for _ in range(3):  # warm up
            with pytest.raises(ValueError, match="no"):
                sync.predict(1)
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                with pytest.raises(ValueError, match="no"):
                    sync.predict(1)
            found = gc.collect()
        finally:
            gc.enable()
    assert found == 0, f"{found} objects freed only by the cycle collector"


@pytest.mark.anyio
async def test_stream_error_answers_leave_no_cycles() -> None:
    def failing_steps(batch: list[Any]) -> Any:
        yield batch
        raise ValueError("no")

    async def one() -> None:
        with pytest.raises(ValueError, match="no"):
            async for _ in streaming.stream(1):
                pass

    async with batchkit.Batcher(failing_steps, collate=None, max_wait_ms=0) as streaming:
        for _ in range(3):
            await one()
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                await one()
            found = gc.collect()
        finally:
            gc.enable()
    assert found == 0, f"{found} objects freed only by the cycle collector"


def test_submit_threadsafe_works_for_a_batcher_running_on_trio() -> None:
    import trio

    batcher = batchkit.Batcher(lambda b: [x * 2 for x in b], collate=None, max_batch_size=4, max_wait_ms=1)
    ready = threading.Event()
    done = threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        async with batcher:
            ready.set()
            with trio.move_on_after(10):
                while not done.is_set():
                    await trio.sleep(0.005)

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10)
        assert batcher.submit_threadsafe(21).result(timeout=10) == 42
    finally:
        done.set()
        thread.join(10)
    assert not failure


def test_a_request_handed_over_as_the_loop_ends_is_refused_not_left_waiting() -> None:
    import asyncio

    batcher = batchkit.Batcher(lambda b: b, collate=None, max_wait_ms=0)
    futures: list[Any] = []
    stop = threading.Event()
    started = threading.Event()

    def submit() -> None:
        while not stop.is_set():
            with contextlib.suppress(RuntimeError, batchkit.BatcherClosedError):
                futures.append(batcher.submit_threadsafe(1))
                started.set()

    async def main() -> None:
        assert await batcher.predict(0) == 0  # lazy start: the worker ends with this loop
        thread = threading.Thread(target=submit)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        await asyncio.sleep(0.05)
        loop_thread.append(thread)

    loop_thread: list[threading.Thread] = []
    asyncio.run(main())
    stop.set()
    loop_thread[0].join(10)
    for future in futures:
        with contextlib.suppress(batchkit.BatcherClosedError, batchkit.QueueFullError):  # answered, not left waiting
            future.result(timeout=5)
