"""``@batchkit.batch`` on a plain function and on a method.

Run: ``python examples/decorator.py [asyncio|trio]``. The decorated function is
a ``Batcher``: callers ``await`` it with one sample and get their own result. On
a method, each instance gets its own batcher, with ``self`` bound.
"""

from __future__ import annotations

import sys

import anyio
import numpy as np

import batchkit


# --8<-- [start:define]
@batchkit.batch(max_batch_size=16, max_wait_ms=2)
def normalize(batch: np.ndarray) -> np.ndarray:
    """(batch, dim) -> (batch, dim): each row scaled to unit length. Runs on a worker thread."""
    unit: np.ndarray = batch / np.linalg.norm(batch, axis=1, keepdims=True)
    return unit


class Embedder:
    """A model object: every instance batches its own calls."""

    def __init__(self, dim: int, seed: int) -> None:
        self.weights = np.random.default_rng(seed).standard_normal((4, dim)).astype(np.float32)

    @batchkit.batch(max_batch_size=32, max_wait_ms=2)
    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(batch, 4) -> (batch, dim)."""
        return batch @ self.weights
        # --8<-- [end:define]


# --8<-- [start:call]
async def main() -> None:
    inputs = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    small, large = Embedder(dim=8, seed=1), Embedder(dim=16, seed=2)
    results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    async def one(i: int) -> None:
        x = inputs[i]
        results[i] = (await normalize(x), await small.embed(x), await large.embed(x))

    async with anyio.create_task_group() as tg:
        for i in range(len(inputs)):
            tg.start_soon(one, i)

    for i, (unit, a, b) in results.items():  # every caller got its own row
        np.testing.assert_allclose(unit, inputs[i] / np.linalg.norm(inputs[i]), rtol=1e-5)
        np.testing.assert_allclose(a, inputs[i] @ small.weights, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, inputs[i] @ large.weights, rtol=1e-4, atol=1e-5)
    assert small.embed is not large.embed  # one batcher per instance

    for batcher in (normalize, small.embed, large.embed):
        stats = batcher.stats()
        print(f"{batcher.fn.__qualname__:16} {stats.requests} requests in {stats.batches} batches")
        await batcher.aclose()
    # --8<-- [end:call]


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
