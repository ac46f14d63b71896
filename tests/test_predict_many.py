"""predict_many: several inputs from one caller, each a request, results in order."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

import batchkit
from tests._reliability import check_settled

from .conftest import RecordingModel


@pytest.mark.anyio
async def test_results_come_back_in_order_and_each_input_is_a_request() -> None:
    model = RecordingModel(lambda batch: [x * 10 for x in batch])
    async with batchkit.Batcher(model, collate=None, max_batch_size=4, max_wait_ms=5) as batcher:
        with anyio.fail_after(10):
            assert await batcher.predict_many(range(10)) == [x * 10 for x in range(10)]
            assert await batcher.predict_many([]) == []
        stats = batcher.stats()
    assert stats.requests == stats.completed == 10
    assert max(len(b) for b in model.batches) == 4  # batched, within max_batch_size
    check_settled(stats)


@pytest.mark.anyio
async def test_a_failure_raises_it_and_the_others_are_settled() -> None:
    def model(batch: list[Any]) -> list[Any]:
        if "bad" in batch:
            raise ValueError("bad input in this batch")
        return batch

    async with batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0) as batcher:
        with anyio.fail_after(10), pytest.raises(ValueError, match="bad input"):
            await batcher.predict_many([*range(10), "bad", *range(10)])
        stats = batcher.stats()
    assert (stats.requests, stats.failed) == (21, 1)
    assert stats.completed + stats.cancelled == 20
    check_settled(stats)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio starts the inputs' tasks in order
@pytest.mark.anyio
async def test_a_failure_withdraws_the_inputs_still_queued() -> None:
    gate = threading.Event()

    def model(batch: list[Any]) -> list[Any]:
        if "bad" in batch:
            raise ValueError("bad input in this batch")
        if 0 in batch:
            gate.wait(10)  # holds the model while the call fails: the rest stay queued
        return batch

    recorder = RecordingModel(model)
    async with batchkit.Batcher(recorder, collate=None, max_batch_size=1, max_wait_ms=0) as batcher:
        try:
            with anyio.fail_after(10), pytest.raises(ValueError, match="bad input"):
                await batcher.predict_many(["bad", *range(20)])
        finally:
            gate.set()
        stats = batcher.stats()
    assert stats.requests == 21
    assert stats.failed == 1
    assert stats.cancelled == 20  # 19 withdrawn while queued, never computed; 0's output dropped
    assert recorder.seen == ["bad", 0]
    check_settled(stats)


@pytest.mark.anyio
async def test_an_input_that_cannot_be_batched_fails_the_call() -> None:
    async with batchkit.Batcher(lambda b: b, max_batch_size=4) as batcher:
        with anyio.fail_after(10), pytest.raises(batchkit.InvalidInputError):
            await batcher.predict_many([1.0, "two", 3.0])
        check_settled(batcher.stats())


def test_submit_threadsafe_needs_a_running_batcher() -> None:
    batcher = batchkit.Batcher(lambda b: b, collate=None)
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit_threadsafe(1)
