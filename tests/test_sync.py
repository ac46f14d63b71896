"""SyncBatcher: threads calling a blocking predict are batched together."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import numpy as np
import pytest

from batchkit import BatcherClosedError, QueueFullError, RequestTimeoutError
from batchkit._sync import SyncBatcher

from .conftest import RecordingModel

pytestmark = pytest.mark.usefixtures("no_thread_leak")


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batchkit-sync")]


def test_many_threads_are_batched_together() -> None:
    def slow_double(batch: Any) -> Any:
        time.sleep(0.005)  # long enough for the other threads to queue behind it
        return batch * 2

    model = RecordingModel(slow_double)
    n = 64
    barrier = threading.Barrier(n, timeout=30)

    def call(i: int) -> float:
        barrier.wait()
        return float(batcher.predict(float(i), timeout_ms=30_000))

    with SyncBatcher(model, max_batch_size=16, max_wait_ms=5) as batcher:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(call, range(n)))
        stats = batcher.stats()
    assert results == [2.0 * i for i in range(n)]  # each thread got its own answer
    assert len(model.batches) < n
    assert max(len(b) for b in model.batches) > 1
    assert stats.requests == stats.completed == n
    assert stats.batches == len(model.batches)
    assert not _sync_threads()


def test_results_and_errors_are_the_batchers() -> None:
    def model(batch: list[Any]) -> list[Any]:
        if "boom" in batch:
            raise ValueError("bad batch")
        return [s.upper() for s in batch]

    with SyncBatcher(model, collate=None, max_wait_ms=0) as batcher:
        assert batcher.predict("a") == "A"
        assert batcher("b") == "B"  # __call__ is predict
        with pytest.raises(ValueError, match="bad batch"):
            batcher.predict("boom")
        assert batcher.predict("c") == "C"  # still serving
        stats = batcher.stats()
    assert (stats.requests, stats.completed, stats.failed) == (4, 3, 1)


def test_array_inputs_round_trip() -> None:
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    with SyncBatcher(lambda batch: batch @ weights, max_batch_size=8) as batcher:
        x = np.ones(4, dtype=np.float32)
        np.testing.assert_allclose(batcher.predict(x), x @ weights)


def test_timeout_raises_request_timeout_error() -> None:
    model = RecordingModel(gated=True)
    batcher: SyncBatcher[int, int] = SyncBatcher(model, collate=None, max_batch_size=1, max_wait_ms=0)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(batcher.predict, 1)  # holds the model
            assert model.entered.wait(30)
            with pytest.raises(RequestTimeoutError):
                batcher.predict(2, timeout_ms=20)  # queued behind it, times out
            model.gate.set()
            assert first.result(timeout=30) == 1
    finally:
        model.gate.set()
        batcher.close()
    assert model.seen == [1]  # the timed-out request never reached the model
    assert batcher.stats().timed_out == 1


def test_queue_full_is_raised_to_the_calling_thread() -> None:
    model = RecordingModel(gated=True)
    batcher: SyncBatcher[int, int] = SyncBatcher(model, collate=None, max_batch_size=1, max_queue_size=1, max_wait_ms=0)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(batcher.predict, 1)
            assert model.entered.wait(30)
            queued = pool.submit(batcher.predict, 2)
            deadline = time.monotonic() + 30
            while batcher.stats().pending < 1:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            with pytest.raises(QueueFullError):
                batcher.predict(3)
            model.gate.set()
            assert (running.result(30), queued.result(30)) == (1, 2)
    finally:
        model.gate.set()
        batcher.close()


def test_lazy_start_close_is_idempotent_and_final() -> None:
    batcher: SyncBatcher[int, int] = SyncBatcher(lambda b: b, collate=None, name="lazy")
    assert not _sync_threads()  # nothing runs before the first call
    assert "idle" in repr(batcher)
    assert batcher.predict(5) == 5
    assert [t.name for t in _sync_threads()] == ["batchkit-sync-lazy"]
    batcher.close()
    batcher.close()
    assert batcher.closed
    assert not _sync_threads()
    with pytest.raises(BatcherClosedError):
        batcher.predict(6)
    with pytest.raises(BatcherClosedError), batcher:
        pass
    assert batcher.stats().completed == 1


def test_close_before_start_and_options_are_checked() -> None:
    SyncBatcher(lambda b: b).close()
    with pytest.raises(ValueError, match="max_batch_size"):
        SyncBatcher(lambda b: b, max_batch_size=0)


def test_close_answers_every_accepted_request() -> None:
    model = RecordingModel(gated=True)
    batcher: SyncBatcher[int, int] = SyncBatcher(model, collate=None, max_batch_size=4, max_wait_ms=10_000)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher.predict, i) for i in range(8)]
        deadline = time.monotonic() + 30
        while batcher.stats().requests < 8:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        closer = pool.submit(batcher.close)
        model.gate.set()
        closer.result(timeout=30)
        assert sorted(f.result(timeout=30) for f in futures) == list(range(8))


@pytest.mark.anyio
async def test_predict_inside_an_event_loop_is_a_clear_error(anyio_backend: str) -> None:
    batcher: SyncBatcher[int, int] = SyncBatcher(lambda b: b, collate=None)
    try:
        with pytest.raises(RuntimeError, match=r"await batcher\.apredict"):
            batcher.predict(1)
        # ... while a worker thread is the place for it.
        with anyio.fail_after(30):
            assert await anyio.to_thread.run_sync(batcher.predict, 2) == 2
    finally:
        await anyio.to_thread.run_sync(batcher.close)


def test_wraps_a_batcher_that_has_not_started() -> None:
    from batchkit import Batcher

    inner: Batcher[int, int] = Batcher(lambda b: [v + 1 for v in b], collate=None, name="inner")
    with SyncBatcher(inner) as batcher:
        assert batcher.batcher is inner
        assert batcher.name == "inner"
        assert batcher.predict(1, priority=1) == 2
    assert inner.closed
    with pytest.raises(TypeError, match="no options"):
        SyncBatcher(Batcher(lambda b: b), max_batch_size=4)
    with pytest.raises(BatcherClosedError):
        SyncBatcher(inner)


@pytest.mark.anyio
async def test_apredict_shares_batches_with_threads(anyio_backend: str) -> None:
    """Coroutines (on this test's loop) and threads send to one SyncBatcher; they share batches."""
    model = RecordingModel(lambda batch: [x * 2 for x in batch])
    batcher: SyncBatcher[int, int] = SyncBatcher(model, collate=None, max_batch_size=64, max_wait_ms=50)
    results: dict[int, int] = {}

    async def from_coroutine(i: int) -> None:
        results[i] = await batcher.apredict(i)

    try:
        with anyio.fail_after(30):
            with ThreadPoolExecutor(8) as pool:
                threaded = [pool.submit(batcher.predict, 100 + i) for i in range(8)]
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(from_coroutine, i)
                for i, future in enumerate(threaded):
                    results[100 + i] = future.result()
    finally:
        await anyio.to_thread.run_sync(batcher.close)
    assert results == {i: 2 * i for i in [*range(8), *range(100, 108)]}
    assert any({x < 100 for x in b} == {True, False} for b in model.batches)  # a batch of both kinds


@pytest.mark.anyio
async def test_apredict_cancelled_withdraws_the_request(anyio_backend: str) -> None:
    model = RecordingModel(gated=True)
    batcher: SyncBatcher[int, int] = SyncBatcher(model, collate=None, max_batch_size=1, max_wait_ms=0)
    try:
        with anyio.fail_after(30):
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(batcher.predict, 1)
                assert await anyio.to_thread.run_sync(model.entered.wait, 30)
                with anyio.move_on_after(0.2):
                    await batcher.apredict(2)  # queued behind the held batch, then cancelled
                model.gate.set()
                assert held.result(30) == 1
            assert await batcher.apredict(3) == 3
    finally:
        model.gate.set()
        await anyio.to_thread.run_sync(batcher.close)
    assert model.seen == [1, 3]  # the cancelled request was never computed
    stats = batcher.stats()
    assert (stats.completed, stats.cancelled) == (2, 1)


def test_configure_from_a_thread_takes_effect_at_once() -> None:
    """A request waiting out a long max_wait_ms goes as soon as another thread lowers it."""
    with SyncBatcher(lambda b: b, collate=None, max_batch_size=8, max_wait_ms=60_000) as batcher:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(batcher.predict, 7)
            deadline = time.monotonic() + 10
            while batcher.stats().pending != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            batcher.configure(max_wait_ms=0)
            assert waiting.result(timeout=10) == 7  # not after a minute


def test_a_sync_batcher_collected_unclosed_stops_its_thread() -> None:
    import gc

    batcher: SyncBatcher[int, int] | None = SyncBatcher(lambda b: b, collate=None)
    assert batcher is not None
    assert batcher.predict(1) == 1
    assert _sync_threads()
    del batcher
    gc.collect()
    deadline = time.monotonic() + 10
    while _sync_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _sync_threads()
