"""``max_wait_ms="auto"`` against a sweep of fixed waits, under Poisson loads from low to near capacity.

Run: ``python benchmarks/adaptive_wait.py [--model synthetic,mlp] [--slots 1,2] [--repeats 3] [--simulate]``

Two models. ``synthetic`` sleeps ``a + b*B`` (2 ms + 0.05 ms per sample, GIL
released, like a GPU kernel), so its cost is the same in every run and on a
loaded machine. ``mlp`` is the CPU MLP of ``batchkit bench`` (one torch thread,
stacked by the default collate), whose cost per sample falls with the batch size
and which competes with the event loop for the CPU.

Capacity is *measured* first (the throughput of ``max_wait_ms=0`` under a
saturating closed loop), not computed from the model's cost: the loop, the
thread hand-off and the other processes on the machine take their share, and a
load quoted against a nominal capacity can be past the real one. Each load is a
fraction of that measured capacity.

At each load, every variant gets the same Poisson arrival times, in an order
that rotates from one repeat to the next, and each repeat draws new times.
Latency counts from the planned arrival time. A cell is the median over the
repeats of each repeat's p50 / p99 (one stall of the machine moves the p99 of
one 1 s run, not the median of three), and the mean throughput. The summary
gives ``auto``'s p99 and throughput as ratios to the best fixed wait at that
load (the target: p99 ratio <= 1.10, throughput ratio >= 1.00 within noise).
``naive-thread`` (one ``to_thread`` call per request) is the low-load reference.

``--simulate`` runs the same sweep through ``policy_sim.py``: the real scheduler
on a virtual clock, each batch costing what the model was measured to cost plus
the measured hand-off, so the policy is compared without the machine's noise
(on a shared 2-core machine, the p99 of neighbouring fixed waits that act alike
differs by up to 10x from one real run to the next). ``--slots`` runs with
several replicas (threads), where ``auto`` spaces batches out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from policy_sim import simulate

import batchkit

FIXED_COST = 0.002
PER_SAMPLE = 0.00005
MAX_BATCH = 64
MIN_REQUESTS = 300  # per cell: a p99 needs a few hundred samples


def synthetic(batch: list[int]) -> list[int]:
    time.sleep(FIXED_COST + PER_SAMPLE * len(batch))
    return batch


class Subject:
    """A model to batch: the function, one input, and the collate to use."""

    def __init__(self, name: str) -> None:
        """``cost(n)``: a batch of ``n``'s run time (the model alone), for the simulation."""
        self.name = name
        self.handoff: float | None = None  # seconds per batch beyond the model's run, once measured
        if name == "synthetic":
            self.fn: Callable[[Any], Any] = synthetic
            self.item: Any = 0
            self.collate: Any = None
            self.one: Callable[[Any], Any] = lambda x: synthetic([x])[0]
            self.cost: Callable[[int], float] = lambda n: FIXED_COST + PER_SAMPLE * n
            return
        from batchkit.bench._model import MODELS, Model, configure_threads

        configure_threads(1)  # the other core is the event loop's
        model = Model(MODELS["mlp"], "cpu")
        self.fn, self.item, self.collate, self.one = model, model.sample(), "auto", model.run_one
        sizes = [1, 2, 4, 8, 16, 32, 64]
        seconds = [model.seconds_per_batch(n) for n in sizes]
        self.cost = lambda n: float(np.interp(n, sizes, seconds))


async def replay(arrivals: np.ndarray, start: float, one: Callable[[float], Any]) -> None:
    """Start ``one(planned)`` at each arrival time (seconds after ``start``, loop time); wait for them all."""
    loop = asyncio.get_running_loop()
    tasks = []
    for at in arrivals:
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(start + at)))
    await asyncio.gather(*tasks)


async def run_load(predict: Any, item: Any, arrivals: np.ndarray) -> dict[str, float]:
    """Send one request at each arrival time (seconds from now); latency from the planned time, in ms."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    start = loop.time()

    async def one(planned: float) -> None:
        await predict(item)
        latencies.append(loop.time() - planned)

    await replay(arrivals, start, one)
    elapsed = loop.time() - start
    ms = np.asarray(latencies) * 1000
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def _wait(variant: str) -> Any:
    return "auto" if variant == "auto" else float(variant.split("=")[1])


async def measure(subject: Subject, variant: str, arrivals: np.ndarray, slots: int = 1) -> dict[str, float]:
    if variant == "naive-thread":
        return await run_load(lambda x: asyncio.to_thread(subject.one, x), subject.item, arrivals)
    batcher = batchkit.Batcher(
        subject.fn, max_batch_size=MAX_BATCH, max_wait_ms=_wait(variant), collate=subject.collate, replicas=slots
    )
    async with batcher:
        await run_load(batcher.predict, subject.item, arrivals[: max(10, len(arrivals) // 10)] / 10)  # warm up, learn
        result = await run_load(batcher.predict, subject.item, arrivals)
        result["mean_batch"] = batcher.stats().mean_batch_size
    return result


def simulated(subject: Subject, variant: str, arrivals: np.ndarray, slots: int, handoff: float) -> dict[str, float]:
    """``measure`` in ``policy_sim``'s simulation: the same scheduler on a virtual clock, the model's cost."""
    if variant == "naive-thread":
        variant = "fixed=0"  # a batch of one: not a policy of the scheduler's; the closest it has
    r = simulate(
        subject.cost, arrivals, slots=slots, overhead=handoff, jitter=0.05, timer_resolution=0.001,
        max_batch_size=MAX_BATCH, max_wait_ms=_wait(variant),
    )  # fmt: skip
    return {
        "throughput": r.throughput,
        "p50_ms": r.percentile_ms(50),
        "p99_ms": r.percentile_ms(99),
        "mean_batch": r.mean_batch,
    }


async def saturated_throughput(subject: Subject, seconds: float = 1.5, slots: int = 1) -> float:
    """Requests/s of ``max_wait_ms=0`` with ``4 * MAX_BATCH`` clients sending back to back."""
    batcher = batchkit.Batcher(
        subject.fn, max_batch_size=MAX_BATCH, max_wait_ms=0, collate=subject.collate, replicas=slots
    )
    async with batcher as b:
        done = 0
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await b.predict(subject.item)
                done += 1

        await asyncio.gather(*(client() for _ in range(4 * MAX_BATCH)))  # the first round warms up
        done = 0
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(*(client() for _ in range(4 * MAX_BATCH)))
        return done / (time.perf_counter() - start)


def sweep(subject: Subject, slots: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    variants = ["auto", *(f"fixed={w}" for w in args.waits.split(","))]
    if slots == 1 and not args.simulate:
        variants.append("naive-thread")
    if args.simulate:  # one slot's hand-off for all: slots in the simulation do not share the machine's cores
        if args.handoff_ms is not None:
            subject.handoff = args.handoff_ms / 1000
        elif subject.handoff is None:
            one = asyncio.run(saturated_throughput(subject))
            subject.handoff = max(0.0, MAX_BATCH / one - subject.cost(MAX_BATCH))
        handoff = subject.handoff
        capacity = slots * MAX_BATCH / (subject.cost(MAX_BATCH) + handoff)
    else:
        capacity = asyncio.run(saturated_throughput(subject, slots=slots))
        handoff = max(0.0, slots * MAX_BATCH / capacity - subject.cost(MAX_BATCH))  # per batch, beyond the model
    where = "simulated" if args.simulate else "measured"
    name = subject.name if slots == 1 else f"{subject.name} x{slots}"
    print(f"\n{name}: {where} capacity {capacity:,.0f} req/s; hand-off {handoff * 1e3:.2f} ms per batch")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for load in (float(x) for x in args.loads.split(",")):
        rate = load * capacity
        at_load = [v for v in variants if v != "naive-thread" or load <= 0.1]  # batch-of-one cannot keep up
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in at_load}
        for repeat in range(args.repeats):
            arrivals = np.cumsum(rng.exponential(1 / rate, size=max(MIN_REQUESTS, int(rate * args.duration))))
            shift = repeat % len(at_load)
            for variant in at_load[shift:] + at_load[:shift]:
                if args.simulate:
                    runs[variant].append(simulated(subject, variant, arrivals, slots, handoff))
                else:
                    runs[variant].append(asyncio.run(measure(subject, variant, arrivals, slots)))
        for variant, results in runs.items():
            row: dict[str, Any] = {"model": name, "load": load, "rate": rate, "variant": variant}
            for field in ("p50_ms", "p99_ms", "mean_batch"):
                row[field] = statistics.median(r.get(field, 1.0) for r in results)
            row["throughput"] = statistics.fmean(r["throughput"] for r in results)
            row["p99_runs"] = [round(r["p99_ms"], 2) for r in results]
            rows.append(row)
            print(
                f"load {load:4.2f} ({rate:7,.0f}/s) {variant:12} p50 {row['p50_ms']:7.2f} ms  "
                f"p99 {row['p99_ms']:7.2f} ms  {row['throughput']:8,.0f} req/s  batch {row['mean_batch']:5.1f}  "
                f"(p99 runs {row['p99_runs']})",
                flush=True,
            )
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    print("\nauto vs the best fixed wait at each load (p99 ratio <= 1.10 is within 10 %):")
    print("| model | load | best fixed | auto p99 / best p99 | auto throughput / best fixed throughput |")
    print("|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        for load in sorted({r["load"] for r in rows if r["model"] == model}):
            at = [r for r in rows if r["model"] == model and r["load"] == load]
            auto = next(r for r in at if r["variant"] == "auto")
            fixed = [r for r in at if r["variant"].startswith("fixed")]
            best = min(fixed, key=lambda r: r["p99_ms"])
            ratio = auto["p99_ms"] / best["p99_ms"]
            throughput = auto["throughput"] / max(r["throughput"] for r in fixed)
            print(f"| {model} | {load:4.2f} | {best['variant']} | {ratio:.2f} | {throughput:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="synthetic", help="comma-separated: synthetic, mlp")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of arrivals per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (the median is reported)")
    parser.add_argument("--loads", default="0.01,0.1,0.3,0.6,0.75,0.85,0.9", help="fractions of measured capacity")
    parser.add_argument("--waits", default="0,0.5,1,2,5", help="fixed max_wait_ms values")
    parser.add_argument("--slots", default="1", help="comma-separated: replicas (threads running batches)")
    parser.add_argument("--simulate", action="store_true", help="run policy_sim's simulation instead (no noise)")
    parser.add_argument("--handoff-ms", type=float, help="--simulate: per-batch hand-off (default: measured)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/adaptive.json"))
    args = parser.parse_args(argv)

    print(f"synthetic model: {FIXED_COST * 1e3:g} ms + {PER_SAMPLE * 1e3:g} ms/sample")
    subjects = [Subject(name) for name in args.model.split(",")]
    rows = [row for s in subjects for slots in map(int, args.slots.split(",")) for row in sweep(s, slots, args)]
    summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
