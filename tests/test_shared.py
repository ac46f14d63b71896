"""SharedExecutor: several batchers, at most N batches at once, fair turns by weight and urgency."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit
from batchkit._shared import Lease
from tests._reliability import check_settled


class Concurrency:
    """Model factory recording how many batches, of all its models, run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.order: list[str] = []

    def model(self, name: str, seconds: float) -> Callable[[list[int]], list[int]]:
        def run(batch: list[int]) -> list[int]:
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.order.append(name)
            time.sleep(seconds)
            with self.lock:
                self.active -= 1
            return [x + 1 for x in batch]

        return run

    def async_model(self, name: str, seconds: float) -> Callable[[list[int]], Any]:
        async def run(batch: list[int]) -> list[int]:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.order.append(name)
            await anyio.sleep(seconds)
            self.active -= 1
            return [x + 1 for x in batch]

        return run


@pytest.mark.anyio
@pytest.mark.parametrize("turns", [1, 2])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_at_most_n_batches_run_at_once_across_batchers(turns: int, kind: str) -> None:
    shared = batchkit.SharedExecutor(max_concurrent_batches=turns)
    seen = Concurrency()
    make = seen.model if kind == "sync" else seen.async_model
    extra: dict[str, Any] = {"replicas": 2} if kind == "sync" else {"max_concurrent_batches": 2}
    batchers = [
        batchkit.Batcher(make(f"m{i}", 0.003), collate=None, max_batch_size=4, executor=shared, name=f"m{i}", **extra)
        for i in range(3)
    ]
    results: dict[tuple[int, int], int] = {}

    async def one(which: int, x: int) -> None:
        results[which, x] = await batchers[which].predict(x)

    with anyio.fail_after(30):
        async with batchers[0], batchers[1], batchers[2]:
            async with anyio.create_task_group() as tg:
                for x in range(40):
                    for which in range(3):
                        tg.start_soon(one, which, x)
                    if x % 8 == 0:
                        await anyio.sleep(0.002)
            stats = shared.stats()  # while they are open
    assert results == {(w, x): x + 1 for w in range(3) for x in range(40)}
    assert seen.peak == turns  # reached, never exceeded
    assert stats.running == 0
    assert stats.waiting == 0
    assert sum(stats.batches.values()) == sum(b.stats().batches for b in batchers)
    for batcher in batchers:
        check_settled(batcher.stats())


@pytest.mark.anyio
async def test_saturated_batchers_share_the_device_by_weight() -> None:
    shared = batchkit.SharedExecutor()
    seen = Concurrency()
    light = batchkit.Batcher(seen.model("w1", 0.004), collate=None, max_batch_size=1, executor=shared, name="w1")
    heavy = batchkit.Batcher(
        seen.model("w3", 0.004), collate=None, max_batch_size=1, executor=shared, weight=3, name="w3"
    )
    stop = anyio.Event()

    async def flood(batcher: batchkit.Batcher[int, int]) -> None:
        async with anyio.create_task_group() as tg:  # always more queued than one batch: saturated
            for x in range(400):
                tg.start_soon(batcher.predict, x)
            await stop.wait()
            tg.cancel_scope.cancel()

    with anyio.fail_after(30):
        async with light, heavy, anyio.create_task_group() as tg:
            tg.start_soon(flood, light)
            tg.start_soon(flood, heavy)
            while len(seen.order) < 160:
                await anyio.sleep(0.01)
            stop.set()
    window = seen.order[20:160]  # both saturated by then
    share = window.count("w3") / window.count("w1")
    assert 2.0 <= share <= 4.5, share  # 3 by weight (equal batch times)


@pytest.mark.anyio
async def test_a_light_batcher_is_not_starved_by_a_heavily_weighted_one() -> None:
    shared = batchkit.SharedExecutor()
    seen = Concurrency()
    light = batchkit.Batcher(seen.model("light", 0.001), collate=None, max_batch_size=4, executor=shared)
    heavy = batchkit.Batcher(seen.model("heavy", 0.005), collate=None, max_batch_size=4, executor=shared, weight=50)
    answered = 0

    async def light_calls() -> None:
        nonlocal answered
        for x in range(10):
            assert await light.predict(x) == x + 1
            answered += 1

    with anyio.fail_after(30):
        async with light, heavy, anyio.create_task_group() as tg:
            for x in range(2000):  # the heavy batcher stays saturated throughout
                tg.start_soon(heavy.predict, x)
            await light_calls()
            assert heavy.stats().pending > 0  # it was still saturated when the light calls ended
            tg.cancel_scope.cancel()
    assert answered == 10


def _executor_with(waiters: int) -> tuple[batchkit.SharedExecutor, list[Lease], list[int]]:
    shared = batchkit.SharedExecutor()
    woken: list[int] = []
    leases = [shared.join(f"b{i}", 1.0, lambda i=i: woken.append(i) is None) for i in range(waiters)]  # type: ignore[misc]
    return shared, leases, woken


def test_a_freed_turn_goes_to_the_batcher_with_the_least_device_time_for_its_weight() -> None:
    shared, (runner, a, b), woken = _executor_with(3)
    assert runner.acquire(math.inf, 0.01, now=0.0)
    a.vtime = 5.0  # a has had more device time than b
    assert not a.acquire(math.inf, 0.01, now=0.001)
    assert not b.acquire(math.inf, 0.01, now=0.002)
    runner.release(0.01, now=0.01)
    assert woken == [1 + 1]  # b (index 2)
    assert b.acquire(math.inf, 0.01, now=0.011)  # takes the promised turn
    assert shared.stats().running == 1
    assert shared.stats().waiting == 1


def test_an_urgent_batch_goes_first_and_a_lax_deadline_changes_nothing() -> None:
    _shared, (runner, a, b), woken = _executor_with(3)
    assert runner.acquire(math.inf, 0.05, now=0.0)
    assert not a.acquire(math.inf, 0.05, now=0.001)  # first in line, no deadline
    assert not b.acquire(10.0, 0.05, now=0.002)  # a deadline far away: not urgent
    runner.release(0.05, now=0.05)
    assert woken == [1]  # a: first come (equal virtual times)
    assert a.acquire(math.inf, 0.05, now=0.05)
    assert not runner.acquire(math.inf, 0.05, now=0.05)
    b.acquire(0.16, 0.05, now=0.06)  # its deadline came close: it would miss it behind another batch
    a.release(0.05, now=0.10)
    assert woken == [1, 2]


def test_a_promised_turn_not_taken_passes_on_and_a_stopped_seats_run_keeps_its_turn_to_the_end() -> None:
    shared, (runner, a, b), woken = _executor_with(3)
    assert runner.acquire(math.inf, 0.0, now=0.0)
    assert not a.acquire(math.inf, 0.0, now=0.0)
    assert not b.acquire(math.inf, 0.0, now=0.0)
    runner.release(0.0, now=0.0)
    assert woken == [1]
    a.withdraw(now=0.0)  # nothing due on a any more
    assert woken == [1, 2]
    assert b.acquire(math.inf, 0.0, now=0.0)
    b.leave(now=0.0)  # its worker stopped while its run goes on: the run keeps the turn
    assert shared.stats().running == 1
    assert not runner.acquire(math.inf, 0.0, now=0.0)
    b.release(0.0, now=0.0, wants=(0.0, 0.0))  # the run ended: the turn comes back (a gone seat wants none)
    assert shared.stats().running == 0  # promised to the runner, which was waiting
    assert runner.acquire(math.inf, 0.0, now=0.0)
    assert shared.stats().running == 1


def test_a_batcher_back_from_idle_banks_no_credit() -> None:
    _shared, (busy, idle), _ = _executor_with(2)
    for _ in range(10):
        assert busy.acquire(math.inf, 0.01, now=0.0)
        busy.release(1.0, now=0.0)
    assert busy.acquire(math.inf, 0.01, now=0.0)
    assert not idle.acquire(math.inf, 0.01, now=0.0)
    assert idle.vtime == busy.vtime == 10.0  # where the device's virtual time is, not 0: it goes after busy's turn


@pytest.mark.anyio
async def test_a_closed_batcher_gives_its_turns_back() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()

    def blocked(batch: list[int]) -> list[int]:
        gate.wait(10)
        return batch

    first = batchkit.Batcher(blocked, collate=None, executor=shared, name="first")
    second = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="second")
    with anyio.fail_after(20):
        async with second, anyio.create_task_group() as tg:
            tg.start_soon(first.predict, 1)
            while shared.stats().running == 0:
                await anyio.sleep(0.001)
            waiting = anyio.Event()

            async def wait_second() -> None:
                assert await second.predict(2) == 2
                waiting.set()

            tg.start_soon(wait_second)
            await anyio.sleep(0.05)
            assert not waiting.is_set()  # second waits for the only turn
            gate.set()
            await first.aclose()
            await waiting.wait()
    assert shared.stats().running == 0


@pytest.mark.anyio
async def test_a_hung_batch_keeps_its_turn_until_its_call_returns() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()

    def hangs(batch: list[int]) -> list[int]:
        gate.wait(10)
        return batch

    stuck = batchkit.Batcher(hangs, collate=None, executor=shared, run_timeout_ms=20, name="stuck")
    other = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="other")
    with anyio.fail_after(20):
        async with stuck, other:
            with pytest.raises(batchkit.ModelTimeoutError):
                await stuck.predict(1)
            assert stuck.stats().blocked_slots == 1
            assert shared.stats().running == 1  # the call still runs on the device
            with anyio.move_on_after(0.05):
                await other.predict(2)
                pytest.fail("ran while the hung call held the only turn")
            gate.set()
            assert await other.predict(3) == 3


def test_executor_and_weight_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        batchkit.SharedExecutor(0)
    with pytest.raises(TypeError, match=r"executor must be a batchkit\.SharedExecutor"):
        batchkit.Batcher(lambda b: b, executor="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        batchkit.Batcher(lambda b: b, executor=batchkit.SharedExecutor(), weight=0)
    with pytest.raises(ValueError, match="give executor"):
        batchkit.Batcher(lambda b: b, weight=2)
    with pytest.raises(TypeError, match="weight must be a number"):
        batchkit.Batcher(lambda b: b, executor=batchkit.SharedExecutor(), weight="2")  # type: ignore[arg-type]


def test_copies_share_the_executor_and_it_does_not_pickle() -> None:
    shared = batchkit.SharedExecutor()
    batcher = batchkit.Batcher(lambda b: b, executor=shared)
    assert copy.deepcopy(batcher)._scheduler.settings.executor is shared
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(shared)


def test_batchers_on_two_event_loops_share_one_executor() -> None:
    shared = batchkit.SharedExecutor()
    seen = Concurrency()
    errors: list[BaseException] = []

    def serve(backend: str) -> None:
        async def main() -> None:
            batcher = batchkit.Batcher(seen.model(backend, 0.002), collate=None, executor=shared, name=backend)
            async with batcher, anyio.create_task_group() as tg:
                for x in range(60):
                    tg.start_soon(batcher.predict, x)
                    if x % 6 == 0:
                        await anyio.sleep(0.001)
            check_settled(batcher.stats())

        try:
            anyio.run(main, backend=backend)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(b,)) for b in ("asyncio", "trio")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert seen.peak == 1
    assert set(seen.order) == {"asyncio", "trio"}
    assert shared.stats().running == 0


# -- regressions found by review --------------------------------------------------------


@pytest.mark.anyio
async def test_an_overloaded_batcher_with_deadlines_does_not_starve_one_without() -> None:
    """Every batch of an overloaded batcher with deadlines is urgent; urgency must not win every turn."""
    shared = batchkit.SharedExecutor()

    def slow(batch: list[int]) -> list[int]:
        time.sleep(0.02)
        return batch

    heavy = batchkit.Batcher(slow, collate=None, max_batch_size=1, executor=shared, name="heavy")
    light = batchkit.Batcher(lambda b: b, collate=None, max_batch_size=1, executor=shared, name="light")

    async def one(x: int) -> None:
        with contextlib.suppress(batchkit.RequestTimeoutError):
            await heavy.predict(x, timeout_ms=300)

    async def flood() -> None:
        async with anyio.create_task_group() as tg:
            for x in range(10_000):  # 200 a second offered, 50 served
                tg.start_soon(one, x)
                await anyio.sleep(0.005)

    served = 0
    with anyio.fail_after(30):
        async with heavy, light, anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await anyio.sleep(0.3)
            for x in range(5):
                with anyio.move_on_after(1):  # a few heavy batches at most, not forever
                    assert await light.predict(x) == x
                    served += 1
            tg.cancel_scope.cancel()
    assert served == 5


def test_urgency_jumps_the_line_only_for_a_batcher_not_ahead_of_its_share() -> None:
    shared, (heavy, light), woken = _executor_with(2)
    assert heavy.acquire(math.inf, 0.02, now=0.0)
    assert not light.acquire(math.inf, 0.001, now=0.001)
    heavy.release(0.02, now=0.02, wants=(0.025, 0.02))  # urgent, but it just ran: the light one goes
    assert woken == [1]
    del shared


@pytest.mark.anyio
async def test_a_hung_call_keeps_its_turn_after_its_batcher_closes() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()
    seen = Concurrency()

    def hangs(batch: list[int]) -> list[int]:
        seen.model("stuck", 0)(batch)
        gate.wait(10)
        return batch

    stuck = batchkit.Batcher(hangs, collate=None, executor=shared, run_timeout_ms=20, name="stuck")
    other = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="other")
    with anyio.fail_after(20):
        async with other:
            with pytest.raises(batchkit.ModelTimeoutError):
                await stuck.predict(1)
            await stuck.aclose()
            with anyio.move_on_after(0.1):
                await other.predict(2)
                pytest.fail("ran while the closed batcher's hung call still ran on the device")
            gate.set()
            assert await other.predict(3) == 3
    assert shared.stats().running == 0


def _gated_batcher(shared: batchkit.SharedExecutor, gate: threading.Event, name: str) -> batchkit.Batcher[int, int]:
    def model(batch: list[int]) -> list[int]:
        gate.wait(10)
        return batch

    return batchkit.Batcher(model, collate=None, max_batch_size=1, executor=shared, name=name)


def test_a_run_still_going_when_its_loop_ends_keeps_its_turn_then_gives_it_back() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()
    first = _gated_batcher(shared, gate, "first")
    second = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="second")

    async def start_first() -> None:
        asyncio.ensure_future(first.predict(1))  # noqa: RUF006 - the loop ends with it pending
        while shared.stats().running == 0:
            await asyncio.sleep(0.001)

    asyncio.run(start_first())  # its loop ends while its model still runs

    async def use_second(wait: float) -> bool:
        with anyio.move_on_after(wait):
            assert await second.predict(2) == 2
            return True
        return False

    assert not anyio.run(use_second, 0.1)  # the running call still holds the only turn
    gate.set()
    assert anyio.run(use_second, 5.0)  # and gives it back when it returns


def test_a_loop_closed_while_its_run_is_going_gives_the_turn_back_when_the_run_ends() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()
    first = _gated_batcher(shared, gate, "first")
    second = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="second")
    loop = asyncio.new_event_loop()

    async def use_first() -> None:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(first.predict(1), 0.05)

    loop.run_until_complete(use_first())
    loop.close()  # without aclose(); the batcher stays referenced
    gate.set()

    async def use_second() -> int:
        with anyio.fail_after(5):
            return await second.predict(2)

    assert anyio.run(use_second) == 2
    assert shared.stats().running == 0


def test_a_turn_promised_to_a_paused_loop_goes_to_a_batcher_that_can_use_it() -> None:
    shared = batchkit.SharedExecutor()
    gate = threading.Event()
    paused = batchkit.Batcher(lambda b: b, collate=None, executor=shared, name="paused")
    busy = _gated_batcher(shared, gate, "busy")
    finished = threading.Event()

    def serve_busy() -> None:
        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for x in range(3):
                    tg.start_soon(busy.predict, x)
            finished.set()

        anyio.run(main)

    thread = threading.Thread(target=serve_busy)
    thread.start()
    while shared.stats().running == 0:
        time.sleep(0.001)
    loop = asyncio.new_event_loop()

    async def wait_in_line() -> None:
        loop.create_task(paused.predict(1))  # noqa: RUF006 - runs again when the loop does
        while shared.stats().waiting == 0:
            await asyncio.sleep(0.001)

    loop.run_until_complete(wait_in_line())  # the loop stops with its batcher in line for a turn
    gate.set()
    assert finished.wait(5)  # the other batcher is not held up by a loop that is not running
    thread.join(5)
    loop.run_until_complete(paused.aclose())  # once it runs again, it is served and closes
    loop.close()


@pytest.mark.anyio
async def test_executor_stats_forget_batchers_that_are_gone() -> None:
    shared = batchkit.SharedExecutor()

    class Model:
        @batchkit.batch(collate=None, executor=shared)
        def run(self, batch: list[int]) -> list[int]:
            return batch

    for x in range(200):
        instance = Model()
        assert await instance.run(x) == x
        await instance.run.aclose()
    assert len(shared.stats().batches) <= 1  # only batchers still open count


def test_a_weight_far_outside_any_sensible_share_is_refused() -> None:
    for weight in (1e-320, 1e-9, 1e9):
        with pytest.raises(ValueError, match="weight"):
            batchkit.Batcher(lambda b: b, executor=batchkit.SharedExecutor(), weight=weight)
