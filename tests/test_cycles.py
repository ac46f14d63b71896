"""Error answers leave no reference cycles: nothing for the cycle collector, nothing kept alive."""

from __future__ import annotations

import gc
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit

KINDS = ["ok", "timeout", "sync-model-error", "async-model-error", "isolated-error", "cancel", "invalid-input"]


def _sync_model(kind: str) -> Any:
    def model(batch: list[Any]) -> list[Any]:
        if kind == "timeout":
            time.sleep(0.02)
        if kind == "sync-model-error":
            raise ValueError("the model failed")
        if kind == "isolated-error" and any(x % 2 for x in batch):
            raise ValueError("an odd input")
        return batch

    return model


async def _async_model(batch: list[Any]) -> list[Any]:
    await anyio.lowlevel.checkpoint()
    raise ValueError("the async model failed")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_error_answers_leave_nothing_for_the_cycle_collector(kind: str) -> None:
    model = _async_model if kind == "async-model-error" else _sync_model(kind)
    collate = "auto" if kind == "invalid-input" else None
    on_error = "isolate" if kind == "isolated-error" else "raise"
    batcher = batchkit.Batcher(model, collate=collate, max_batch_size=8, max_wait_ms=1, on_error=on_error)

    async def one(i: int) -> None:
        x: Any = "not an array" if kind == "invalid-input" else i
        try:
            if kind == "cancel":
                with anyio.move_on_after(0.0005):
                    await batcher.predict(x)
            else:
                await batcher.predict(x, timeout_ms=5 if kind == "timeout" else None)
        except (ValueError, batchkit.BatchkitError):
            pass

    async def wave() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)

    with anyio.fail_after(30):
        async with batcher:
            await wave()  # warm up: first-use caches, imports
            counts = []
            for _ in range(3):  # the least of three: a cycle per answer shows in every window, while
                gc.collect()  # garbage from elsewhere (an earlier test's threads ending) does not
                gc.disable()
                try:
                    await wave()
                    await anyio.sleep(0.05)  # the last runs report back
                    counts.append(gc.collect())
                finally:
                    gc.enable()
            found = min(counts)
    assert found == 0, f"{found} objects were freed only by the cycle collector after 100 {kind} answers"
