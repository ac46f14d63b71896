"""The README's examples, as a program: every block the README shows is a section of this file.

Run: ``python examples/readme.py``. tests/test_docs.py checks that the README's
code blocks are these sections, word for word; tests/test_examples.py runs it.
"""

from __future__ import annotations

import anyio

# --8<-- [start:intro]
import numpy as np

import batchkit

weights = np.random.default_rng(0).standard_normal((512, 10)).astype(np.float32)


def model(batch: np.ndarray) -> np.ndarray:  # (B, 512) -> (B, 10), runs on a worker thread
    return batch @ weights


batcher = batchkit.Batcher(model, max_batch_size=64, max_wait_ms=2)


async def handler(x: np.ndarray) -> np.ndarray:
    return await batcher.predict(x)  # one sample in, its own result out
    # --8<-- [end:intro]


async def usage(x: np.ndarray) -> None:
    # --8<-- [start:usage]
    # as a context manager: starts the worker, and on exit answers every accepted request
    async with batchkit.Batcher(model, max_batch_size=64, max_wait_ms=2, timeout_ms=500) as batcher:
        y = await batcher.predict(x)
        y = await batcher.predict(x, timeout_ms=50)  # a per-call deadline

    # as a decorator (also on methods: one batcher per instance)
    @batchkit.batch(max_batch_size=32, collate=None)  # collate=None: the batch is a list of the inputs
    async def embed(batch: list[str]) -> list[list[float]]:  # an async fn is awaited on the loop
        return [[float(len(text)), float(text.count(" "))] for text in batch]

    vector = await embed("hello")

    print(batcher.stats())  # requests, batches, completed, failed, rejected, timed_out, ...
    # --8<-- [end:usage]
    np.testing.assert_allclose(y, model(x[None])[0], rtol=1e-5)
    assert vector == [5.0, 0.0]
    await embed.aclose()


async def main() -> None:
    xs = np.random.default_rng(1).standard_normal((100, 512)).astype(np.float32)
    ys: list[np.ndarray] = [xs[0]] * len(xs)

    async def one(i: int) -> None:
        ys[i] = await handler(xs[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(xs)):
            tg.start_soon(one, i)
    np.testing.assert_allclose(np.stack(ys), model(xs), rtol=1e-4, atol=1e-4)  # each caller its own row
    stats = batcher.stats()
    print(f"handler: {stats.requests} requests in {stats.batches} batches")
    await batcher.aclose()
    await usage(xs[0])


if __name__ == "__main__":
    anyio.run(main)
