"""Acceptance suite for issue #11 (core, second pass), through the public API only.

One test (or a few) per bug in the issue's list. Each one fails on the core that
the issue describes and passes once its "Deliver" items are in. Only ``import
batchkit`` is used: no private module, attribute or method. Every wait is
bounded (``anyio.fail_after`` / ``asyncio.wait_for``), so a hang is a failure,
never a stuck run; no test asserts an absolute time.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from tests._reliability import Outcome, batchkit_threads, check_invariant, check_settled, wait_until
from tests.conftest import RecordingModel


class Payload:
    """An input (or output) that a weak reference can watch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Payload({self.n})"


async def outcome_of(batcher: batchkit.Batcher[Any, Any], x: Any, **kwargs: Any) -> Outcome:
    """How one ``predict`` ended, BaseExceptions raised by the call included (the model's own)."""
    try:
        return ("value", await batcher.predict(x, **kwargs))
    except BaseException as exc:
        return ("error", exc)


def error_of(outcome: Outcome) -> Any:
    """The exception a call ended with (fails the test if it returned a value)."""
    kind, value = outcome
    assert kind == "error", f"expected an error, got {outcome}"
    return value


async def outcomes(batcher: batchkit.Batcher[Any, Any], inputs: list[Any], **kwargs: Any) -> list[Outcome]:
    """``predict`` every input concurrently; one outcome per input, in order."""
    results: list[Outcome] = [("error", None)] * len(inputs)

    async def one(i: int) -> None:
        results[i] = await outcome_of(batcher, inputs[i], **kwargs)

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)
    return results


async def collect_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Run the garbage collector and the loop until ``condition`` holds (or give up)."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.01)


# -- 1. max_queue_size bounds memory: dead requests drop their inputs at once -------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["timed_out", "cancelled"])
async def test_dead_requests_release_their_inputs_while_the_model_is_busy(how: str) -> None:
    model = RecordingModel(gated=True)
    batcher = batchkit.Batcher(model, max_batch_size=4, max_wait_ms=1, max_queue_size=8, collate=None)
    refs: list[weakref.ref[Payload]] = []
    ended: list[str] = []

    async def doomed(n: int, scope: anyio.CancelScope) -> None:
        payload = Payload(n)
        refs.append(weakref.ref(payload))
        try:
            with scope:
                await batcher.predict(payload, timeout_ms=20 if how == "timed_out" else None)
        except batchkit.RequestTimeoutError:
            ended.append("timed_out")
        else:
            ended.append("cancelled" if scope.cancelled_caught else "answered")

    with anyio.fail_after(10):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            try:
                await wait_until(model.entered.is_set)  # the model is busy from now on
                for round_ in range(3):  # 24 dead requests through a queue of 8
                    scopes = [anyio.CancelScope() for _ in range(8)]
                    for i, scope in enumerate(scopes):
                        tg.start_soon(doomed, 8 * round_ + i, scope)
                    await wait_until(lambda r=round_: batcher.stats().requests == 1 + 8 * (r + 1))
                    if how == "cancelled":
                        for scope in scopes:
                            scope.cancel()
                    await wait_until(lambda r=round_: len(ended) == 8 * (r + 1))
                assert ended == [how] * 24
                gc.collect()
                held = sum(r() is not None for r in refs)
                assert held == 0, f"{held} of 24 {how} requests still hold their input while the model is busy"
            finally:
                model.gate.set()
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, getattr(stats, how)) == (1, 24)
    gc.collect()
    assert all(r() is None for r in refs)  # the test itself holds none of them


# -- 2. an answered request is referenced by nothing of batchkit's ------------------------------


class SteppedModel:
    """A synchronous model that runs one batch per token the test releases; keeps no input."""

    def __init__(self) -> None:
        self.tokens = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, batch: list[Payload]) -> list[Payload]:
        self.calls += 1
        if not self.tokens.acquire(timeout=10):
            raise RuntimeError("test never released the batch")
        return [Payload(-x.n) for x in batch]


@pytest.mark.anyio
@pytest.mark.parametrize("special", ["priority", "timeout_ms"])
async def test_answered_requests_are_not_kept_alive_by_an_old_queued_one(special: str) -> None:
    # The old request is the least urgent; the newer ones have their own priority/deadline.
    old_kwargs: dict[str, Any] = {"priority": -1} if special == "priority" else {"timeout_ms": 60_000}
    new_kwargs: dict[str, Any] = {"priority": 1} if special == "priority" else {"timeout_ms": 30_000}
    model = SteppedModel()
    batcher = batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, collate=None)
    input_refs: dict[int, weakref.ref[Payload]] = {}
    result_refs: dict[int, weakref.ref[Payload]] = {}
    answered: list[int] = []

    async def newer(n: int) -> None:
        payload = Payload(n)
        input_refs[n] = weakref.ref(payload)
        result = await batcher.predict(payload, **new_kwargs)
        assert result.n == -n
        result_refs[n] = weakref.ref(result)
        answered.append(n)

    with anyio.fail_after(10):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, Payload(1000))
            try:
                await wait_until(lambda: model.calls == 1)  # the model is busy
                tg.start_soon(lambda: batcher.predict(Payload(2000), **old_kwargs))
                await wait_until(lambda: batcher.stats().pending == 1)
                for n in range(12):
                    tg.start_soon(newer, n)
                await wait_until(lambda: batcher.stats().pending == 13)
                model.tokens.release(4)  # the first batch and three batches of two newer requests
                await wait_until(lambda: len(answered) == 6)
                assert batcher.stats().pending == 5  # the old request is still queued
                gc.collect()
                kept_inputs = [n for n in answered if input_refs[n]() is not None]
                kept_results = [n for n in answered if result_refs[n]() is not None]
                assert not kept_inputs, f"answered requests' inputs still referenced: {kept_inputs}"
                assert not kept_results, f"answered requests' results still referenced: {kept_results}"
            finally:
                model.tokens.release(100)
    check_settled(batcher.stats())
    assert batcher.stats().completed == 14
    gc.collect()
    assert all(r() is None for r in [*input_refs.values(), *result_refs.values()])  # nor does the test


# -- 3. a worker that ends mid-batch leaves no caller waiting (asyncio) ---------------------------


def test_worker_cancelled_mid_batch_leaves_no_caller_waiting(no_thread_leak: None) -> None:
    release = threading.Event()

    async def within(awaitable: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(awaitable, 5)
        except TimeoutError:
            raise AssertionError(f"{what} hung: no answer within 5 s") from None

    def model(batch: list[Any]) -> list[Any]:
        if "held" in batch and not release.wait(timeout=10):
            raise RuntimeError("test never released the held batch")
        return batch

    batcher = batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, collate=None, name="acc-worker-ends")

    async def main() -> None:
        held = asyncio.create_task(outcome_of(batcher, "held"))
        with anyio.fail_after(5):
            await wait_until(lambda: batcher.stats().in_flight == 1)
        # A shutdown hook (or a crash) ends every other task while the sync batch runs.
        me = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not me and task is not held:
                task.cancel()
        await asyncio.sleep(0.01)
        during = asyncio.create_task(outcome_of(batcher, "during"))
        for _ in range(200):  # give it a chance to be served before the held batch ends
            if during.done():
                break
            await asyncio.sleep(0.005)
        release.set()
        held_outcome = await within(held, "the in-flight caller")
        assert held_outcome == ("value", "held") or isinstance(held_outcome[1], batchkit.BatcherClosedError), (
            held_outcome
        )
        assert await within(during, "a predict made while the old batch ran") == ("value", "during")
        for i in range(4):
            assert await within(batcher.predict(i), f"later predict #{i}") == i
        concurrent = asyncio.gather(*(batcher.predict(i) for i in range(4)))
        assert await within(concurrent, "4 concurrent later predicts") == [0, 1, 2, 3]
        await within(batcher.aclose(), "aclose()")

    asyncio.run(main())
    check_settled(batcher.stats())


# -- 4. an async model raising CancelledError by itself fails only its own batch -----------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_model_raising_cancelled_error_fails_only_its_own_batch() -> None:
    async def model(batch: list[str]) -> list[str]:
        if "poison" in batch:  # it awaits something another task cancelled
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            loop.call_soon(future.cancel)
            await future
        return [x.upper() for x in batch]

    batcher = batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, collate=None)
    with anyio.fail_after(10):
        async with batcher:
            got = await outcomes(batcher, ["poison", "a", "b", "c"])
            assert got[0][0] == "error", got[0]
            assert got[1:] == [("value", "A"), ("value", "B"), ("value", "C")], (
                f"requests queued behind the failing batch: {[(k, type(v).__name__) for k, v in got[1:]]}"
            )
            assert await batcher.predict("d") == "D"
            assert not batcher.closed
            stats = batcher.stats()
            check_settled(stats)
            assert (stats.failed, stats.completed) == (1, 4)
    check_settled(batcher.stats())


# -- 5. a loop closed without cancelling its tasks leaves a usable batcher -----------------------


def test_batcher_works_on_the_next_loop_after_its_loop_was_closed_uncleanly(no_thread_leak: None) -> None:
    batcher = batchkit.Batcher(lambda b: [x * 2 for x in b], collate=None, name="acc-closed-loop")
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(batcher.predict(1)) == 2
    finally:
        loop.close()  # without cancelling its tasks: the worker never hears of it

    async def main() -> int:
        result = await asyncio.wait_for(batcher.predict(2), 5)
        await asyncio.wait_for(batcher.aclose(), 5)
        return result

    assert asyncio.run(main()) == 4
    deadline = time.monotonic() + 5
    while batchkit_threads("acc-closed-loop") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batchkit_threads("acc-closed-loop"), batchkit_threads("acc-closed-loop")
    check_settled(batcher.stats())
    gc.collect()


# -- 6. the flush decision honours deadlines ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["per_call", "batcher_default"])
async def test_a_deadline_shorter_than_max_wait_flushes_the_batch_in_time(where: str) -> None:
    model = RecordingModel()
    default = {"timeout_ms": 200} if where == "batcher_default" else {}
    per_call = {"timeout_ms": 200} if where == "per_call" else {}
    batcher = batchkit.Batcher(model, max_batch_size=8, max_wait_ms=1000, collate=None, **default)
    with anyio.fail_after(10):
        async with batcher:
            got = await outcome_of(batcher, "x", **per_call)
    assert got == ("value", "x"), f"{got}; the model saw {model.seen}"
    assert model.seen == ["x"]
    check_settled(batcher.stats())


# -- 7. asyncio: a caller cancelled in the worker's wake-up tick is never dispatched --------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_caller_cancelled_in_the_wakeup_tick_is_never_sent_to_the_model() -> None:
    model = RecordingModel()
    batcher = batchkit.Batcher(model, max_batch_size=2, max_wait_ms=60_000, collate=None)
    loop = asyncio.get_running_loop()
    with anyio.fail_after(10):
        async with batcher:
            await asyncio.sleep(0.01)
            first = loop.create_task(batcher.predict("first"))
            await wait_until(lambda: batcher.stats().pending == 1)
            await asyncio.sleep(0.02)  # the worker looked at the group of one and sleeps again
            # In one tick: the second push fills the group and wakes the worker; then the
            # first caller is cancelled, before the worker (or that caller) runs again.
            second = loop.create_task(batcher.predict("second"))
            loop.call_soon(first.cancel)
            await asyncio.sleep(0.02)
            assert first.cancelled()
            await batcher.aclose()  # flushes whatever is still queued
            assert await second == "second"
    assert "first" not in model.seen, f"the model computed a cancelled caller's input: {model.batches}"
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.cancelled, stats.completed) == (1, 1)


# -- 8. the out-of-memory cap recovers --------------------------------------------------------------


class OomModel:
    """Raises MemoryError for a poison input, or for batches larger than ``oom_above``."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.oom_above: int | None = None

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        if -1 in batch or (self.oom_above is not None and len(batch) > self.oom_above):
            raise MemoryError("out of memory")
        return [x * 2 for x in batch]


@pytest.mark.anyio
async def test_an_input_that_runs_out_of_memory_alone_does_not_shrink_batches() -> None:
    model = OomModel()
    batcher = batchkit.Batcher(model, max_batch_size=8, max_wait_ms=50, collate=None)
    with anyio.fail_after(10):
        async with batcher:
            for round_ in range(3):
                got = await outcomes(batcher, [*range(7), -1])
                assert got[:7] == [("value", 2 * i) for i in range(7)], got
                assert isinstance(error_of(got[7]), MemoryError), got[7]
                limit = batcher.stats().batch_size_limit
                assert limit == 8, f"round {round_}: one poison input shrank batch_size_limit to {limit}"
                check_settled(batcher.stats())


@pytest.mark.anyio
async def test_the_oom_cap_rises_again_after_clean_batches() -> None:
    model = OomModel()
    batcher = batchkit.Batcher(model, max_batch_size=32, max_wait_ms=20, collate=None)
    with anyio.fail_after(20):
        async with batcher:
            model.oom_above = 8
            assert await outcomes(batcher, list(range(32))) == [("value", 2 * i) for i in range(32)]
            assert batcher.stats().batch_size_limit <= 8  # a genuine OOM caps the batch size
            model.oom_above = None  # memory is back
            rounds = 0
            while batcher.stats().batch_size_limit <= 8 and rounds < 100:
                assert await outcomes(batcher, list(range(32))) == [("value", 2 * i) for i in range(32)]
                rounds += 1
            limit = batcher.stats().batch_size_limit
            assert limit > 8, (
                f"the OOM cap never rose: batch_size_limit {limit} after {rounds} rounds of 32 healthy requests"
            )
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_configure_max_batch_size_resets_the_oom_cap() -> None:
    model = OomModel()
    batcher = batchkit.Batcher(model, max_batch_size=32, max_wait_ms=50, collate=None)
    with anyio.fail_after(10):
        async with batcher:
            model.oom_above = 8
            await outcomes(batcher, list(range(32)))
            assert batcher.stats().batch_size_limit <= 8
            model.oom_above = None
            batcher.configure(max_batch_size=64)
            limit = batcher.stats().batch_size_limit
            assert limit == 64, f"configure(max_batch_size=64) left batch_size_limit at the OOM cap: {limit}"
            before = len(model.sizes)
            assert await outcomes(batcher, list(range(64))) == [("value", 2 * i) for i in range(64)]
            batches = model.sizes[before:]
            assert len(batches) <= 4, f"64 healthy requests ran as {len(batches)} batches: {batches}"
    check_settled(batcher.stats())


# -- 9. @batchkit.batch on methods --------------------------------------------------------------------


@pytest.mark.anyio
async def test_batch_on_dunder_call_uses_one_batcher_per_instance() -> None:
    class Model:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @batchkit.batch(max_batch_size=8, max_wait_ms=20, collate=None)
        def __call__(self, batch: list[int]) -> list[int]:
            self.sizes.append(len(batch))
            return [x * 2 for x in batch]

    threads_before = len(batchkit_threads())
    model = Model()
    with anyio.fail_after(10):
        for i in range(5):
            assert await model(i) == 2 * i
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await model(i)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        assert results == {i: 2 * i for i in range(8)}
        new_threads = len(batchkit_threads()) - threads_before
        try:
            assert max(model.sizes) > 1, f"obj(x) never batched: batch sizes {model.sizes}"
            assert new_threads <= 1, f"{new_threads} new batchkit threads for one instance's 13 calls"
        finally:
            await model.__call__.aclose()


@pytest.mark.anyio
async def test_batch_method_through_an_alias_uses_one_batcher_per_instance() -> None:
    class Model:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @batchkit.batch(max_batch_size=8, max_wait_ms=20, collate=None)
        def predict(self, batch: list[int]) -> list[int]:
            self.sizes.append(len(batch))
            return [x * 2 for x in batch]

        run = predict

    threads_before = len(batchkit_threads())
    model = Model()
    with anyio.fail_after(10):
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            method = model.predict if i % 2 else model.run
            results[i] = await method(i)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        assert results == {i: 2 * i for i in range(8)}
        new_threads = len(batchkit_threads()) - threads_before
        try:
            assert model.predict is model.predict, "obj.predict builds a new batcher on each access"
            assert model.run is model.predict, "the alias and the method are two batchers"
            assert max(model.sizes) > 1, f"calls through the method and its alias never batched: {model.sizes}"
            assert new_threads <= 1, f"{new_threads} new batchkit threads for one instance"
        finally:
            await model.predict.aclose()
            await model.run.aclose()


@pytest.mark.anyio
async def test_dropped_instances_release_their_batchers() -> None:
    class Model:
        @batchkit.batch(max_batch_size=4, max_wait_ms=1, collate=None)
        def predict(self, batch: list[int]) -> list[int]:
            return [x + 1 for x in batch]

    threads_before = len(batchkit_threads())
    refs: list[weakref.ref[Model]] = []
    with anyio.fail_after(20):
        for i in range(20):
            instance = Model()
            assert await instance.predict(i) == i + 1
            refs.append(weakref.ref(instance))
        del instance
        released = await collect_until(
            lambda: all(r() is None for r in refs) and len(batchkit_threads()) <= threads_before
        )
    alive = sum(r() is not None for r in refs)
    extra = len(batchkit_threads()) - threads_before
    assert released, f"after dropping 20 used instances: {alive} still alive, {extra} extra batchkit threads"


@pytest.mark.anyio
async def test_configure_on_the_class_level_batcher_reaches_every_instance() -> None:
    class Model:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @batchkit.batch(max_batch_size=8, max_wait_ms=20, collate=None)
        def predict(self, batch: list[int]) -> list[int]:
            self.sizes.append(len(batch))
            return batch

    existing = Model()
    with anyio.fail_after(10):
        assert await existing.predict(1) == 1  # its batcher exists and runs
        Model.predict.configure(max_batch_size=3)
        future = Model()
        try:
            assert existing.predict.max_batch_size == 3, "configure() did not reach an existing instance"
            assert future.predict.max_batch_size == 3, "configure() did not reach a new instance"
            assert await outcomes(existing.predict, list(range(9))) == [("value", i) for i in range(9)]
            assert max(existing.sizes[1:]) <= 3, existing.sizes
        finally:
            await existing.predict.aclose()
            await future.predict.aclose()


# -- 10. batch_cost results are checked ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("bad", [math.nan, math.inf, -8.0], ids=["nan", "inf", "negative"])
async def test_a_nan_infinite_or_negative_batch_cost_fails_that_caller(bad: float) -> None:
    model = RecordingModel()
    batcher = batchkit.Batcher(
        model, max_batch_size=8, max_wait_ms=20, collate=None, batch_cost=lambda x: x[1], max_batch_cost=10
    )
    inputs = [("bad", bad), ("a", 6.0), ("b", 6.0), ("c", 6.0)]
    with anyio.fail_after(10):
        async with batcher:
            got = await outcomes(batcher, inputs)
    assert isinstance(error_of(got[0]), ValueError), f"cost {bad}: the caller got {got[0]}"
    assert got[1:] == [("value", x) for x in inputs[1:]], got[1:]
    assert all(name != "bad" for name, _ in model.seen), model.batches
    assert all(sum(cost for _, cost in b) <= 10 for b in model.batches), model.batches
    check_settled(batcher.stats())


# -- 11. input checks ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_input_that_cannot_be_batched_raises_invalid_input_error() -> None:
    invalid = getattr(batchkit, "InvalidInputError", None)
    assert invalid is not None, "batchkit.InvalidInputError does not exist"
    assert issubclass(invalid, batchkit.BatchkitError)
    assert issubclass(invalid, TypeError)
    batcher = batchkit.Batcher(lambda b: b * 2, max_batch_size=4, max_wait_ms=5)
    with anyio.fail_after(10):
        async with batcher:
            got = await outcomes(batcher, ["a string", np.ones(2)])
    assert isinstance(error_of(got[0]), invalid), got[0]
    assert got[1][0] == "value", got[1]
    np.testing.assert_array_equal(got[1][1], np.full(2, 2.0))
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_auto_collate_batches_a_flat_list_of_numbers_like_a_1d_array() -> None:
    seen: list[Any] = []

    def model(batch: Any) -> Any:
        seen.append(batch)
        return batch * 2 if isinstance(batch, np.ndarray) else batch

    batcher = batchkit.Batcher(model, max_batch_size=4, max_wait_ms=50)
    inputs = [[float(i), i + 1.0, i + 2.0] for i in range(4)]  # JSON payloads
    with anyio.fail_after(10):
        async with batcher:
            got = await outcomes(batcher, inputs)
    described = [type(b).__name__ + (str(b.shape) if isinstance(b, np.ndarray) else f" of {len(b)}") for b in seen]
    assert all(isinstance(b, np.ndarray) and b.ndim == 2 and b.shape[1] == 3 for b in seen), (
        f"the model got {described}, not arrays of shape (B, 3)"
    )
    assert sum(b.shape[0] for b in seen) == 4
    for x, (kind, value) in zip(inputs, got, strict=True):
        assert kind == "value", value
        np.testing.assert_array_equal(value, np.asarray(x) * 2)
    check_settled(batcher.stats())


# -- also: async with, then predict and aclose, on both backends -------------------------------------


@pytest.mark.anyio
async def test_async_with_then_predict_and_aclose(no_thread_leak: None) -> None:
    model = RecordingModel()
    batcher = batchkit.Batcher(model, max_batch_size=4, max_wait_ms=5, collate=None, name="acc-async-with")
    with anyio.fail_after(10):
        async with batcher as entered:
            assert entered is batcher
            assert await outcomes(batcher, list(range(6))) == [("value", i) for i in range(6)]
            check_invariant(batcher.stats())
        assert batcher.closed
        with pytest.raises(batchkit.BatcherClosedError):
            await batcher.predict(7)
        await batcher.aclose()
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.rejected) == (6, 1)
    assert not batchkit_threads("acc-async-with")
