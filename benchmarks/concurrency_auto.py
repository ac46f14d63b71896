"""Batches in flight: ``"auto"`` against fixed numbers, for three kinds of model.

```bash
python benchmarks/concurrency_auto.py [--seconds 3] [--clients 64]
```

* ``remote``: an async model that awaits a remote call (8 ms, whatever the
  batch): batches in flight overlap their waits;
* ``native``: a synchronous numpy model (one BLAS thread) that releases the GIL:
  threads overlap on the cores there are;
* ``python``: a synchronous pure-Python model that holds the GIL: more threads
  cannot help.

Each model is served with 1, 2, 4 and 8 batches in flight (``replicas`` or
``max_concurrent_batches``) and with ``"auto"``, under a closed loop of
``--clients`` callers (saturated: the case the tuner is for), side by side in
one run, garbage collector on. Reported: throughput, p99 latency, and the limit
``"auto"`` ended at; then ``"auto"`` as a ratio of the best fixed number.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import functools
import gc
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np

import batchkit

WEIGHTS = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32) / 32


async def remote(batch: list[Any]) -> list[Any]:
    await anyio.sleep(0.008)
    return batch


def native(batch: list[Any]) -> list[Any]:
    x = np.ones((128, 1024), dtype=np.float32)
    for _ in range(4):
        x = x @ WEIGHTS  # BLAS releases the GIL for the whole product
    x.sum()
    return batch


def python(batch: list[Any]) -> list[Any]:
    sum(range(60_000))
    return batch


MODELS: dict[str, Callable[[list[Any]], Any]] = {"remote": remote, "native": native, "python": python}


async def one(model: str, in_flight: int | str, seconds: float, clients: int) -> dict[str, float]:
    fn = MODELS[model]
    option = "max_concurrent_batches" if model == "remote" else "replicas"
    batcher = batchkit.Batcher(fn, collate=None, max_batch_size=8, max_wait_ms=1, **{option: in_flight})  # type: ignore[arg-type]
    latencies: list[float] = []
    warmup = 2.0 if in_flight == "auto" else 0.3  # "auto" is measured once it has settled
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            sent = time.perf_counter()
            await batcher.predict(1)
            if sent >= measure_from:
                latencies.append(time.perf_counter() - sent)

    async with batcher, anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(client)
    latencies.sort()
    return {
        "rows_s": len(latencies) / seconds,
        "p99_ms": 1000 * latencies[int(0.99 * len(latencies))],
        "limit": batcher.stats().concurrency_limit,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    gc.enable()
    print(f"{'model':<8} {'in flight':>9} {'rows/s':>9} {'p99 ms':>8} {'limit':>6}")
    for model in args.models.split(","):
        rows: dict[str, dict[str, float]] = {}
        for in_flight in (1, 2, 4, 8, "auto"):
            row = anyio.run(functools.partial(one, model, in_flight, args.seconds, args.clients))
            rows[str(in_flight)] = row
            cells = f"{row['rows_s']:>9.0f} {row['p99_ms']:>8.1f} {row['limit']:>6.0f}"
            print(f"{model:<8} {in_flight!s:>9} {cells}", flush=True)
        best = max((k for k in rows if k != "auto"), key=lambda k: rows[k]["rows_s"])
        auto = rows["auto"]
        print(
            f"{model:<8} auto/best fixed ({best}): throughput {auto['rows_s'] / rows[best]['rows_s']:.2f}x, "
            f"p99 {auto['p99_ms'] / rows[best]['p99_ms']:.2f}x\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
