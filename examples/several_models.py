"""Several models and adapters in one process, on one device.

Run: ``python examples/several_models.py [asyncio|trio]``. Three numpy models
(built in code) share one ``SharedExecutor``, so that only one batch runs at a
time:

* an embedder (light) that many requests call, often with the same text:
  ``dedup_key`` computes each distinct input once, ``cache_size`` keeps the
  results for the repeats that come later,
* a reranker (heavy, given twice the embedder's share of device time),
* a classifier with one adapter per customer: ``batch_key`` keeps customers out
  of each other's batches, and the model reads its batch's customer with
  ``batchkit.current_batch_key()``.

It prints what each model served, the rows the embedder computed, the most
batches that ever ran at once, and how the device time was shared.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported; BLAS reads it once

import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np

import batchkit

rng = np.random.default_rng(0)
EMBED = rng.standard_normal((64, 64)).astype(np.float32) / 8
RERANK = [rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(6)]
ADAPTERS = {customer: rng.standard_normal((64, 4)).astype(np.float32) for customer in ("acme", "globex", "initech")}

running = 0  # batches running now, across the three models
most_at_once = 0
lock = threading.Lock()
adapter_batches: list[set[str]] = []  # the customers found in each classifier batch


def counted(model: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Record how many batches, of all models, run at the same time."""

    def run(batch: Any) -> Any:
        global running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        try:
            return model(batch)
        finally:
            with lock:
                running -= 1

    return run


embedded_rows = 0


@counted
def embed(batch: np.ndarray) -> np.ndarray:
    global embedded_rows
    embedded_rows += len(batch)
    return np.tanh(batch @ EMBED)


@counted
def rerank(batch: np.ndarray) -> np.ndarray:
    for weights in RERANK:
        batch = np.tanh(batch @ weights)
    return batch.sum(axis=1)


# --8<-- [start:adapter]
@counted
def classify(batch: list[dict[str, Any]]) -> list[int]:
    customer = batchkit.current_batch_key()  # every request of this batch is this customer's
    adapter_batches.append({request["customer"] for request in batch})
    features = np.stack([request["features"] for request in batch])
    return [int(label) for label in (features @ ADAPTERS[customer]).argmax(axis=1)]


# --8<-- [end:adapter]


async def main() -> None:
    # --8<-- [start:executor]
    device = batchkit.SharedExecutor(max_concurrent_batches=1)
    embedder = batchkit.Batcher(
        embed,
        max_batch_size=32,
        executor=device,
        dedup_key=lambda x: x.tobytes(),  # equal arrays: one computation, a copy each
        cache_size=256,
        name="embedder",
    )
    reranker = batchkit.Batcher(rerank, max_batch_size=16, executor=device, weight=2, name="reranker")
    classifier = batchkit.Batcher(
        classify,
        collate=None,
        max_batch_size=16,
        executor=device,
        batch_key=lambda request: request["customer"],
        name="classifier",
    )
    # --8<-- [end:executor]
    customers = list(ADAPTERS)
    inputs = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    queries = inputs[np.random.default_rng(2).integers(0, 40, size=300)]  # 40 distinct texts, repeated

    async with embedder, reranker, classifier:
        async with anyio.create_task_group() as tg:
            for i, x in enumerate(inputs):
                tg.start_soon(embedder.predict, queries[i])
                tg.start_soon(reranker.predict, x)
                tg.start_soon(classifier.predict, {"customer": customers[i % 3], "features": x})
        shares = device.stats().device_seconds  # (its stats cover the batchers still open)

    for batcher in (embedder, reranker, classifier):
        stats = batcher.stats()
        print(f"{batcher.name}: {stats.completed} requests in {stats.batches} batches")
    distinct = len({q.tobytes() for q in queries})
    print(f"embedder rows computed: {embedded_rows} for {distinct} distinct inputs")
    print(f"most batches running at once: {most_at_once}")
    mixed = sum(1 for customers_seen in adapter_batches if len(customers_seen) > 1)
    print(f"classifier batches mixing customers: {mixed}")
    total = sum(shares.values())
    print("device time: " + ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in sorted(shares.items())))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
