"""Per-request cost of each batcher, side by side, as a ratio to the floor batcher.

```bash
python benchmarks/machinery_ratios.py [--rounds 5] [--only batchkit,floor,...]
```

Rounds alternate between the batchers (20,000 concurrent requests each, identity
model, garbage collector on, a full collection before each round), so that the
noise of a shared machine falls on all of them alike; the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from machinery import PEERS, REQUESTS, ROUNDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(ROUNDS), help="comma-separated, from: " + ", ".join(ROUNDS))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    for name in list(names):
        if name in PEERS:
            try:
                __import__(PEERS[name])
            except ImportError:
                print(f"{name}: not installed, skipped")
                names.remove(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        asyncio.run(ROUNDS[name]())  # warm up
    for _ in range(args.rounds):
        for name in names:
            gc.collect()
            start = time.perf_counter()
            asyncio.run(ROUNDS[name]())
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"]) if "floor" in times else None
    for name in names:
        median = statistics.median(times[name])
        ratio = f"  {floor / median:4.2f}x the floor's throughput" if floor else ""
        print(f"{name:18s} {median / REQUESTS * 1e6:6.2f} us/request  {REQUESTS / median:9,.0f} req/s{ratio}")


if __name__ == "__main__":
    main()
