"""Request-level streaming: a ``Batcher`` whose function is a generator.

Run: ``python examples/generator_stream.py [asyncio|trio]``. Each ``yield`` of
the model gives one item per request of the batch; ``batchkit.END`` in a
request's position ends that request's stream. Callers read their own items
with ``async for``, or collect them all with ``predict``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import anyio

import batchkit


# --8<-- [start:generator]
def countdown(batch: list[int]) -> Iterator[list[object]]:
    """Request ``n`` counts down from ``n`` to 1; the batch runs until its longest member is done."""
    for step in range(max(batch)):
        yield [n - step if step < n else batchkit.END for n in batch]
        # --8<-- [end:generator]


async def main() -> None:
    results: dict[int, list[object]] = {}

    # --8<-- [start:stream]
    async with batchkit.Batcher(countdown, collate=None, max_batch_size=8, max_wait_ms=5) as batcher:

        async def read(n: int) -> None:
            results[n] = [item async for item in batcher.stream(n)]  # each item as soon as it is yielded

        async with anyio.create_task_group() as tg:
            for n in (3, 1, 5):
                tg.start_soon(read, n)

        assert await batcher.predict(4) == [4, 3, 2, 1]  # predict collects a stream's items into a list

        async with contextlib.aclosing(batcher.stream(9)) as items:  # leaving early withdraws the request
            async for item in items:
                if item == 7:
                    break
        # --8<-- [end:stream]
        stats = batcher.stats()
    for n, items in sorted(results.items()):
        print(f"countdown {n}: {items}")
    print(f"{stats.requests} streams, {stats.failed} failed")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
