"""Where batchkit's per-request time goes: cProfile over the machinery benchmark.

```bash
python benchmarks/profile_machinery.py [batchkit|batchkit-async-fn|floor|...] [--top 25]
python benchmarks/profile_machinery.py --enqueue
```

Prints, per request, the own time (tottime) of the hottest functions and the
totals by area (batchkit's modules, asyncio, the rest). cProfile slows
everything down several times over: read the shares, not the absolute numbers.

``--enqueue`` times, without a profiler, only the submitting half of a request:
``predict(x)`` run up to its first suspension (checks, key, queue push, future),
for batchkit and for the floor batcher.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from machinery import REQUESTS, ROUNDS, SETTING, identity

import batchkit
from batchkit.bench._floor import FloorBatcher


def _area(filename: str) -> str:
    if "/batchkit/" in filename:
        return "batchkit"
    if "/asyncio/" in filename:
        return "asyncio"
    if "/anyio/" in filename:
        return "anyio"
    return "other"


def profile(name: str, top: int) -> None:
    round_ = ROUNDS[name]
    asyncio.run(round_())  # warm up outside the profile
    profiler = cProfile.Profile()
    profiler.runcall(asyncio.run, round_())
    stats = pstats.Stats(profiler)
    rows = stats.stats  # type: ignore[attr-defined]  # {(file, line, func): (cc, nc, tt, ct, callers)}
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _, _), (_, _, tottime, _, _) in rows.items():
        by_area[_area(filename)] += tottime
    total = sum(by_area.values())
    print(f"{name}: {total / REQUESTS * 1e6:.2f} us/request under cProfile ({REQUESTS} requests)")
    for area, seconds in sorted(by_area.items(), key=lambda item: -item[1]):
        print(f"  {area:<10} {seconds / REQUESTS * 1e6:6.2f} us/request  {seconds / total:5.1%}")
    print(f"\n  {'us/req':>7} {'calls/req':>9}  function")
    hottest = sorted(rows.items(), key=lambda item: -item[1][2])[:top]
    for (filename, line, function), (_, calls, tottime, _, _) in hottest:
        where = f"{filename.rsplit('/', 2)[-2]}/{filename.rsplit('/', 1)[-1]}:{line}" if "/" in filename else filename
        print(f"  {tottime / REQUESTS * 1e6:7.2f} {calls / REQUESTS:9.2f}  {function} ({where})")


async def _enqueue_cost(predict: Callable[[int], Awaitable[object]], repeat: int = 5) -> float:
    """Best seconds per ``predict`` call run up to its first suspension."""
    best = float("inf")
    for _ in range(repeat):
        calls = [predict(i) for i in range(REQUESTS)]
        start = time.perf_counter()
        for call in calls:
            call.send(None)  # type: ignore[attr-defined]  # a coroutine: run it to its first await
        best = min(best, (time.perf_counter() - start) / REQUESTS)
        for call in calls:
            call.close()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)  # let the worker drain the abandoned requests
    return best


async def enqueue() -> None:
    options = {"max_batch_size": SETTING.batch_size, "max_wait_ms": SETTING.wait_ms, "max_queue_size": 10**6}
    async with batchkit.Batcher(identity, collate=None, **options) as plain:
        print(f"batchkit            {await _enqueue_cost(plain.predict) * 1e6:5.2f} us per submit")
    async with batchkit.Batcher(identity, collate=None, timeout_ms=1000, **options) as timed:
        print(f"batchkit timeout_ms {await _enqueue_cost(timed.predict) * 1e6:5.2f} us per submit")
    floor = FloorBatcher(identity, max_batch_size=SETTING.batch_size, max_wait_ms=SETTING.wait_ms)
    print(f"floor               {await _enqueue_cost(floor.predict) * 1e6:5.2f} us per submit")
    await floor.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("name", nargs="?", default="batchkit", choices=list(ROUNDS))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--enqueue", action="store_true", help="time the submitting half of predict instead")
    args = parser.parse_args()
    if args.enqueue:
        asyncio.run(enqueue())
    else:
        profile(args.name, args.top)


if __name__ == "__main__":
    main()
