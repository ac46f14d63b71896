"""A model call past run_timeout_ms: callers fail fast, the model is never called twice at once."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

import batchkit
from tests._reliability import check_settled, wait_until


class Guarded:
    """Records the most calls ever in progress at once; a call with "hang" waits for ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.seen: list[Any] = []

    def __call__(self, batch: list[Any]) -> list[Any]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.seen.extend(batch)
        try:
            if "hang" in batch:
                self.release.wait(timeout=30)
            return batch
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.anyio
async def test_after_a_hang_the_slot_waits_for_the_call_and_the_model_is_never_called_twice_at_once() -> None:
    model = Guarded()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50)
    results: dict[str, Any] = {}

    async def one(x: str) -> None:
        try:
            results[x] = await batcher.predict(x)
        except batchkit.BatchkitError as error:
            results[x] = error

    with anyio.fail_after(20):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(one, "hang")
            await wait_until(lambda: "hang" in results)  # failed at run_timeout_ms, the call still running
            assert isinstance(results["hang"], batchkit.ModelTimeoutError)
            tg.start_soon(one, "next")
            await wait_until(lambda: batcher.stats().pending == 1)
            await anyio.sleep(0.1)
            stats = batcher.stats()
            assert stats.blocked_slots == 1
            assert stats.oldest_running_ms >= 50  # the blocked slot's batch keeps ageing
            assert stats.oldest_queued_ms > 0
            assert "next" not in model.seen  # not run beside the hung call
            model.release.set()  # the hung call returns: the slot serves again
            await wait_until(lambda: "next" in results)
        stats = batcher.stats()
    assert results["next"] == "next"
    assert model.most == 1
    assert stats.blocked_slots == 0
    check_settled(stats)


@pytest.mark.anyio
async def test_aclose_with_every_slot_blocked_fails_the_queued_requests_instead_of_waiting() -> None:
    model = Guarded()
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50)
    results: dict[str, Any] = {}

    async def one(x: str) -> None:
        try:
            results[x] = await batcher.predict(x)
        except batchkit.BatchkitError as error:
            results[x] = error

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "hang")
                await wait_until(lambda: "hang" in results)
                tg.start_soon(one, "queued")
                await wait_until(lambda: batcher.stats().pending == 1)
                await batcher.aclose()  # returns: nothing could ever run the queued request
        assert isinstance(results["queued"], batchkit.ModelTimeoutError)
        assert "could never run" in str(results["queued"])
        check_settled(batcher.stats())
    finally:
        model.release.set()


@pytest.mark.anyio
async def test_replace_hung_gives_the_slot_a_fresh_thread_with_its_own_name() -> None:
    model = Guarded()
    names: set[str] = set()

    def recording(batch: list[Any]) -> list[Any]:
        names.add(threading.current_thread().name)
        return model(batch)

    batcher = batchkit.Batcher(
        recording, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50, replace_hung=True, name="fresh"
    )
    try:
        with anyio.fail_after(20):
            async with batcher:
                with pytest.raises(batchkit.ModelTimeoutError):
                    await batcher.predict("hang")
                assert await batcher.predict("next") == "next"  # beside the hung call: the user allowed it
        assert names == {"batchkit-fresh-0", "batchkit-fresh-0-r1"}
        assert model.most == 2
    finally:
        model.release.set()
