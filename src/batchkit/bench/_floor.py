"""The floor: the least a micro-batcher can do, written for the benchmark only.

One list of ``(item, future)`` pairs, one worker task, the batch function run
through ``loop.run_in_executor`` on a single thread, futures resolved on the
loop. No cancellation handling, no deadlines, no queue bound, no stats: any
real batcher pays at least this much per request, so its cost is the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["FloorBatcher"]


class FloorBatcher:
    """``await floor.predict(x)``; ``fn`` maps a list of inputs to a list of outputs."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], *, max_batch_size: int, max_wait_ms: float) -> None:
        self._fn = fn
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor")
        self._worker = self._loop.create_task(self._run())

    async def predict(self, item: Any) -> Any:
        future = self._loop.create_future()
        pending = self._pending
        pending.append((item, future))
        if len(pending) == 1:
            self._arrived.set()
        if len(pending) >= self._max_batch_size:
            self._full.set()
        return await future

    async def aclose(self) -> None:
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._pending) < self._max_batch_size and self._max_wait > 0:
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_wait)
            batch = self._pending[: self._max_batch_size]
            del self._pending[: self._max_batch_size]
            items = [item for item, _ in batch]
            try:
                outputs = await self._loop.run_in_executor(self._executor, self._fn, items)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), output in zip(batch, outputs, strict=True):
                    if not future.done():
                        future.set_result(output)
