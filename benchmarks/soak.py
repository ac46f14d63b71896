"""Soak test: a million requests through one batcher, with memory watched throughout.

Sends ``--requests`` requests (default 1,000,000) through a single long-lived
``Batcher`` wrapping an identity function, in waves of ``--concurrency``
concurrent callers (default 1,000). Every answer is checked (each caller must
get back exactly its own input), and at every ``--report-every`` requests the
script prints one row: throughput, RSS, the Python heap as tracemalloc sees it,
and the batcher's pending/in-flight counts. At the end it checks the stats
invariant, prints how much memory grew after warm-up (from the first checkpoint)
and over the second half of the run, and lists the source lines whose heap
allocations changed most (``--top``, from tracemalloc snapshots).

Run (takes a few minutes on a 2-core machine; tracemalloc slows it about
threefold, pass ``--no-tracemalloc`` to measure RSS only)::

    python benchmarks/soak.py
    python benchmarks/soak.py --backend trio --collate numpy --requests 200000

Exits non-zero if an answer is wrong, the stats do not add up, or memory grew by
more than ``--max-growth-mib`` after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

import batchkit

MIB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Checkpoint:
    requests: int
    seconds: float
    rate: float
    rss_mib: float
    traced_mib: float
    traced_peak_mib: float
    pending: int
    in_flight: int


def identity(batch: Any) -> Any:
    return batch


def checkpoint(done: int, start: float, last: tuple[int, float], batcher: batchkit.Batcher[Any, Any]) -> Checkpoint:
    gc.collect()
    now = time.perf_counter()
    rate = (done - last[0]) / max(now - last[1], 1e-9)
    traced, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    if tracemalloc.is_tracing():
        tracemalloc.reset_peak()
    stats = batcher.stats()
    return Checkpoint(
        done, now - start, rate, rss_bytes() / MIB, traced / MIB, peak / MIB, stats.pending, stats.in_flight
    )


def print_row(c: Checkpoint) -> None:
    print(
        f"| {c.requests:>9,} | {c.seconds:>7.1f} | {c.rate:>8,.0f} | {c.rss_mib:>7.1f} | "
        f"{c.traced_mib:>10.2f} | {c.traced_peak_mib:>9.2f} | {c.pending:>7} | {c.in_flight:>9} |",
        flush=True,
    )


async def soak(args: argparse.Namespace) -> int:
    collate: Any = None if args.collate == "list" else "auto"
    batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(
        identity,
        collate=collate,
        max_batch_size=args.batch_size,
        max_wait_ms=args.wait_ms,
        max_queue_size=max(args.concurrency, batchkit.DEFAULT_MAX_QUEUE_SIZE),
        name="soak",
    )
    wrong = 0

    def make_input(i: int) -> Any:
        return i if args.collate == "list" else np.array([i], dtype=np.int64)

    def value_of(result: Any) -> int:
        return int(result) if args.collate == "list" else int(result[0])

    async def caller(i: int) -> None:
        nonlocal wrong
        result = await batcher.predict(make_input(i))
        if value_of(result) != i:
            wrong += 1

    print(
        f"soak: {args.requests:,} requests, {args.concurrency:,} concurrent, backend={args.backend}, "
        f"collate={args.collate}, max_batch_size={args.batch_size}, max_wait_ms={args.wait_ms}, "
        f"tracemalloc={'on' if tracemalloc.is_tracing() else 'off'}, python {sys.version.split()[0]}",
        flush=True,
    )
    print("| requests  | seconds | req/s    | RSS MiB | traced MiB | peak MiB  | pending | in_flight |")
    print("|----------:|--------:|---------:|--------:|-----------:|----------:|--------:|----------:|")
    start = time.perf_counter()
    rows = [checkpoint(0, start, (0, start), batcher)]
    print_row(rows[0])
    last = (0, time.perf_counter())
    done = 0
    warm_snapshot: tracemalloc.Snapshot | None = None
    async with batcher:
        while done < args.requests:
            wave = min(args.concurrency, args.requests - done)
            async with anyio.create_task_group() as tg:
                for i in range(done, done + wave):
                    tg.start_soon(caller, i)
            done += wave
            if done % args.report_every == 0 or done == args.requests:
                rows.append(checkpoint(done, start, last, batcher))
                print_row(rows[-1])
                if warm_snapshot is None and tracemalloc.is_tracing():
                    warm_snapshot = tracemalloc.take_snapshot()
                last = (done, time.perf_counter())
    stats = batcher.stats()
    ended = stats.completed + stats.failed + stats.rejected + stats.timed_out + stats.cancelled
    invariant = stats.requests == ended + stats.pending + stats.in_flight
    total = time.perf_counter() - start
    warm = rows[1] if len(rows) > 2 else rows[0]
    rss_growth = rows[-1].rss_mib - warm.rss_mib
    traced_growth = rows[-1].traced_mib - warm.traced_mib
    print()
    print(f"total: {done:,} requests in {total:.1f} s ({done / total:,.0f} req/s overall)")
    print(
        f"stats: requests={stats.requests:,} completed={stats.completed:,} failed={stats.failed} "
        f"rejected={stats.rejected} timed_out={stats.timed_out} cancelled={stats.cancelled} "
        f"pending={stats.pending} in_flight={stats.in_flight} batches={stats.batches:,} "
        f"mean_batch_size={stats.mean_batch_size:.1f}"
    )
    print(f"wrong answers: {wrong}; stats invariant holds: {invariant}")
    print(
        f"memory growth after warm-up (first checkpoint at {warm.requests:,} requests -> end): "
        f"RSS {rss_growth:+.2f} MiB, traced heap {traced_growth:+.3f} MiB"
    )
    half = min(rows, key=lambda c: abs(c.requests - done / 2))
    print(
        f"memory growth over the second half ({half.requests:,} requests -> end): "
        f"RSS {rows[-1].rss_mib - half.rss_mib:+.2f} MiB, traced heap {rows[-1].traced_mib - half.traced_mib:+.3f} MiB"
    )
    if warm_snapshot is not None and args.top:
        gc.collect()
        diff = tracemalloc.take_snapshot().compare_to(warm_snapshot, "lineno")
        print(f"largest heap changes since the first checkpoint (top {args.top}, by line):")
        for stat in diff[: args.top]:
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {stat.traceback[0]}")
    ok = (
        wrong == 0
        and invariant
        and stats.completed == args.requests
        and stats.pending == stats.in_flight == 0
        and rss_growth <= args.max_growth_mib
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--wait-ms", type=float, default=1.0)
    parser.add_argument("--collate", choices=["list", "numpy"], default="list")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--report-every", type=int, default=50_000)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--top", type=int, default=8, help="show the N largest heap changes after warm-up")
    args = parser.parse_args()
    if args.report_every % args.concurrency:
        parser.error("--report-every must be a multiple of --concurrency")
    if not args.no_tracemalloc:
        tracemalloc.start()
    sys.exit(anyio.run(soak, args, backend=args.backend))


if __name__ == "__main__":
    main()
