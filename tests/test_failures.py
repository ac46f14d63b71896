"""Model errors, wrong outputs, cancellation, deadlines and a full queue."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from tests.conftest import RecordingModel
from tests.test_batching import wait_until

pytestmark = pytest.mark.anyio


def check_invariant(stats: batchkit.BatcherStats) -> None:
    ended = stats.completed + stats.failed + stats.rejected + stats.timed_out + stats.cancelled
    assert stats.requests == ended + stats.pending + stats.in_flight, stats


class Boom(ValueError):
    pass


async def test_model_exception_reaches_every_caller_of_the_batch_and_the_batcher_keeps_serving() -> None:
    calls = 0

    def model(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Boom("bad batch")
        return [x * 2 for x in batch]

    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=50, collate=None) as batcher:
        errors: list[BaseException] = []

        async def caller(x: int) -> None:
            try:
                await batcher.predict(x)
            except Boom as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(caller, i)
        assert len(errors) == 4
        assert all(type(e) is Boom and str(e) == "bad batch" for e in errors)
        assert len({id(e) for e in errors}) == 4  # one object each: tracebacks do not pile up
        assert await batcher.predict(5) == 10
    stats = batcher.stats()
    assert (stats.failed, stats.completed) == (4, 1)
    check_invariant(stats)


async def test_async_model_exception_reaches_callers() -> None:
    async def model(batch: list[int]) -> list[int]:
        raise KeyError("nope")

    async with batchkit.Batcher(model, collate=None) as batcher:
        with pytest.raises(KeyError, match="nope"):
            await batcher.predict(1)
        assert batcher.stats().failed == 1


@pytest.mark.parametrize("returned", [lambda b: b[:-1], lambda b: [*b, 0]])
async def test_wrong_output_length_fails_the_batch_with_both_sizes(returned: Any) -> None:
    async with batchkit.Batcher(returned, max_batch_size=3, max_wait_ms=50, collate=None) as batcher:
        outcomes: list[BaseException] = []

        async def caller(x: int) -> None:
            with pytest.raises(batchkit.BatchSizeMismatchError) as info:
                await batcher.predict(x)
            outcomes.append(info.value)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(caller, i)
    assert len(outcomes) == 3
    message = str(outcomes[0])
    assert "3 inputs" in message
    assert ("2 outputs" in message) or ("4 outputs" in message)
    assert isinstance(outcomes[0], batchkit.BatchkitError)


async def test_wrong_output_length_auto_collate_numpy() -> None:
    failures = []

    async def caller(x: np.ndarray) -> None:
        with pytest.raises(batchkit.BatchSizeMismatchError, match="1 outputs for a batch of 2 inputs") as info:
            await batcher.predict(x)
        failures.append(info.value)

    async with batchkit.Batcher(lambda b: b[:1], max_batch_size=2, max_wait_ms=50) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, np.zeros(2))
            tg.start_soon(caller, np.ones(2))
    assert len(failures) == 2


async def test_scalar_output_is_not_a_batch() -> None:
    async with batchkit.Batcher(lambda b: float(b.sum())) as batcher:
        with pytest.raises(batchkit.BatchSizeMismatchError, match="expected a batch of 1 outputs"):
            await batcher.predict(np.zeros(3))
        async with batchkit.Batcher(lambda b: 3, collate=None) as other:
            with pytest.raises(batchkit.BatchSizeMismatchError, match="int"):
                await other.predict(1)


async def test_cancelled_before_dispatch_is_never_sent_to_the_model() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=1, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            await wait_until(model.entered.is_set)
            with anyio.CancelScope() as doomed:
                doomed.cancel()  # cancelled while queued behind the running batch
                await batcher.predict("cancelled")
            tg.start_soon(batcher.predict, "kept")
            await wait_until(lambda: batcher.stats().pending == 1)
            model.gate.set()
    assert "cancelled" not in model.seen
    assert sorted(model.seen) == ["kept", "running"]
    stats = batcher.stats()
    assert stats.cancelled == 1
    assert stats.completed == 2
    check_invariant(stats)


async def test_cancelled_while_queued_with_a_scope_that_fires_later() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=1, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            await wait_until(model.entered.is_set)

            async def doomed_caller(scope: anyio.CancelScope) -> None:
                with scope:
                    await batcher.predict("cancelled")

            scope = anyio.CancelScope()
            tg.start_soon(doomed_caller, scope)
            await wait_until(lambda: batcher.stats().pending == 1)
            scope.cancel()
            await wait_until(lambda: batcher.stats().pending == 0)
            model.gate.set()
    assert model.seen == ["running"]
    assert batcher.stats().cancelled == 1


async def test_cancel_after_dispatch_harms_no_other_caller() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=50, collate=None) as batcher:
        results: dict[int, Any] = {}
        scope = anyio.CancelScope()

        async def caller(i: int) -> None:
            results[i] = await batcher.predict(i)

        async def doomed() -> None:
            with scope:
                await batcher.predict(99)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(caller, i)
            tg.start_soon(doomed)
            await wait_until(model.entered.is_set)  # all four are in the running batch
            scope.cancel()
            await anyio.sleep(0.01)
            model.gate.set()
        assert results == {0: 0, 1: 1, 2: 2}
        assert sorted(model.seen) == [0, 1, 2, 99]
        assert await batcher.predict(7) == 7  # still serving
    stats = batcher.stats()
    assert stats.cancelled == 1
    assert stats.completed == 4
    check_invariant(stats)


@pytest.mark.parametrize("per_call", [True, False])
async def test_deadline_before_dispatch_times_out_and_is_never_sent(per_call: bool) -> None:
    model = RecordingModel(gated=True)
    options = {} if per_call else {"timeout_ms": 20}
    call_options = {"timeout_ms": 20} if per_call else {}
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=1, collate=None, **options) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: batcher.predict("running", timeout_ms=60_000))
            await wait_until(model.entered.is_set)
            with pytest.raises(batchkit.RequestTimeoutError, match="timed out after 20 ms") as info:
                await batcher.predict("late", **call_options)
            assert isinstance(info.value, TimeoutError)
            model.gate.set()
    assert model.seen == ["running"]
    stats = batcher.stats()
    assert stats.timed_out == 1
    check_invariant(stats)


async def test_deadline_while_running_fails_the_caller_but_not_its_batch_mates() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=50, collate=None) as batcher:
        results: dict[str, Any] = {}

        async def patient() -> None:
            results["patient"] = await batcher.predict("patient")

        async def hasty() -> None:
            try:
                await batcher.predict("hasty", timeout_ms=30)
            except batchkit.RequestTimeoutError as exc:
                results["hasty"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            tg.start_soon(hasty)
            await wait_until(model.entered.is_set)
            await wait_until(lambda: "hasty" in results)
            model.gate.set()
    assert results["patient"] == "patient"
    assert isinstance(results["hasty"], batchkit.RequestTimeoutError)
    assert sorted(model.seen) == ["hasty", "patient"]
    stats = batcher.stats()
    assert (stats.completed, stats.timed_out) == (1, 1)
    check_invariant(stats)


async def test_queue_full_fails_at_once_and_recovers() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue_size=2, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            await wait_until(model.entered.is_set)
            tg.start_soon(batcher.predict, "q1")
            tg.start_soon(batcher.predict, "q2")
            await wait_until(lambda: batcher.stats().pending == 2)
            with pytest.raises(batchkit.QueueFullError, match="max_queue_size=2"):
                await batcher.predict("refused")
            model.gate.set()
        assert await batcher.predict("after") == "after"
    assert "refused" not in model.seen
    stats = batcher.stats()
    assert stats.rejected == 1
    check_invariant(stats)


async def test_bad_input_fails_only_its_caller() -> None:
    model = RecordingModel(lambda b: b + 1)
    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=20) as batcher:
        outcomes: dict[str, Any] = {}

        async def good(i: int) -> None:
            outcomes[f"good{i}"] = await batcher.predict(np.full(2, i))

        async def bad() -> None:
            with pytest.raises(TypeError, match="auto-collate cannot batch an input of type str") as info:
                await batcher.predict("not an array")
            outcomes["bad"] = info.value

        async with anyio.create_task_group() as tg:
            tg.start_soon(good, 1)
            tg.start_soon(bad)
            tg.start_soon(good, 2)
    np.testing.assert_array_equal(outcomes["good1"], [2, 2])
    np.testing.assert_array_equal(outcomes["good2"], [3, 3])
    assert isinstance(outcomes["bad"], TypeError)
    stats = batcher.stats()
    assert (stats.completed, stats.failed) == (2, 1)
    check_invariant(stats)


async def test_invalid_per_call_timeout_is_a_clear_error() -> None:
    async with batchkit.Batcher(lambda b: b, collate=None) as batcher:
        with pytest.raises(ValueError, match="timeout_ms must be finite and greater than 0"):
            await batcher.predict(1, timeout_ms=0)
        check_invariant(batcher.stats())
