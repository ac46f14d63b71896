"""Repeated inputs: a Zipf-distributed request stream without dedup, with ``dedup_key``, and with a cache too.

Run: ``python benchmarks/dedup.py [--requests 20000] [--clients 64] [--rounds 3]``

The stream draws each request from a vocabulary of ``--vocabulary`` inputs
with probability proportional to ``1 / rank ** --zipf`` (popular queries come
back often), and ``--clients`` closed-loop clients send it (each sends its next
request when its last is answered). The model sleeps ``--fixed-ms`` plus
``--row-ms`` per row (GIL released, like a GPU kernel, so its cost is the same
on a loaded machine) and returns a 256-float array per row, which callers that
share a computation get copies of. Every variant serves the same stream; rounds
alternate between them (garbage collector on) and the medians are reported:
rows the model computed, throughput, p50/p99 latency, cache hits and requests
answered by an identical one's computation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

import numpy as np

import batchkit

VARIANTS = ("no dedup", "dedup_key", "dedup_key + cache")


class Model:
    """Sleeps ``fixed + row * len(batch)``; counts the rows it computed."""

    def __init__(self, fixed_ms: float, row_ms: float) -> None:
        self.fixed = fixed_ms / 1000
        self.row = row_ms / 1000
        self.rows = 0

    def __call__(self, batch: list[int]) -> list[np.ndarray]:
        time.sleep(self.fixed + self.row * len(batch))
        self.rows += len(batch)
        return [np.full(256, float(x), dtype=np.float32) for x in batch]


def zipf_stream(requests: int, vocabulary: int, exponent: float, seed: int = 0) -> list[int]:
    """``requests`` draws from ``range(vocabulary)``, rank ``k`` with probability proportional to ``1/(k+1)**s``."""
    weights = 1.0 / np.arange(1, vocabulary + 1) ** exponent
    rng = np.random.default_rng(seed)
    return rng.choice(vocabulary, size=requests, p=weights / weights.sum()).tolist()


async def serve(variant: str, stream: list[int], args: argparse.Namespace) -> dict[str, float]:
    model = Model(args.fixed_ms, args.row_ms)
    options: dict[str, Any] = {}
    if variant != "no dedup":
        options["dedup_key"] = int
    if variant == "dedup_key + cache":
        options["cache_size"] = args.cache_size
    batcher = batchkit.Batcher(
        model, collate=None, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, **options
    )
    latencies: list[float] = []

    async def client(items: list[int]) -> None:
        for x in items:
            sent = time.perf_counter()
            result = await batcher.predict(x)
            latencies.append(time.perf_counter() - sent)
            assert result[0] == x

    async with batcher:
        start = time.perf_counter()
        await asyncio.gather(*(client(stream[i :: args.clients]) for i in range(args.clients)))
        elapsed = time.perf_counter() - start
        stats = batcher.stats()
    ms = np.asarray(latencies) * 1000
    return {
        "rows": model.rows,
        "throughput": len(stream) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cache_hits": stats.cache_hits,
        "deduplicated": stats.deduplicated,
        "mean_batch": stats.mean_batch_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients sending at once")
    parser.add_argument("--vocabulary", type=int, default=10_000, help="distinct inputs")
    parser.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent (larger: more repeats)")
    parser.add_argument("--cache-size", type=int, default=1000)
    parser.add_argument("--fixed-ms", type=float, default=1.0, help="model cost per batch")
    parser.add_argument("--row-ms", type=float, default=0.2, help="model cost per row")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    stream = zipf_stream(args.requests, args.vocabulary, args.zipf)
    print(
        f"{args.requests:,} requests over {args.vocabulary:,} inputs (Zipf s={args.zipf:g}; "
        f"{len(set(stream)):,} distinct), {args.clients} clients; model {args.fixed_ms:g} ms "
        f"+ {args.row_ms:g} ms/row, max_batch_size={args.max_batch_size}, max_wait_ms={args.max_wait_ms:g}, "
        f"cache_size={args.cache_size}; median of {args.rounds} rounds"
    )
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            gc.collect()
            runs[variant].append(asyncio.run(serve(variant, stream, args)))

    def median(variant: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[variant])

    base_rows, base_rate = median("no dedup", "rows"), median("no dedup", "throughput")
    print()
    print(
        "| variant | rows computed | rows / request | req/s | vs no dedup | p50 ms | p99 ms | mean batch "
        "| deduplicated | cache hits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        rows, rate = median(variant, "rows"), median(variant, "throughput")
        print(
            f"| {variant} | {rows:,.0f} | {rows / args.requests:.2f} | {rate:,.0f} | {rate / base_rate:.2f}x "
            f"| {median(variant, 'p50_ms'):.1f} | {median(variant, 'p99_ms'):.1f} "
            f"| {median(variant, 'mean_batch'):.1f} | {median(variant, 'deduplicated'):,.0f} "
            f"| {median(variant, 'cache_hits'):,.0f} |"
        )
    print("\nrows computed vs no dedup: " + ", ".join(f"{v} {median(v, 'rows') / base_rows:.2f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
