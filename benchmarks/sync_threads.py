"""Per-request cost of SyncBatcher against a minimal thread-native batcher, 64 calling threads.

```bash
python benchmarks/sync_threads.py [--threads 64] [--calls 300] [--rounds 5]
```

Every calling thread sends ``--calls`` requests one after another; the model is
the identity on a list, so all that is measured is handing requests over,
batching and waking the callers. The minimal batcher is what a careful engineer
writes in 40 lines with no event loop: a locked list, one worker thread, one
``threading.Event`` per request. Rounds alternate between the two; the medians
are compared, garbage collector on.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import batchkit


class MinimalThreadBatcher:
    """A locked list, a worker thread, an Event per request; flushes what is there when free."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch_size: int) -> None:
        self._fn = fn
        self._max = max_batch_size
        self._pending: list[tuple[Any, threading.Event, list[Any]]] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def predict(self, x: Any) -> Any:
        done = threading.Event()
        slot: list[Any] = []
        with self._ready:
            self._pending.append((x, done, slot))
            self._ready.notify()
        done.wait()
        return slot[0]

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if self._closed and not self._pending:
                    return
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            outputs = self._fn([x for x, _, _ in batch])
            for (_, done, slot), output in zip(batch, outputs, strict=True):
                slot.append(output)
                done.set()


def identity(items: list[Any]) -> list[Any]:
    return items


def _drive(predict: Callable[[Any], Any], threads: int, calls: int) -> float:
    """Seconds per request with ``threads`` threads each making ``calls`` calls."""
    barrier = threading.Barrier(threads + 1)

    def client(offset: int) -> None:
        barrier.wait()
        for i in range(calls):
            assert predict(offset + i) == offset + i

    workers = [threading.Thread(target=client, args=(t * calls,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - start) / (threads * calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"minimal": [], "SyncBatcher": []}
    for _ in range(args.rounds):
        minimal = MinimalThreadBatcher(identity, max_batch_size=64)
        times["minimal"].append(_drive(minimal.predict, args.threads, args.calls))
        minimal.close()
        with batchkit.SyncBatcher(identity, collate=None, max_batch_size=64, max_wait_ms=0) as batcher:
            times["SyncBatcher"].append(_drive(batcher.predict, args.threads, args.calls))
    base = statistics.median(times["minimal"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:12s} {median * 1e6:7.1f} us/request (median of {args.rounds}), {median / base:4.2f}x minimal")


if __name__ == "__main__":
    main()
