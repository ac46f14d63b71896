"""Quickstart: the same model served naively and through batchkit, side by side.

Run: ``python examples/quickstart.py``. A small numpy MLP (built in code, no
download) answers 2,000 concurrent requests twice: once called inline in each
coroutine, the way a request handler would, and once through a Batcher. For each
it prints throughput and how long the event loop was blocked at worst (a
heartbeat task that wants to wake every millisecond measures it).

numpy's BLAS runs on one thread here: batchkit's worker thread and the event
loop then each have a core on a 2-core machine. Where BLAS threads take every
core (and other work shares them), the batched run can print less throughput
than the naive one; the loop stall is the figure that does not change.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported; BLAS reads it once

import time
from collections.abc import Awaitable, Callable

import anyio
import numpy as np

import batchkit

rng = np.random.default_rng(0)
WEIGHTS = [rng.standard_normal((512, 512)).astype(np.float32) / 23 for _ in range(4)]


def mlp(batch: np.ndarray) -> np.ndarray:
    """A 4-layer MLP: (batch, 512) -> (batch, 512)."""
    for w in WEIGHTS:
        batch = np.maximum(batch @ w, 0)
    return batch


async def serve(predict: Callable[[np.ndarray], Awaitable[np.ndarray]], n: int = 2000) -> tuple[float, float]:
    """Send ``n`` concurrent requests; return (requests per second, worst loop stall in ms)."""
    inputs = rng.standard_normal((n, 512)).astype(np.float32)
    results: list[np.ndarray] = [inputs[0]] * n
    worst_stall = 0.0
    done = False

    async def heartbeat() -> None:
        nonlocal worst_stall
        while not done:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            worst_stall = max(worst_stall, time.perf_counter() - start - 0.001)

    async def one(i: int) -> None:
        results[i] = await predict(inputs[i])

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        start = time.perf_counter()
        async with anyio.create_task_group() as requests:
            for i in range(n):
                requests.start_soon(one, i)
        elapsed = time.perf_counter() - start
        done = True
    np.testing.assert_allclose(np.stack(results), mlp(inputs), rtol=1e-3, atol=1e-3)  # each got its own
    return n / elapsed, worst_stall * 1000


async def main() -> None:
    async def naive(x: np.ndarray) -> np.ndarray:
        return mlp(x[None])[0]  # the model runs inside the coroutine: the loop is blocked

    naive_rps, naive_stall = await serve(naive)

    async with batchkit.Batcher(mlp, max_batch_size=64, max_wait_ms=2) as batcher:
        batched_rps, batched_stall = await serve(batcher.predict)
        stats = batcher.stats()

    print(f"{'':10} {'requests/s':>12} {'worst loop stall':>18}")
    print(f"{'naive':10} {naive_rps:12,.0f} {naive_stall:15.1f} ms")
    print(f"{'batchkit':10} {batched_rps:12,.0f} {batched_stall:15.1f} ms")
    print(f"batchkit: {stats.batches} batches, mean size {stats.mean_batch_size:.1f} (max 64)")


if __name__ == "__main__":
    anyio.run(main)
