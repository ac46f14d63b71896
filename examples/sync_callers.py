"""Threads calling a model through ``batchkit.SyncBatcher``: blocking calls, batched together.

Run: ``python examples/sync_callers.py``. Code that is not async (a Flask or
Django view, a thread pool, a gRPC sync server) calls ``predict`` and blocks
until its own result is back. The SyncBatcher runs a Batcher on a background
thread, so the calls of many threads go into the same batches.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import batchkit

WEIGHTS = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
calls = 0


def model(batch: np.ndarray) -> np.ndarray:
    """(batch, 64) -> (batch, 8), with a fixed cost per call, as a real model has."""
    global calls
    calls += 1
    time.sleep(0.002)
    return batch @ WEIGHTS


def main(n_threads: int = 32, per_thread: int = 10) -> None:
    inputs = np.random.default_rng(1).standard_normal((n_threads * per_thread, 64)).astype(np.float32)
    start = threading.Barrier(n_threads)

    with batchkit.SyncBatcher(model, max_batch_size=32, max_wait_ms=2) as batcher:

        def worker(thread_index: int) -> None:
            start.wait()
            for i in range(thread_index * per_thread, (thread_index + 1) * per_thread):
                y = batcher.predict(inputs[i])  # blocks this thread only
                np.testing.assert_allclose(y, inputs[i] @ WEIGHTS, rtol=1e-4, atol=1e-4)

        with ThreadPoolExecutor(n_threads) as pool:
            for future in [pool.submit(worker, t) for t in range(n_threads)]:
                future.result()
        stats = batcher.stats()

    print(f"{stats.completed} predictions from {n_threads} threads in {calls} model calls")
    print(f"mean batch size {stats.mean_batch_size:.1f}")
    assert calls < stats.completed


if __name__ == "__main__":
    main()
