"""Why are my batches small? ``stats().flushes`` and ``stats().limited_by`` answer.

Run: ``python examples/small_batches.py [asyncio|trio]``. A model that costs
10 ms a call plus 0.5 ms a row is served four ways: one caller at a time, many
concurrent callers, and a steady trickle of requests with no wait and with a
20 ms wait. Each prints why its batches left and what limited it (the output is
in docs/tuning.md, "My batches are small").
"""

from __future__ import annotations

import sys
import time

import anyio

import batchkit


def model(batch: list[int]) -> list[int]:
    time.sleep(0.010 + 0.0005 * len(batch))  # a fixed cost per call, a little per row
    return batch


# --8<-- [start:report]
def report(title: str, stats: batchkit.BatcherStats) -> None:
    print(f"{title}: {stats.requests} requests in {stats.batches} batches, mean size {stats.mean_batch_size:.1f}")
    sizes = stats.mean_flush_size
    print("  flushes:", ", ".join(f"{n} {why} ({sizes[why]:.1f} each)" for why, n in stats.flushes.items() if n))
    print(f"  limited by {stats.limited_by}: {stats.limited_by_detail}")
    # --8<-- [end:report]


async def one_at_a_time() -> None:
    async with batchkit.Batcher(model, collate=None, max_batch_size=16, max_wait_ms=5) as batcher:
        for i in range(20):
            await batcher.predict(i)  # each call waits for the one before: never two queued at once
        report("one caller at a time", batcher.stats())


async def concurrent() -> None:
    async def caller(start: int) -> None:
        for i in range(start, start + 5):
            await batcher.predict(i)

    async with batchkit.Batcher(model, collate=None, max_batch_size=16, max_wait_ms=5) as batcher:
        async with anyio.create_task_group() as tg:
            for c in range(64):
                tg.start_soon(caller, c * 5)
        report("64 concurrent callers", batcher.stats())


async def trickle(max_wait_ms: float) -> None:
    async with batchkit.Batcher(model, collate=None, max_batch_size=16, max_wait_ms=max_wait_ms) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(batcher.predict, i)
                await anyio.sleep(0.005)  # 200 requests a second, each on its own
        report(f"200 requests/s, max_wait_ms={max_wait_ms:g}", batcher.stats())


async def main() -> None:
    await one_at_a_time()
    await concurrent()
    await trickle(0)
    await trickle(20)


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
