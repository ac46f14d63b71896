"""Shutdown under load: ``aclose()`` drains everything accepted and leaves nothing behind.

"Nothing behind" means: no thread whose name starts with ``batchkit-``, no task
on the event loop beyond those that were there before (``asyncio.all_tasks()`` /
trio's ``tasks_living``), and no request queued or in flight in the stats.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit
from tests._reliability import (
    Outcome,
    batchkit_threads,
    call,
    check_settled,
    living_tasks,
    settle_tasks,
    wait_until,
)

pytestmark = pytest.mark.anyio

LOAD = 5_000


def make_model(is_async: bool, seen: list[int]) -> Any:
    def sync_model(batch: list[int]) -> list[int]:
        seen.extend(batch)
        time.sleep(0.0005)
        return [x * 2 for x in batch]

    async def async_model(batch: list[int]) -> list[int]:
        seen.extend(batch)
        await anyio.sleep(0.0005)
        return [x * 2 for x in batch]

    return async_model if is_async else sync_model


@pytest.mark.parametrize("is_async", [False, True], ids=["sync-model", "async-model"])
async def test_aclose_with_thousands_in_flight_answers_every_accepted_request(is_async: bool) -> None:
    """5,000 requests queued (the batcher would wait an hour to flush a partial batch):
    ``aclose()`` flushes them at once, answers every one with its own value, and
    leaves no thread, task or queued request."""
    tasks_before = living_tasks()
    seen: list[int] = []
    name = f"drain-{is_async}"
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        make_model(is_async, seen), max_batch_size=64, max_wait_ms=3_600_000, collate=None, name=name
    )
    results: dict[int, Outcome] = {}

    async def one(i: int) -> None:
        results[i] = await call(batcher, i)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(LOAD):
                tg.start_soon(one, i)
            await wait_until(lambda: batcher.stats().requests == LOAD)
            assert batcher.stats().pending > 0  # a partial batch is still waiting
            await batcher.aclose()
            # every accepted request has its answer by the time aclose() returns
            assert len(results) == LOAD
    assert results == {i: ("value", 2 * i) for i in range(LOAD)}
    assert sorted(seen) == list(range(LOAD))
    stats = batcher.stats()
    check_settled(stats)
    assert stats.completed == LOAD
    assert max(stats.batch_sizes) <= 64
    assert not batchkit_threads(name)
    await settle_tasks(tasks_before)


async def test_predicts_racing_aclose_are_each_answered_or_refused() -> None:
    """Callers that keep sending while ``aclose()`` runs: each call is either answered
    with its value or refused with ``BatcherClosedError``; none hangs, none is lost."""
    tasks_before = living_tasks()
    seen: list[int] = []
    name = "race"
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        make_model(False, seen), max_batch_size=16, max_wait_ms=1, collate=None, name=name
    )
    outcomes: list[tuple[int, Outcome]] = []
    counter = iter(range(10**9))

    async def sender() -> None:
        while True:
            x = next(counter)
            outcome = await call(batcher, x)
            outcomes.append((x, outcome))
            if isinstance(outcome[1], batchkit.BatcherClosedError):
                return
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(sender)
            await wait_until(lambda: len(outcomes) > 1_000)
            await batcher.aclose()
    refused = {x for x, o in outcomes if isinstance(o[1], batchkit.BatcherClosedError)}
    answered = {x: o for x, o in outcomes if x not in refused}
    assert len(refused) == 200  # each sender stops at its first refusal
    assert all(o == ("value", 2 * x) for x, o in answered.items())
    assert sorted(seen) == sorted(answered)  # the model saw exactly the answered requests
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.rejected) == (len(answered), len(refused))
    assert not batchkit_threads(name)
    await settle_tasks(tasks_before)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync-model", "async-model"])
async def test_cancelling_the_scope_that_owns_callers_and_batcher_leaves_nothing_hanging(is_async: bool) -> None:
    """``async with batcher`` and 1,000 callers inside a scope that is cancelled while
    a batch runs: the scope exits promptly (``aclose()`` is cancelled too, but the
    drain goes on in the background), the running batch finishes, and then no
    thread, task or request is left."""
    tasks_before = living_tasks()
    gate = threading.Event()
    entered = threading.Event()

    def sync_model(batch: list[int]) -> list[int]:
        entered.set()
        gate.wait(timeout=30)
        return batch

    async def async_model(batch: list[int]) -> list[int]:
        entered.set()
        while not gate.is_set():
            await anyio.sleep(0.001)
        return batch

    name = f"cancelled-owner-{is_async}"
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        async_model if is_async else sync_model, max_batch_size=32, max_wait_ms=5, collate=None, name=name
    )
    outcomes: list[Outcome] = []

    async def one(i: int) -> None:
        outcome: Outcome = ("cancelled", None)
        try:
            outcome = await call(batcher, i)
        finally:
            outcomes.append(outcome)

    with anyio.fail_after(20):
        with anyio.CancelScope() as owner:
            async with batcher:
                async with anyio.create_task_group() as tg:
                    for i in range(1_000):
                        tg.start_soon(one, i)
                    await wait_until(entered.is_set)
                    await wait_until(lambda: batcher.stats().requests == 1_000)
                    owner.cancel()
        assert owner.cancelled_caught
        assert len(outcomes) == 1_000  # every caller ended (cancelled)
        assert batcher.closed
        gate.set()  # the batch that was running finishes; the background drain ends
        await wait_until(lambda: not batchkit_threads(name))
        await settle_tasks(tasks_before)
    stats = batcher.stats()
    check_settled(stats)
    assert stats.cancelled == 1_000


async def test_aclose_cancelled_midway_still_drains_in_the_background() -> None:
    """A caller of ``aclose()`` that gives up (``move_on_after``) does not stop the drain:
    every accepted request is still answered and the worker still exits."""
    tasks_before = living_tasks()
    gate = threading.Event()

    def model(batch: list[int]) -> list[int]:
        gate.wait(timeout=30)
        return batch

    name = "impatient-close"
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        model, max_batch_size=8, max_wait_ms=3_600_000, collate=None, name=name
    )
    results: dict[int, Outcome] = {}

    async def one(i: int) -> None:
        results[i] = await call(batcher, i)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
            await wait_until(lambda: batcher.stats().requests == 100)
            with anyio.move_on_after(0.01) as scope:
                await batcher.aclose()
            assert scope.cancelled_caught  # gave up: the model is still gated
            gate.set()
        await wait_until(lambda: not batchkit_threads(name))
        await settle_tasks(tasks_before)
    assert results == {i: ("value", i) for i in range(100)}
    check_settled(batcher.stats())


@pytest.mark.parametrize("is_async", [False, True], ids=["sync-model", "async-model"])
async def test_many_batchers_opened_and_closed_leave_no_threads_or_tasks(is_async: bool) -> None:
    """Starting and closing 50 batchers, each with work in flight at ``aclose()``,
    leaves exactly the threads and tasks there were before."""
    tasks_before = living_tasks()
    threads_before = {t.ident for t in threading.enumerate()}
    for n in range(50):
        seen: list[int] = []
        batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
            make_model(is_async, seen), max_batch_size=8, max_wait_ms=1, collate=None, name=f"churn{n}"
        )
        results: list[Outcome] = []

        async def one(i: int, batcher: batchkit.Batcher[int, int] = batcher, results: list[Outcome] = results) -> None:
            results.append(await call(batcher, i))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
                await wait_until(lambda b=batcher: b.stats().requests == 20)  # type: ignore[misc]
                await batcher.aclose()
        assert sorted(results) == [("value", 2 * i) for i in range(20)]
        check_settled(batcher.stats())
    await settle_tasks(tasks_before)
    assert not [t for t in threading.enumerate() if t.ident not in threads_before and t.name.startswith("batchkit-")]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_event_loop_that_ends_without_aclose_leaves_nothing_behind(backend: str) -> None:
    """A batcher that is never closed, whose event loop ends while a batch runs and
    requests are queued: the callers are cancelled with the loop, the worker stops,
    its thread exits once the running call returns, and the batcher serves again on
    the next event loop."""
    gate = threading.Event()
    entered = threading.Event()

    def model(batch: list[int]) -> list[int]:
        entered.set()
        gate.wait(timeout=30)
        return batch

    name = f"orphan-{backend}"
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        model, max_batch_size=4, max_wait_ms=1, collate=None, name=name
    )

    async def main() -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(batcher.predict, i)
                await wait_until(entered.is_set)
                await wait_until(lambda: batcher.stats().requests == 100)
                tg.cancel_scope.cancel()
        # returns without aclose(): the worker is still running when the loop ends

    anyio.run(main, backend=backend)
    gate.set()
    deadline = time.monotonic() + 10
    while batchkit_threads(name) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not batchkit_threads(name)
    check_settled(batcher.stats())

    async def again() -> int:
        with anyio.fail_after(10):
            async with batcher:
                return await batcher.predict(7)

    assert anyio.run(again, backend=backend) == 7
    check_settled(batcher.stats())
    assert not batchkit_threads(name)
