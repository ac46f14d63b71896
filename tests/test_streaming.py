"""Streaming: generator models (request-level) and StepBatcher (rows join and leave between steps)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit
from tests._reliability import check_settled, wait_until


async def _collect(stream: Any, into: list[Any]) -> None:
    async for item in stream:
        into.append(item)


# -- a step model: row x counts up from x for length(x) steps ---------------------------------------


def length(x: int) -> int:
    return x % 7 + 1


def alone(x: int) -> list[int]:
    """What generating request ``x`` by itself gives."""
    return list(range(x, x + length(x)))


class Counter:
    """State: a list of [value, steps left]. Records the rows of every step; can be held."""

    def __init__(self, *, step_s: float = 0.0, fail_start: Any = None, fail_step_at: int | None = None) -> None:
        self.rows_per_step: list[int] = []
        self.started: list[list[int]] = []
        self.step_s = step_s
        self.fail_start = fail_start
        self.fail_step_at = fail_step_at
        self.gate = threading.Event()
        self.gate.set()

    def start(self, inputs: list[int]) -> list[list[int]]:
        self.started.append(list(inputs))
        if self.fail_start is not None and self.fail_start in inputs:
            raise ValueError("cannot start")
        return [[x, length(x)] for x in inputs]

    def step(self, state: list[list[int]]) -> tuple[list[int], list[bool]]:
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        self.rows_per_step.append(len(state))
        if self.fail_step_at is not None and len(self.rows_per_step) == self.fail_step_at:
            raise RuntimeError("step failed")
        if self.step_s:
            time.sleep(self.step_s)
        items = [value for value, _ in state]
        finished = [left == 1 for _, left in state]
        for row in state:
            row[0] += 1
            row[1] -= 1
        return items, finished

    def join(self, a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
        return a + b

    def select(self, state: list[list[int]], rows: list[int]) -> list[list[int]]:
        return [state[i] for i in rows]


@pytest.mark.anyio
async def test_every_caller_gets_exactly_its_own_items_in_order() -> None:
    model = Counter(step_s=0.001)
    results: dict[int, list[int]] = {}
    inputs = random.Random(0).sample(range(1000), 60)

    async def one(x: int) -> None:
        await anyio.sleep(random.random() * 0.05)  # arrivals spread over the generation
        results[x] = [item async for item in batcher.stream(x)]

    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=8, max_wait_ms=1) as batcher:
            async with anyio.create_task_group() as tg:
                for x in inputs:
                    tg.start_soon(one, x)
            assert await batcher.predict(5) == alone(5)
            stats = batcher.stats()
    assert results == {x: alone(x) for x in inputs}
    assert max(model.rows_per_step) <= 8  # max_batch_size rows, never more
    assert stats.completed == 61
    check_settled(stats)


@pytest.mark.anyio
async def test_a_request_arriving_mid_generation_joins_before_the_running_rows_finish() -> None:
    model = Counter(step_s=0.002)
    long_done = anyio.Event()
    first_item_of_late: list[bool] = []

    async def long() -> None:
        assert [item async for item in batcher.stream(6)] == alone(6)  # 7 steps
        long_done.set()

    async def late() -> None:
        async for _ in batcher.stream(7):  # 1 step
            first_item_of_late.append(long_done.is_set())

    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=8, max_wait_ms=0) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(long)
                await wait_until(lambda: len(model.rows_per_step) >= 2)
                tg.start_soon(late)
    assert first_item_of_late == [False]  # it was answered while the long row still ran
    assert 2 in model.rows_per_step  # the two shared steps


@pytest.mark.anyio
async def test_cancelling_one_stream_drops_its_row_and_the_others_continue() -> None:
    model = Counter(step_s=0.003)
    got: list[int] = []

    async def reader(x: int) -> None:
        got.extend([item async for item in batcher.stream(x)])

    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=8, max_wait_ms=5) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader, 6)  # 7 steps
                with anyio.move_on_after(0.02):
                    async for _ in batcher.stream(13):  # 7 steps too, given up early
                        pass
            stats = batcher.stats()
    assert got == alone(6)
    assert model.rows_per_step[0] == 2
    assert model.rows_per_step[-1] == 1  # the cancelled row was selected away
    assert stats.cancelled == 1
    check_settled(stats)


@pytest.mark.anyio
async def test_a_stream_past_its_deadline_fails_and_its_row_is_dropped() -> None:
    model = Counter(step_s=0.01)
    items: list[int] = []
    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=4, max_wait_ms=0) as batcher:
            with pytest.raises(batchkit.RequestTimeoutError):
                await _collect(batcher.stream(6, timeout_ms=35), items)  # 7 steps of 10 ms
            assert await batcher.predict(7) == alone(7)  # still serving
            stats = batcher.stats()
    assert 1 <= len(items) < 7
    assert items == alone(6)[: len(items)]
    assert stats.timed_out == 1
    check_settled(stats)


@pytest.mark.anyio
async def test_a_failing_start_fails_only_its_rows_and_a_failing_step_fails_its_state() -> None:
    model = Counter(step_s=0.002, fail_start=99)
    outcomes: dict[int, Any] = {}

    async def one(x: int) -> None:
        try:
            outcomes[x] = await batcher.predict(x)
        except Exception as error:
            outcomes[x] = error

    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=8, max_wait_ms=0) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, 6)
                await wait_until(lambda: len(model.rows_per_step) >= 1)
                tg.start_soon(one, 99)  # its start fails; the running row does not
            model.fail_step_at = len(model.rows_per_step) + 2
            async with anyio.create_task_group() as tg:
                for x in (13, 20):
                    tg.start_soon(one, x)
            assert await batcher.predict(3) == alone(3)  # still serving
            stats = batcher.stats()
    assert outcomes[6] == alone(6)
    assert isinstance(outcomes[99], ValueError)
    assert all(isinstance(outcomes[x], RuntimeError) for x in (13, 20))
    assert (stats.completed, stats.failed) == (2, 3)
    check_settled(stats)


@pytest.mark.anyio
async def test_aclose_lets_open_streams_run_to_their_end() -> None:
    model = Counter(step_s=0.002)
    results: dict[int, list[int]] = {}

    async def one(x: int) -> None:
        results[x] = [item async for item in batcher.stream(x)]

    batcher = batchkit.StepBatcher(model, max_batch_size=2, max_wait_ms=0)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for x in (6, 13, 20):
                tg.start_soon(one, x)
            await wait_until(lambda: len(model.rows_per_step) >= 1)
            await batcher.aclose()
    assert results == {x: alone(x) for x in (6, 13, 20)}
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_a_reader_that_falls_behind_is_cut_off_and_the_others_continue() -> None:
    model = Counter(step_s=0.002)
    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=4, max_wait_ms=20, stream_buffer=3) as batcher:
            stalled = batcher.stream(6)  # 7 items, read one then stop reading
            async with contextlib.aclosing(stalled):
                assert await stalled.__anext__() == 6
                assert await batcher.predict(13) == alone(13)  # runs beside it, never waits for it
                with pytest.raises(batchkit.StreamBufferFullError):
                    async for _ in stalled:
                        pass
            stats = batcher.stats()
    assert (stats.completed, stats.failed) == (1, 1)
    check_settled(stats)


def test_a_step_model_needs_its_four_methods() -> None:
    class Half:
        def start(self, inputs: list[Any]) -> Any: ...
        def step(self, state: Any) -> Any: ...

    with pytest.raises(TypeError, match="join, select"):
        batchkit.StepBatcher(Half())  # type: ignore[arg-type]


# -- generator models (request-level) ----------------------------------------------------------


@pytest.mark.anyio
async def test_items_arrive_before_the_generator_ends() -> None:
    gate = threading.Event()

    def model(batch: list[str]) -> Iterator[list[str]]:
        yield [f"{x}-first" for x in batch]
        if not gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        yield [f"{x}-second" for x in batch]

    with anyio.fail_after(30):
        async with batchkit.Batcher(model, collate=None, max_wait_ms=0) as batcher:
            stream = batcher.stream("a")
            async with contextlib.aclosing(stream):
                assert await stream.__anext__() == "a-first"  # while the generator is held
                gate.set()
                assert [item async for item in stream] == ["a-second"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_end_closes_one_stream_and_predict_collects_the_items(kind: str) -> None:
    def sync_model(batch: list[int]) -> Iterator[list[Any]]:
        for step in range(4):
            yield [batchkit.END if step >= x else x * 10 + step for x in batch]

    async def async_model(batch: list[int]) -> Any:
        for items in sync_model(batch):
            await anyio.lowlevel.checkpoint()
            yield items

    model = sync_model if kind == "sync" else async_model
    results: dict[int, list[int]] = {}

    async def one(x: int) -> None:
        results[x] = await batcher.predict(x)

    with anyio.fail_after(30):
        async with batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=20) as batcher:
            async with anyio.create_task_group() as tg:
                for x in (1, 2, 4):
                    tg.start_soon(one, x)
            stats = batcher.stats()
    assert results == {1: [10], 2: [20, 21], 4: [40, 41, 42, 43]}
    assert stats.batches == 1
    check_settled(stats)


@pytest.mark.anyio
async def test_a_generator_that_raises_fails_the_open_streams_after_their_items() -> None:
    def model(batch: list[int]) -> Iterator[list[int]]:
        yield batch
        raise ValueError("broke mid-stream")

    items: list[int] = []
    with anyio.fail_after(30):
        async with batchkit.Batcher(model, collate=None, max_wait_ms=0) as batcher:
            with pytest.raises(ValueError, match="mid-stream"):
                await _collect(batcher.stream(3), items)
            assert items == [3]
            check_settled(batcher.stats())


@pytest.mark.anyio
async def test_misuse_is_refused_clearly() -> None:
    with anyio.fail_after(30):
        async with batchkit.Batcher(lambda b: b, collate=None) as plain:
            with pytest.raises(TypeError, match="needs a generator function"):
                async for _ in plain.stream(1):
                    pass

        def model(batch: list[int]) -> Iterator[list[int]]:
            yield batch

        async with batchkit.Batcher(model, collate=None) as streaming:
            with pytest.raises(TypeError, match="streams its outputs"):
                streaming.submit_threadsafe(1)


# -- regressions from the streaming review -------------------------------------------------------


class Endless:
    """Rows never finish by themselves; records the rows handed to join() and step()."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.joined: list[int] = []
        self.stepped: list[int] = []

    def start(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def join(self, a: list[Any], b: list[Any]) -> list[Any]:
        self.joined.append(len(a) + len(b))
        return a + b

    def select(self, state: list[Any], rows: list[int]) -> list[Any]:
        return [state[i] for i in rows]

    def step(self, state: list[Any]) -> tuple[list[Any], list[bool]]:
        self.stepped.append(len(state))
        time.sleep(self.step_s)
        return list(state), [False] * len(state)


@pytest.mark.anyio
async def test_rows_that_left_are_selected_away_before_newcomers_join() -> None:
    """An expired row's place goes to a queued request: join() never sees more than max_batch_size rows."""
    model = Endless(step_s=0.05)

    async def read(x: str, seconds: float, timeout_ms: float | None = None) -> None:
        with anyio.move_on_after(seconds), contextlib.suppress(batchkit.RequestTimeoutError):
            async for _ in batcher.stream(x, timeout_ms=timeout_ms):
                pass

    with anyio.fail_after(30):
        async with batchkit.StepBatcher(model, max_batch_size=2, max_wait_ms=1) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read, "a", 0.6)
                tg.start_soon(read, "b", 0.6, 120)  # expires mid-step
                await wait_until(lambda: len(model.stepped) >= 1)
                tg.start_soon(read, "c", 0.3)  # queued: the state is full until b leaves
    assert model.joined, "c never joined"
    assert max(model.joined) <= 2
    assert max(model.stepped) <= 2


@pytest.mark.anyio
async def test_run_timeout_bounds_each_step_of_an_async_generator() -> None:
    async def model(batch: list[int]) -> Any:
        yield batch
        await anyio.sleep(30)  # a step that hangs
        yield batch

    items: list[int] = []
    with anyio.fail_after(20):
        async with batchkit.Batcher(model, collate=None, max_wait_ms=0, run_timeout_ms=200) as batcher:
            with pytest.raises(batchkit.ModelTimeoutError):
                await _collect(batcher.stream(1), items)
            assert items == [1]
            assert batcher.stats().hung_batches == 1


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @batchkit.batch(collate=None, max_wait_ms=5)
    def sync_steps(self, batch: list[int]) -> Iterator[list[int]]:
        for step in range(3):
            yield [x * self.factor + step for x in batch]

    @batchkit.batch(collate=None, max_wait_ms=5)
    async def async_steps(self, batch: list[int]) -> Any:
        for step in range(2):
            await anyio.lowlevel.checkpoint()
            yield [x * self.factor + step for x in batch]


@pytest.mark.anyio
async def test_generator_methods_stream_like_generator_functions() -> None:
    scaler = Scaler(10)
    with anyio.fail_after(20):
        assert await scaler.sync_steps(1) == [10, 11, 12]
        assert [item async for item in scaler.async_steps.stream(2)] == [20, 21]


def test_a_step_thread_stops_when_its_loop_is_closed_without_cleanup() -> None:
    import asyncio
    import logging

    model = Endless(step_s=0.001)
    batcher = batchkit.StepBatcher(model, max_batch_size=4, max_wait_ms=1, name="orphaned-steps")

    async def start() -> Any:
        stream = batcher.stream(1)
        await asyncio.wait_for(stream.__anext__(), 5)
        return stream

    logging.disable(logging.CRITICAL)  # the pending tasks of the closed loop
    try:
        loop = asyncio.new_event_loop()
        kept = loop.run_until_complete(start())
        loop.close()  # no aclose(), no task cancellation
        time.sleep(0.1)
        before = len(model.stepped)
        time.sleep(0.3)
        assert len(model.stepped) - before <= 1  # at most the step under way
        deadline = time.monotonic() + 5
        while any(t.name.startswith("batchkit-orphaned") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the step thread never stopped"
            time.sleep(0.01)
        del kept
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.anyio
async def test_aclose_returns_after_the_step_thread_has_exited() -> None:
    for _ in range(10):
        batcher = batchkit.StepBatcher(Counter(), max_batch_size=4, max_wait_ms=0, name="joined-steps")
        with anyio.fail_after(10):
            async with batcher:
                assert await batcher.predict(3) == alone(3)
        assert not [t for t in threading.enumerate() if t.name.startswith("batchkit-joined-steps")]
