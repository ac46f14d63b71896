"""Goodput under deadlines: answers within their deadline per second, past capacity, with and without the rules.

Run: ``python benchmarks/goodput.py [--model synthetic] [--loads 1.1,1.5] [--deadline 4] [--duration 2]``

Open-loop Poisson arrivals at 110 % and 150 % of the measured capacity (the
throughput of ``max_wait_ms=0`` under a saturating closed loop), each request
with the same deadline, a few full batches' run time (``--deadline``, in full
batches). Goodput counts the requests answered with their result within their
deadline (from the call), per second of arrivals, as a fraction of capacity;
"answered" counts them all, in time or late (a late answer is one the loop
delivered after the deadline: the batcher fails a running request at its
deadline only when its worker wakes in time). Two batchers side
by side on the same arrival times:

* ``batchkit``: admission (a request whose predicted answer comes after its
  deadline is refused at once with ``RequestTimeoutError``) and early failure
  (one that its batch cannot answer in time leaves before the batch forms);
* ``fifo``: the same batcher with both turned off (``guard_deadlines``): a
  plain FIFO that still fails a request once its deadline has passed.

``max_queue_size`` is raised so that the queue bound does not hide the FIFO's
collapse. Each load also runs in ``benchmarks/policy_sim.py``'s simulation (the
scheduler alone on a virtual clock, the model's cost as measured here), which
shows the policy without the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
from adaptive_wait import MAX_BATCH, Subject, replay, saturated_throughput
from policy_sim import simulate

import batchkit

QUEUE = 1_000_000


async def offer(
    batcher: batchkit.Batcher[Any, Any], item: Any, arrivals: np.ndarray, deadline: float
) -> dict[str, Any]:
    """One request per arrival time; what became of each."""
    loop = asyncio.get_running_loop()
    counts = {"on_time": 0, "late": 0, "refused": 0, "failed_early": 0, "timed_out": 0}
    latencies: list[float] = []
    start = loop.time()

    async def one(planned: float) -> None:
        sent = loop.time()  # the deadline runs from the call (a late generator is not the batcher's doing)
        try:
            await batcher.predict(item)
        except batchkit.RequestTimeoutError as error:
            text = str(error)
            counts["refused" if "refused" in text else "failed_early" if "not sent" in text else "timed_out"] += 1
            return
        latency = loop.time() - sent
        latencies.append(latency)
        counts["on_time" if latency <= deadline else "late"] += 1

    await replay(arrivals, start, one)
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        **counts,
        "seconds": float(arrivals[-1]),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


async def measure(
    subject: Subject, guard: bool, arrivals: np.ndarray, deadline: float, capacity: float
) -> dict[str, Any]:
    batcher = batchkit.Batcher(
        subject.fn,
        max_batch_size=MAX_BATCH,
        max_wait_ms="auto",
        max_queue_size=QUEUE,
        timeout_ms=deadline * 1000,
        collate=subject.collate,
    )
    async with batcher:
        batcher._scheduler.guard_deadlines = guard  # the benchmark's switch: off is a plain FIFO
        warm = np.cumsum(np.random.default_rng(1).exponential(1 / (0.5 * capacity), size=int(0.25 * capacity)))
        await offer(batcher, subject.item, warm, deadline)  # learn the model's cost at half load
        return await offer(batcher, subject.item, arrivals, deadline)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="synthetic", choices=["synthetic", "mlp"])
    parser.add_argument("--loads", default="1.1,1.5", help="fractions of measured capacity")
    parser.add_argument("--deadline", type=float, default=4.0, help="each request's timeout, in full batches")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of arrivals per run")
    args = parser.parse_args(argv)

    subject = Subject(args.model)
    capacity = asyncio.run(saturated_throughput(subject))
    batch_s = MAX_BATCH / capacity  # a full batch, hand-offs included
    deadline = args.deadline * batch_s
    print(
        f"{args.model}: capacity {capacity:,.0f} req/s (a full batch every {batch_s * 1e3:.2f} ms); "
        f"deadline {deadline * 1e3:.1f} ms ({args.deadline:g} full batches)"
    )

    handoff = max(0.0, batch_s - subject.cost(MAX_BATCH))  # per batch, beyond the model's own run
    columns = "goodput / capacity | answered / capacity | on time | late | refused | failed early | timed out | p99 ms"
    print(f"| load | batcher | {columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for load in (float(x) for x in args.loads.split(",")):
        arrivals = np.cumsum(rng.exponential(1 / (load * capacity), size=int(load * capacity * args.duration)))
        for guard in (True, False):
            name = "batchkit" if guard else "fifo"
            r = asyncio.run(measure(subject, guard, arrivals, deadline, capacity))
            print(
                f"| {load:.2f} | {name} | {r['on_time'] / r['seconds'] / capacity:.2f} "
                f"| {(r['on_time'] + r['late']) / r['seconds'] / capacity:.2f} | {r['on_time']} | {r['late']} "
                f"| {r['refused']} | {r['failed_early']} | {r['timed_out']} | {r['p99_ms']:.1f} |",
                flush=True,
            )
        for guard in (True, False):
            sim = simulate(
                subject.cost, arrivals, overhead=handoff, jitter=0.05, timer_resolution=0.001, guard=guard,
                max_batch_size=MAX_BATCH, max_wait_ms="auto", timeout_ms=deadline * 1000, max_queue_size=QUEUE,
            )  # fmt: skip
            print(
                f"| {load:.2f} | {'batchkit' if guard else 'fifo'} (simulated) | {sim.goodput / capacity:.2f} "
                f"| {sim.throughput / capacity:.2f} "
                f"| {sim.on_time} | {len(sim.latencies) - sim.on_time} | {sim.refused} | - | {sim.timed_out} "
                f"| {sim.percentile_ms(99):.1f} |"
            )
    print(f"\nat {time.strftime('%Y-%m-%d %H:%M')}; goodput target: >= 0.90 of capacity at 1.10 and 1.50")


if __name__ == "__main__":
    main()
