"""Observability: ``Batcher.stats()``, and the same numbers as Prometheus metrics.

Run: ``python examples/metrics.py`` (needs the ``prometheus`` extra: ``pip install -e ".[prometheus]"``).
It sends a burst of requests, prints the stats snapshot, then the Prometheus text
exposition a scrape would get.
"""

from __future__ import annotations

import anyio
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

import batchkit
import batchkit.prometheus


def model(batch: np.ndarray) -> np.ndarray:
    return batch * 2


async def main() -> None:
    # --8<-- [start:register]
    registry = CollectorRegistry()  # or leave it out: prometheus_client's global REGISTRY
    batcher = batchkit.Batcher(model, max_batch_size=16, max_wait_ms=2, name="doubler")
    batchkit.prometheus.register(batcher, registry)  # stats() is read at scrape time only
    # --8<-- [end:register]

    async with batcher, anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(batcher.predict, np.float32(i))

    # --8<-- [start:stats]
    stats = batcher.stats()
    print(f"{stats.requests} requests, {stats.completed} completed, {stats.failed} failed")
    print(f"{stats.batches} batches, mean size {stats.mean_batch_size:.1f}, sizes {dict(stats.batch_sizes)}")
    print(f"latency p50 {stats.latency_ms.p50:.2f} ms, p99 {stats.latency_ms.p99:.2f} ms")
    # --8<-- [end:stats]

    exposition = generate_latest(registry).decode()
    print("\n".join(line for line in exposition.splitlines() if line.startswith("batchkit_")))


if __name__ == "__main__":
    anyio.run(main)
