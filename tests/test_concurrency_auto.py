"""max_concurrent_batches="auto" / replicas="auto": batches in flight found by hill-climbing throughput."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

import batchkit
from batchkit._tuner import ConcurrencyTuner
from tests._reliability import check_settled

_CLOCK: dict[int, float] = {}


def drive(tuner: ConcurrencyTuner, rate_of: Callable[[int], float], batches: int = 3000) -> list[int]:
    """Feed ``tuner`` saturated batches of 8 rows at the throughput ``rate_of(limit)``; the limits it went through."""
    now, limits = _CLOCK.get(id(tuner), 0.0), []
    for _ in range(batches):
        now += 8 / rate_of(tuner.limit)
        tuner.observe(8, now, saturated=True)
        limits.append(tuner.limit)
    _CLOCK[id(tuner)] = now  # a later call goes on from here
    return limits


def test_it_climbs_while_more_in_flight_pays_and_settles_where_it_stops() -> None:
    tuner = ConcurrencyTuner(16)
    limits = drive(tuner, lambda n: 100.0 * min(n, 5))  # 5 batches in flight saturate what the model waits on
    assert limits.index(5) < 1200  # within ten windows: strides double while they pay, then it steps back down
    late = limits[len(limits) // 2 :]
    assert late.count(5) > 0.75 * len(late)  # and stays there, probing ever more rarely
    assert set(late) <= {4, 5, 6}  # its probes go one step either way


def test_it_stays_at_one_when_more_never_pays() -> None:
    tuner = ConcurrencyTuner(8)
    limits = drive(tuner, lambda n: 100.0 / (1 + 0.1 * (n - 1)))  # each batch in flight slows the others
    assert limits[-1] == 1
    assert limits.count(1) > 0.9 * len(limits)  # probes get rarer each time they fail
    assert tuner.probes < 12


def test_it_comes_back_down_when_fewer_do_as_well() -> None:
    tuner = ConcurrencyTuner(8)
    rate = {"knee": 6}
    limits = drive(tuner, lambda n: 100.0 * min(n, rate["knee"]), batches=2000)
    assert limits[-500:].count(6) > 300
    rate["knee"] = 2  # the remote service got slower: only 2 in flight pay now
    limits = drive(tuner, lambda n: 100.0 * min(n, rate["knee"]), batches=6000)
    late = limits[len(limits) // 2 :]
    assert late.count(2) > 0.75 * len(late)


def test_unsaturated_batches_decide_nothing() -> None:
    tuner = ConcurrencyTuner(8)
    now = 0.0
    for _ in range(5000):
        now += 0.01
        tuner.observe(8, now, saturated=False)
    assert tuner.limit == 1
    assert tuner.probes == 0


def test_auto_is_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrent_batches is for async models"):
        batchkit.Batcher(lambda b: b, max_concurrent_batches="auto")
    with pytest.raises(TypeError, match='replicas must be an int or "auto"'):
        batchkit.Batcher(lambda b: b, replicas="many")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_an_async_model_awaiting_a_remote_call_gets_more_batches_in_flight() -> None:
    in_flight = peak = 0

    async def remote(batch: list[int]) -> list[int]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.005)  # the remote call: its time does not grow with batches in flight
        in_flight -= 1
        return [x * 2 for x in batch]

    batcher = batchkit.Batcher(remote, collate=None, max_batch_size=4, max_wait_ms=1, max_concurrent_batches="auto")
    limits: list[int] = []

    async def client(start: int) -> None:
        for x in range(start, start + 60):
            assert await batcher.predict(x) == 2 * x
            limits.append(batcher.stats().concurrency_limit)

    with anyio.fail_after(60):
        async with batcher, anyio.create_task_group() as tg:
            for c in range(64):
                tg.start_soon(client, 1000 * c)
    assert max(limits) >= 3
    assert peak <= max(limits)  # never more in flight than the limit allowed
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_a_model_holding_the_gil_stays_well_below_the_maximum() -> None:
    threads: set[int] = set()

    def python_loop(batch: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        sum(range(20_000))  # holds the GIL: more threads cannot help
        return batch

    batcher = batchkit.Batcher(python_loop, collate=None, max_batch_size=4, max_wait_ms=0, replicas="auto")
    started = time.perf_counter()
    with anyio.fail_after(60):
        async with batcher, anyio.create_task_group() as tg:
            for _ in range(3000):
                tg.start_soon(batcher.predict, 1)
    assert time.perf_counter() > started
    stats = batcher.stats()
    assert stats.completed == 3000
    # Each step up needs 10 % more throughput; noise on a busy machine can pass one or two such
    # steps (and handing results over does overlap a little), not the four to half the maximum.
    assert stats.concurrency_limit <= 4, stats.concurrency_limit
