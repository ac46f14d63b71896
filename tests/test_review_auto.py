"""Regressions found by reviewing "auto" batches in flight and the flush reasons."""

from __future__ import annotations

import threading
import time

import anyio
import anyio.lowlevel
import pytest

import batchkit
from batchkit._tuner import ConcurrencyTuner
from tests._reliability import check_settled
from tests.test_concurrency_auto import drive


@pytest.mark.anyio
async def test_auto_threads_serve_on_past_a_hung_call_and_close() -> None:
    release = threading.Event()

    def model(batch: list[str]) -> list[str]:
        if batch[0] == "hang":
            release.wait(10)
        return batch

    batcher = batchkit.Batcher(
        model, collate=None, max_batch_size=4, max_wait_ms=1, replicas="auto", run_timeout_ms=100
    )
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def hang() -> None:
                    with pytest.raises(batchkit.ModelTimeoutError):
                        await batcher.predict("hang")

                tg.start_soon(hang)
                await anyio.sleep(0.05)
                with anyio.fail_after(3):
                    assert await batcher.predict("ok") == "ok"  # another thread serves it
            with anyio.fail_after(3):
                await batcher.aclose()
    finally:
        release.set()


@pytest.mark.anyio
async def test_auto_tunes_a_streaming_model_too() -> None:
    async def steps(batch: list[int]) -> object:
        for step in range(2):
            await anyio.sleep(0.005)  # a remote call per step
            yield [x + step for x in batch]

    batcher = batchkit.Batcher(steps, collate=None, max_batch_size=4, max_wait_ms=1, max_concurrent_batches="auto")

    async def client(start: int) -> None:
        for x in range(start, start + 40):
            assert [item async for item in batcher.stream(x)] == [x, x + 1]

    with anyio.fail_after(60):
        async with batcher, anyio.create_task_group() as tg:
            for c in range(64):
                tg.start_soon(client, 1000 * c)
    assert batcher.stats().concurrency_limit > 2
    check_settled(batcher.stats())


def test_the_tuner_does_not_drift_down_where_more_always_pays() -> None:
    tuner = ConcurrencyTuner(16)
    limits = drive(tuner, lambda n: 100.0 * n, 20_000)  # each one fewer loses 1/n: under 10 % from 11 up
    late = limits[len(limits) // 2 :]
    assert min(late) >= 15, sorted(set(late))
    assert late.count(16) > 0.8 * len(late)


def test_the_tuner_does_not_leap_past_the_best_after_coming_down() -> None:
    tuner = ConcurrencyTuner(16)
    drive(tuner, lambda n: 100.0 * n, 3_000)  # climbs to 16 in doubling strides

    def contended(n: int) -> float:  # now best at 4: beyond, batches slow each other down
        return 100.0 * n if n <= 4 else 400.0 * (4 / n) ** 2

    limits = drive(tuner, contended, 20_000)
    down = limits[limits.index(4) :]  # it comes down one step at a time...
    assert max(down) <= 6, sorted(set(down))  # ...and from the top, it probes one step at a time, not 12


def test_the_tuner_looks_up_again_soon_after_the_model_gets_faster_in_parallel() -> None:
    tuner = ConcurrencyTuner(16)
    drive(tuner, lambda n: 100.0 * min(n, 4), 20_000)  # settled at 4, with a long patience
    limits = drive(tuner, lambda n: 200.0 * n, 3_000)  # faster now, and every batch in flight pays
    assert max(limits) == 16  # found within 3000 batches (about 20 windows at 16)


@pytest.mark.anyio
async def test_a_standing_queue_of_full_batches_is_limited_by_the_model() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.001)  # fast: the loop's own work between batches is a large share
        return batch

    batcher = batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=2)
    stop = time.perf_counter() + 1.5

    async def client() -> None:
        while time.perf_counter() < stop:
            await batcher.predict(1)

    with anyio.fail_after(30):
        async with batcher:
            async with anyio.create_task_group() as tg:
                for _ in range(64):
                    tg.start_soon(client)
            stats = batcher.stats()
    assert stats.flushes["full"] > 0.9 * stats.batches
    assert stats.limited_by == "model", stats.limited_by_detail


@pytest.mark.anyio
async def test_one_burst_after_a_quiet_second_is_not_a_busy_model() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.004)
        return batch

    batcher = batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=2)
    with anyio.fail_after(30):
        async with batcher:
            await anyio.sleep(1.0)  # nothing happens
            async with anyio.create_task_group() as tg:
                for x in range(8):
                    tg.start_soon(batcher.predict, x)
            stats = batcher.stats()
    assert stats.busy_fraction < 0.2, stats.busy_fraction  # 4 ms of model time in a second or more
    assert stats.limited_by != "model", stats.limited_by_detail


@pytest.mark.anyio
async def test_flush_counts_add_up_when_read_from_another_thread() -> None:
    async def model(batch: list[int]) -> list[int]:
        await anyio.lowlevel.checkpoint()
        return batch

    batcher = batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=0, max_concurrent_batches="auto")
    done = threading.Event()
    inconsistent: list[tuple[int, int]] = []

    def read() -> None:
        while not done.is_set():
            stats = batcher.stats()
            if sum(stats.flushes.values()) != stats.batches:
                inconsistent.append((sum(stats.flushes.values()), stats.batches))
            rows = sum(size * count for size, count in stats.batch_sizes.items())
            if sum(stats.flushed_requests.values()) != rows:
                inconsistent.append((sum(stats.flushed_requests.values()), rows))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with anyio.fail_after(60):
            async with batcher, anyio.create_task_group() as tg:
                for _ in range(32):

                    async def client() -> None:
                        for x in range(300):
                            await batcher.predict(x)

                    tg.start_soon(client)
    finally:
        done.set()
        reader.join()
    assert not inconsistent, inconsistent[:5]


@pytest.mark.anyio
async def test_one_slow_batch_does_not_fail_every_later_request_with_a_deadline() -> None:
    """A cost estimate that says "too slow" must be checked again: else no batch runs to correct it."""
    calls = 0

    def model(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.1)  # a cold start
        return batch

    answered = 0
    async with batchkit.Batcher(model, collate=None, max_wait_ms=1) as batcher:
        with anyio.fail_after(30):
            assert await batcher.predict(0) == 0
            for x in range(1, 51):
                try:
                    assert await batcher.predict(x, timeout_ms=50) == x
                    answered += 1
                except batchkit.RequestTimeoutError:
                    pass
    assert calls > 1
    assert answered >= 40, answered
