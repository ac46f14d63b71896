"""Two models on one device: a light model's latency while a heavy one is saturated.

```bash
python benchmarks/shared_executor.py [--seconds 4] [--rounds 2] [--one-core]
```

Two torch MLPs share the CPU: a heavy one (wide, large batches) kept saturated
by 64 closed-loop clients, and a light one (narrow) that gets an open-loop
Poisson stream at a modest rate. Two ways to serve them, side by side in
alternating rounds, garbage collector on:

* ``independent``: two ``Batcher``s, each with its own worker thread: their
  batches run on top of each other and fight for the cores;
* ``shared``: the same two batchers on one ``SharedExecutor(1)``: one batch at a
  time, the next picked by urgency, then device time per weight;
* ``shared-16``: the same, with the heavy model's batches capped at 16 rows, so
  that the light model never waits long behind one of them.

Reported: the light model's p50/p99 latency, each model's rows per second and
their total. ``--one-core`` pins the process to one core with one torch thread
per model (the issue's set-up); without it torch uses every core, as a service
would.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from typing import Any

import anyio
import numpy as np

import batchkit


def mlp(features: int, hidden: int, layers: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    blocks: list[Any] = []
    width = features
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    blocks.append(torch.nn.Linear(width, features))
    model = torch.nn.Sequential(*blocks).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()  # type: ignore[no-any-return]

    return run


VARIANTS = {"independent": (False, 64), "shared": (True, 64), "shared-16": (True, 16)}


async def one_round(variant: str, seconds: float, light_rate: float) -> dict[str, float]:
    shared, heavy_batch = VARIANTS[variant]
    executor = batchkit.SharedExecutor(1) if shared else None
    heavy = batchkit.Batcher(
        mlp(256, 2048, 3, seed=1), max_batch_size=heavy_batch, max_wait_ms=2, executor=executor, name="heavy"
    )
    light = batchkit.Batcher(mlp(64, 256, 2, seed=2), max_batch_size=16, max_wait_ms=1, executor=executor, name="light")
    heavy_x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    light_x = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    latencies: list[float] = []
    counts = {"heavy": 0, "light": 0}
    warmup = 0.5
    end = time.perf_counter() + warmup + seconds
    measuring_from = time.perf_counter() + warmup

    async def heavy_client() -> None:
        while time.perf_counter() < end:
            await heavy.predict(heavy_x)
            if time.perf_counter() >= measuring_from:
                counts["heavy"] += 1

    async def light_call(start: float) -> None:
        await light.predict(light_x)
        if start >= measuring_from and time.perf_counter() < end:
            latencies.append(time.perf_counter() - start)
            counts["light"] += 1

    async def light_stream(tg: anyio.abc.TaskGroup) -> None:
        rng = random.Random(3)
        while time.perf_counter() < end:
            tg.start_soon(light_call, time.perf_counter())
            await anyio.sleep(rng.expovariate(light_rate))

    async with heavy, light, anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(heavy_client)
        tg.start_soon(light_stream, tg)
    latencies.sort()
    return {
        "light_p50_ms": 1000 * latencies[len(latencies) // 2],
        "light_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "heavy_rows_s": counts["heavy"] / seconds,
        "light_rows_s": counts["light"] / seconds,
        "total_rows_s": (counts["heavy"] + counts["light"]) / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--light-rate", type=float, default=200.0, help="light requests per second (Poisson)")
    parser.add_argument("--one-core", action="store_true", help="pin to one core, one torch thread")
    args = parser.parse_args(argv)
    import torch

    if args.one_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        torch.set_num_threads(1)
    gc.enable()
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            row = anyio.run(one_round, variant, args.seconds, args.light_rate)
            results[variant].append(row)
            cells = "  ".join(f"{k}={v:.1f}" for k, v in row.items())
            print(f"round {round_ + 1}/{args.rounds} {variant:<12} {cells}", flush=True)
    keys = list(results["shared"][0])
    print(f"\ncores: {len(os.sched_getaffinity(0))}, torch threads: {torch.get_num_threads()}, medians of rounds")
    print(f"{'variant':<12} " + " ".join(f"{k:>13}" for k in keys))
    medians = {v: {k: statistics.median(r[k] for r in rows) for k in keys} for v, rows in results.items()}
    for variant, row in medians.items():
        print(f"{variant:<12} " + " ".join(f"{row[k]:>13.1f}" for k in keys))
    for variant in ("shared", "shared-16"):
        ratio = {k: medians[variant][k] / medians["independent"][k] for k in keys}
        print(f"{variant + '/ind':<12} " + " ".join(f"{ratio[k]:>12.2f}x" for k in keys))


if __name__ == "__main__":
    main()
