"""How batches run: replicas, concurrency, OOM halving, isolation, padding, hung models."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import batchkit
from tests.conftest import RecordingModel
from tests.test_batching import gather, wait_until
from tests.test_failures import check_invariant

pytestmark = pytest.mark.anyio


async def test_replicas_run_batches_in_parallel_on_their_own_threads(no_thread_leak: None) -> None:
    running = 0
    peak = 0
    threads = set()
    lock = threading.Lock()

    def model(batch: list[int]) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.02)
        with lock:
            running -= 1
        return batch

    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, replicas=3, collate=None) as batcher:
        results = await gather(batcher, list(range(30)))
    assert results == list(range(30))
    assert peak == 3
    assert len(threads) == 3


async def test_async_model_runs_up_to_max_concurrent_batches() -> None:
    running = 0
    peak = 0

    async def model(batch: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return batch

    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, max_concurrent_batches=4, collate=None) as b:
        results = await gather(b, list(range(40)))
    assert results == list(range(40))
    assert peak == 4


def test_replicas_and_concurrency_options_are_checked() -> None:
    async def async_model(batch: Any) -> Any:
        return batch

    with pytest.raises(ValueError, match="async model takes max_concurrent_batches"):
        batchkit.Batcher(async_model, replicas=2)
    with pytest.raises(ValueError, match="synchronous model takes replicas"):
        batchkit.Batcher(lambda b: b, max_concurrent_batches=2)
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        batchkit.Batcher(lambda b: b, replicas=0)
    with pytest.raises(ValueError, match="on_error must be"):
        batchkit.Batcher(lambda b: b, on_error="ignore")  # type: ignore[arg-type]


def oom_model(limit: int) -> RecordingModel:
    def fn(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: batch of {len(batch)}")
        return batch * 2

    return RecordingModel(fn)


async def test_out_of_memory_halves_the_batch_and_caps_later_batches() -> None:
    model = oom_model(limit=3)
    inputs = [torch.full((2,), float(i)) for i in range(8)]
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=50) as batcher:
        results = await gather(batcher, inputs)
        for i, r in enumerate(results):
            assert torch.equal(r, torch.full((2,), 2.0 * i))
        sizes = [len(b) for b in model.batches]
        assert sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 fails, halves of 4 fail, quarters of 2 fit
        stats = batcher.stats()
        assert stats.oom_splits == 3
        assert stats.batch_size_limit == 2
        assert stats.completed == 8
        model.batches.clear()
        await gather(batcher, inputs)  # later batches are capped: no more OOM
        assert max(len(b) for b in model.batches) == 2
        assert batcher.stats().oom_splits == 3


async def test_a_request_fails_for_oom_only_when_it_fails_alone() -> None:
    def fn(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise torch.cuda.OutOfMemoryError("13 alone is too big")
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("too big")
        return batch

    async with batchkit.Batcher(fn, max_batch_size=4, max_wait_ms=50, collate=None) as batcher:
        outcomes: dict[int, Any] = {}

        async def caller(x: int) -> None:
            try:
                outcomes[x] = await batcher.predict(x)
            except torch.cuda.OutOfMemoryError as exc:
                outcomes[x] = exc

        async with anyio.create_task_group() as tg:
            for x in (1, 2, 13, 4):
                tg.start_soon(caller, x)
    assert isinstance(outcomes.pop(13), torch.cuda.OutOfMemoryError)
    assert outcomes == {1: 1, 2: 2, 4: 4}
    check_invariant(batcher.stats())


async def test_isolate_fails_only_the_poison_inputs() -> None:
    model = RecordingModel(lambda b: [1 / x for x in b])
    inputs = [1, 2, 0, 4, 5, 6, 0, 8]  # two poison inputs: 1/0
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=50, collate=None, on_error="isolate") as batcher:
        outcomes: dict[int, Any] = {}

        async def caller(i: int) -> None:
            try:
                outcomes[i] = await batcher.predict(inputs[i])
            except ZeroDivisionError as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(caller, i)
    for i, x in enumerate(inputs):
        if x == 0:
            assert isinstance(outcomes[i], ZeroDivisionError)
        else:
            assert outcomes[i] == 1 / x
    stats = batcher.stats()
    assert (stats.completed, stats.failed) == (6, 2)
    assert len(model.batches) < 2 * len(inputs)  # bisection, not one call per input
    check_invariant(stats)


async def test_without_isolate_a_poison_input_fails_its_whole_batch() -> None:
    async with batchkit.Batcher(lambda b: [1 / x for x in b], max_batch_size=4, max_wait_ms=50, collate=None) as b:
        failures = []

        async def caller(x: int) -> None:
            with pytest.raises(ZeroDivisionError):
                await b.predict(x)
            failures.append(x)

        async with anyio.create_task_group() as tg:
            for x in (1, 0, 3):
                tg.start_soon(caller, x)
    assert sorted(failures) == [0, 1, 3]


async def test_allowed_batch_sizes_pad_batches_and_drop_padded_outputs() -> None:
    shapes = []

    def fn(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape[0])
        return batch + 100

    async with batchkit.Batcher(fn, max_batch_size=64, max_wait_ms=20, allowed_batch_sizes=(1, 4, 8)) as batcher:
        assert batcher.stats().batch_size_limit == 8
        results = await gather(batcher, [np.array([i]) for i in range(11)])
    assert [int(r[0]) for r in results] == [i + 100 for i in range(11)]
    assert set(shapes) <= {1, 4, 8}
    assert sum(batcher.stats().batch_sizes.get(n, 0) * n for n in range(12)) == 11  # real sizes in stats


async def test_a_hung_sync_model_fails_its_batch_and_the_batcher_recovers(no_thread_leak: None) -> None:
    release = threading.Event()

    def model(batch: list[str]) -> list[str]:
        if "hang" in batch:
            release.wait(timeout=30)
        return batch

    async with batchkit.Batcher(
        model, max_batch_size=4, max_wait_ms=1, run_timeout_ms=50, collate=None, replace_hung=True
    ) as batcher:
        with pytest.raises(batchkit.ModelTimeoutError, match="run_timeout_ms=50") as info:
            await batcher.predict("hang")
        assert isinstance(info.value, TimeoutError)
        assert await batcher.predict("fine") == "fine"  # served by a fresh thread
        stats = batcher.stats()
        assert stats.hung_batches == 1
        assert (stats.failed, stats.completed) == (1, 1)
        release.set()  # let the abandoned thread finish (its late result is ignored)
        await wait_until(lambda: len([t for t in threading.enumerate() if t.name.startswith("batchkit-")]) == 1)
    check_invariant(batcher.stats())


async def test_a_hung_async_model_is_cancelled_after_run_timeout() -> None:
    cancelled = []

    async def model(batch: list[str]) -> list[str]:
        if "hang" in batch:
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                cancelled.append(batch)
                raise
        return batch

    async with batchkit.Batcher(model, max_wait_ms=1, run_timeout_ms=30, collate=None) as batcher:
        with pytest.raises(batchkit.ModelTimeoutError):
            await batcher.predict("hang")
        assert await batcher.predict("fine") == "fine"
    assert cancelled == [["hang"]]
    assert batcher.stats().hung_batches == 1


async def test_stats_carry_latency_percentiles() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.005)
        return batch

    async with batchkit.Batcher(model, max_batch_size=4, max_wait_ms=1, collate=None) as batcher:
        await gather(batcher, list(range(20)))
        stats = batcher.stats()
    assert stats.latency_ms.count == 20
    assert stats.queue_wait_ms.count == 20
    assert stats.run_time_ms.count == stats.batches
    for summary in (stats.latency_ms, stats.queue_wait_ms, stats.run_time_ms):
        assert 0 <= summary.p50 <= summary.p90 <= summary.p99 <= summary.max
    assert stats.run_time_ms.p50 >= 4.0  # each batch sleeps 5 ms
    assert stats.latency_ms.max >= stats.run_time_ms.p50
