"""``max_wait_ms="auto"`` against a sweep of fixed waits, under Poisson loads from low to saturating.

Run: ``python benchmarks/adaptive_wait.py [--duration 2] [--out bench-results/adaptive.json]``

The model is synthetic on purpose: it sleeps ``a + b*B`` (2 ms + 0.05 ms per
sample, GIL released, like a GPU kernel), so its cost is the same in every run
and on a loaded 2-core machine, and the comparison measures the scheduling
policy, not the noise of a CPU model. For each arrival rate (a fraction of the
model's capacity at full batches) every variant gets the same Poisson arrival
times; the table gives p50/p99 latency and throughput, and how ``auto`` compares
with the best fixed wait at that load. ``naive-thread`` (one ``to_thread`` call per
request, batch of 1) is the low-load reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import batchkit

FIXED_COST = 0.002
PER_SAMPLE = 0.00005
MAX_BATCH = 64
CAPACITY = MAX_BATCH / (FIXED_COST + PER_SAMPLE * MAX_BATCH)  # requests/s at full batches


def model(batch: list[int]) -> list[int]:
    time.sleep(FIXED_COST + PER_SAMPLE * len(batch))
    return batch


async def run_load(predict: Any, arrivals: np.ndarray) -> dict[str, float]:
    """Send one request at each arrival time (seconds from now); latency of each, in ms."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    start = loop.time()

    async def one(i: int) -> None:
        sent = loop.time()
        await predict(i)
        latencies.append(loop.time() - sent)

    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    ms = np.asarray(latencies) * 1000
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


async def measure(variant: str, arrivals: np.ndarray) -> dict[str, float]:
    if variant == "naive-thread":
        return await run_load(lambda x: asyncio.to_thread(model, [x]), arrivals)
    wait: Any = "auto" if variant == "auto" else float(variant.split("=")[1])
    async with batchkit.Batcher(model, max_batch_size=MAX_BATCH, max_wait_ms=wait, collate=None) as batcher:
        await run_load(batcher.predict, arrivals[: max(10, len(arrivals) // 10)] / 10)  # warm up (and learn)
        result = await run_load(batcher.predict, arrivals)
        result["mean_batch"] = batcher.stats().mean_batch_size
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of arrivals per cell")
    parser.add_argument("--loads", default="0.01,0.1,0.3,0.6,0.85,0.95", help="fractions of capacity")
    parser.add_argument("--waits", default="0,0.5,1,2,5", help="fixed max_wait_ms values")
    parser.add_argument("--out", type=Path, default=Path("bench-results/adaptive.json"))
    args = parser.parse_args(argv)

    variants = ["auto", *(f"fixed={w}" for w in args.waits.split(",")), "naive-thread"]
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    print(f"model: {FIXED_COST * 1e3:g} ms + {PER_SAMPLE * 1e3:g} ms/sample; capacity {CAPACITY:,.0f} req/s")
    for load in (float(x) for x in args.loads.split(",")):
        rate = load * CAPACITY
        gaps = rng.exponential(1 / rate, size=max(20, int(rate * args.duration)))
        arrivals = np.cumsum(gaps)
        for variant in variants:
            if variant == "naive-thread" and load > 0.1:
                continue  # batch-of-one cannot keep up: a reference at low load only
            result = asyncio.run(measure(variant, arrivals))
            rows.append({"load": load, "rate": rate, "variant": variant, **result})
            print(
                f"load {load:4.2f} ({rate:7,.0f}/s) {variant:12} p50 {result['p50_ms']:7.2f} ms  "
                f"p99 {result['p99_ms']:7.2f} ms  {result['throughput']:8,.0f} req/s  "
                f"batch {result.get('mean_batch', 1):5.1f}",
                flush=True,
            )
    print("\nauto vs the best fixed wait at each load (p99 ratio < 1.10 is within 10 %):")
    for load in sorted({r["load"] for r in rows}):
        at = [r for r in rows if r["load"] == load]
        auto = next(r for r in at if r["variant"] == "auto")
        fixed = [r for r in at if r["variant"].startswith("fixed")]
        best = min(fixed, key=lambda r: r["p99_ms"])
        ratio = auto["p99_ms"] / best["p99_ms"]
        line = f"load {load:4.2f}: auto p99 / best fixed p99 ({best['variant']}) = {ratio:.2f}"
        line += f"; throughput auto / best fixed = {auto['throughput'] / max(r['throughput'] for r in fixed):.2f}"
        naive = [r for r in at if r["variant"] == "naive-thread"]
        if naive:
            line += f"; auto p50 / naive-thread p50 = {auto['p50_ms'] / naive[0]['p50_ms']:.2f}"
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
