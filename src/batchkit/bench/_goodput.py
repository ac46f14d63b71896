"""``batchkit bench --scenario goodput``: requests answered within their deadline, against the optimum.

A service has a deadline (an SLO): what counts is goodput, the requests answered
correctly within it, per second. The scenario:

1. measures the model's cost curve (run time of a stacked batch of each size, up
   to the largest batch of the variants) and from it the capacity (requests/s at
   the best batch size) and the default deadline (4x a full batch's run time);
2. draws one open-loop arrival trace per (pattern, load): Poisson, and bursty
   (on/off, same mean), at fractions of the capacity; each request is due its
   deadline after its planned arrival;
3. computes, per trace, the exact optimum: the most requests any batcher that
   knew every arrival in advance could answer in time on this cost curve
   (``_optimum``);
4. replays each trace against every variant on a fresh event loop: batchkit at
   each setting, batchkit with ``predict(x, timeout_ms=<time left>)``, the floor
   batcher and the installed peers at the reference setting.

Every variant sees the same arrivals and inputs. A request is *good* when its
answer is its own (checked) and arrives by its deadline; a late answer, a
refusal (``QueueFullError``), an early failure (``RequestTimeoutError``) or no
answer at all is not. Callers wait for their answers: a variant that is not
given the deadline keeps computing answers nobody wants any more. Requests still
unanswered a grace period after the last deadline are cancelled (``unanswered``).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import batchkit

from ._arrivals import arrivals, peak_rate
from ._loads import generator_reach
from ._model import Model
from ._optimum import CostCurve, optimum
from ._peers import peer_variants
from ._replay import GRACE_S, POOL, Inputs, Outcome, Send, replay
from ._results import REACH, percentiles_ms
from ._variants import Setting, Variant, batchkit_variant, floor_variant

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "DEADLINE_FACTOR",
    "GOODPUT_FAMILIES",
    "GoodputCell",
    "GoodputLoad",
    "GoodputPlan",
    "Reference",
    "measure_cost_curve",
    "run_goodput",
]

GOODPUT_FAMILIES = ("batchkit", "batchkit-deadline", "floor", "ray-serve-inline", "ray-serve-thread", "batched")
DEADLINE_FACTOR = 4.0
"""The default deadline, in run times of a full batch."""
BURST_PERIOD = 8.0
"""Bursty arrivals: one on/off period lasts this many deadlines (on for half of it)."""


@dataclass(frozen=True)
class GoodputPlan:
    threads: int
    families: tuple[str, ...]
    settings: tuple[Setting, ...]
    reference: Setting
    fractions: tuple[float, ...]
    rates: tuple[float, ...]
    patterns: tuple[str, ...]
    deadline_ms: float | None
    warmup_s: float
    duration_s: float
    out: Path


@dataclass(frozen=True)
class GoodputVariant:
    name: str
    family: str
    setting: Setting
    serve: Callable[[Model], AbstractAsyncContextManager[Send]]


def _deaf(variant: Variant) -> GoodputVariant:
    """A variant that is not told the deadline: it serves every request however late."""

    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Send]:
        async with variant.serve(model) as predict:

            def send(x: Any, seconds_left: float | None) -> Awaitable[Any]:
                return predict(x)

            yield send

    assert variant.setting is not None
    return GoodputVariant(variant.name, variant.family, variant.setting, serve)


def _batchkit_deadline(setting: Setting) -> GoodputVariant:
    """batchkit told each request's deadline: ``predict(x, timeout_ms=<time left>)``."""

    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Send]:
        batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(
            model, max_batch_size=setting.batch_size, max_wait_ms=setting.wait_ms, name="bench"
        )

        def send(x: Any, seconds_left: float | None) -> Awaitable[Any]:
            return batcher.predict(x, timeout_ms=None if seconds_left is None else seconds_left * 1000.0)

        async with batcher:
            yield send

    return GoodputVariant(f"batchkit-deadline[{setting.label}]", "batchkit-deadline", setting, serve)


def goodput_variants(plan: GoodputPlan) -> tuple[list[GoodputVariant], dict[str, str]]:
    """The variants to run (in table order) and a reason for each family skipped."""
    wanted = set(plan.families)
    variants: list[GoodputVariant] = []
    if "batchkit" in wanted:
        variants += [_deaf(batchkit_variant(setting)) for setting in plan.settings]
    if "batchkit-deadline" in wanted:
        variants += [_batchkit_deadline(setting) for setting in plan.settings]
    if "floor" in wanted:
        variants.append(_deaf(floor_variant(plan.reference)))
    peers, skipped = peer_variants(plan.reference, wanted)
    variants += [_deaf(peer) for peer in peers]
    return variants, skipped


# -- the cost curve ------------------------------------------------------------------------------


def curve_sizes(max_batch: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (powers of two and halfway between) up to ``max_batch``, which is included."""
    sizes = {max_batch}
    power = 1
    while power < max_batch:
        sizes.update(s for s in (power, power + power // 2) if s < max_batch)
        power *= 2
    return sorted(sizes)


def measure_cost_curve(model: Model, max_batch: int, *, rounds: int = 15) -> tuple[CostCurve, CostCurve]:
    """Median run times per batch size: of ``model.run_list`` (stack, model, unbind: what any batcher of samples
    does; the optimum's costs) and of the model call alone (what the cells' model speed is compared with).

    The sizes are timed in turns, ``rounds`` times each, so that a disturbance slows every size alike.
    """
    sizes = curve_sizes(max_batch)
    items = [model.sample() for _ in range(max_batch)]
    for _ in range(3):
        model.run_list(items)  # warm up at the largest size
    model.reset_counts()
    whole: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            start = time.perf_counter()
            model.run_list(items[:size])
            whole[size].append(time.perf_counter() - start)
    calls: dict[int, list[float]] = {size: [] for size in sizes}
    for begin, end, size in model.run_log():
        calls[size].append(end - begin)
    model.reset_counts()

    def curve(times: dict[int, list[float]]) -> CostCurve:
        return CostCurve(tuple(sizes), tuple(float(np.median(times[size])) for size in sizes))

    return curve(whole), curve(calls)


def model_speed(runs: list[tuple[float, float, int]], model_cost: np.ndarray) -> float | None:
    """How fast the model ran in a cell against its cost curve: 1.0 as measured alone, 0.8 when 25 % slower."""
    spent = sum(end - begin for begin, end, _ in runs)
    if not runs or spent <= 0:
        return None
    return float(sum(model_cost[min(size, len(model_cost)) - 1] for _, _, size in runs)) / spent


# -- loads and references ------------------------------------------------------------------------


@dataclass(frozen=True)
class GoodputLoad:
    """One trace: an arrival pattern at a mean rate (requests/s), that rate's share of capacity."""

    pattern: str
    rate: float
    fraction: float
    by_rate: bool = False
    """Given as a rate (``--rates``) rather than a share of capacity: the label shows the rate."""
    reach: float | None = None
    """The share of arrivals the load generator alone issues on time at this pattern's peak rate."""

    @property
    def label(self) -> str:
        return f"{self.pattern} {self.rate:,.4g}/s" if self.by_rate else f"{self.pattern} {self.fraction:.0%}"

    @property
    def unreached(self) -> bool:
        return self.reach is not None and self.reach < REACH


@dataclass(frozen=True)
class Reference:
    """The exact optimum of one trace: the most requests any batcher could answer in time."""

    pattern: str
    load: str
    load_fraction: float
    requests: int
    offered_rps: float
    optimum: int
    optimum_rps: float
    speed: float | None = None
    """The median speed the model ran at in this trace's cells (against its cost curve)."""
    optimum_at_speed_rps: float | None = None
    """The optimum with the cost curve slowed to ``speed``: what the machine, as it ran, allowed."""


# -- the numbers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoodputCell:
    """One variant on one trace. Rates in requests/s, times in milliseconds."""

    variant: str
    family: str
    max_wait_ms: float | str
    """The batching setting: a wait in ms, or "auto"."""
    max_batch_size: int
    pattern: str
    load: str
    load_fraction: float
    offered_rps: float
    requests: int
    good: int
    late: int
    refused: int
    timed_out: int
    errors: int
    wrong: int
    unanswered: int
    goodput_rps: float
    """Requests answered correctly within their deadline, per second of the trace."""
    optimum_rps: float
    of_optimum: float | None
    """goodput / optimum (None when the optimum is 0)."""
    of_capacity: float
    p50_ms: float | None
    """Latency of the answered requests (late ones included), from the planned arrival."""
    p99_ms: float | None
    mean_batch_size: float
    model_busy: float
    model_speed: float | None
    """The model's speed in this cell against its cost curve (1.0: as fast as measured alone; None: never ran)."""
    lag_p99_ms: float | None
    load_reach: float | None = None

    @property
    def load_unreached(self) -> bool:
        return self.load_reach is not None and self.load_reach < REACH


def summarize(
    variant: GoodputVariant,
    load: GoodputLoad,
    ref: Reference,
    out: Outcome,
    capacity: float,
    duration_s: float,
    model_cost: np.ndarray,
) -> GoodputCell:
    p50, p99 = percentiles_ms(out.latencies, (50, 99))
    (lag_p99,) = percentiles_ms(out.lags, (99,))
    goodput = out.good / duration_s
    return GoodputCell(
        variant=variant.name,
        family=variant.family,
        max_wait_ms=variant.setting.wait_ms,
        max_batch_size=variant.setting.batch_size,
        pattern=load.pattern,
        load=load.label,
        load_fraction=load.fraction,
        offered_rps=ref.offered_rps,
        requests=ref.requests,
        good=out.good,
        late=out.late,
        refused=out.refused,
        timed_out=out.timed_out,
        errors=out.errors,
        wrong=out.wrong,
        unanswered=out.unanswered,
        goodput_rps=goodput,
        optimum_rps=ref.optimum_rps,
        of_optimum=out.good / ref.optimum if ref.optimum else None,
        of_capacity=goodput / capacity,
        p50_ms=p50,
        p99_ms=p99,
        mean_batch_size=out.mean_batch_size,
        model_busy=out.model_busy,
        model_speed=model_speed(out.runs, model_cost),
        lag_p99_ms=lag_p99,
        load_reach=load.reach,
    )


# -- the run -------------------------------------------------------------------------------------


def plan_loads(plan: GoodputPlan, capacity: float) -> list[GoodputLoad]:
    by_rate = bool(plan.rates)
    rates = list(plan.rates) or [fraction * capacity for fraction in plan.fractions]
    return [GoodputLoad(pattern, rate, rate / capacity, by_rate) for pattern in plan.patterns for rate in rates]


def burst_period(deadline_s: float, duration_s: float) -> float:
    """About ``BURST_PERIOD`` deadlines, adjusted so that the trace holds whole periods (its mean is then exact)."""
    cycles = max(1, round(duration_s / (BURST_PERIOD * deadline_s)))
    return duration_s / cycles


def run_goodput(plan: GoodputPlan, model: Model, console: Console) -> tuple[list[GoodputCell], list[Reference]]:
    """Measure the cost curve, compute each trace's optimum, replay each trace on every variant; write the results."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ._report_goodput import write_goodput

    variants, skipped = goodput_variants(plan)
    for family, reason in skipped.items():
        console.print(f"[yellow]skipping {family}[/]: {escape(reason)}")
    max_batch = max(v.setting.batch_size for v in variants) if variants else plan.reference.batch_size
    curve, model_curve = measure_cost_curve(model, max_batch)
    cost = curve.per_size()
    model_cost = model_curve.per_size()
    capacity = curve.capacity
    deadline_s = plan.deadline_ms / 1000.0 if plan.deadline_ms is not None else DEADLINE_FACTOR * float(cost[-1])
    period_s = burst_period(deadline_s, plan.duration_s)
    console.print(
        f"model {model.spec.name} ({model.parameters:,} parameters) on {model.device}, torch threads {plan.threads}: "
        f"{cost[0] * 1000:.3f} ms for 1 sample, {cost[-1] * 1000:.3f} ms for {max_batch}; capacity "
        f"{capacity:,.0f} requests/s (at batch {curve.best_size()}); deadline {deadline_s * 1000:.1f} ms"
    )
    loads = [
        replace(load, reach=generator_reach(peak_rate(load.pattern, load.rate))) for load in plan_loads(plan, capacity)
    ]
    for load in loads:
        if load.unreached:
            console.print(f"[yellow]warning[/]: {load.label} peaks at {peak_rate(load.pattern, load.rate):,.0f} "
                          "requests/s, beyond this machine's load generator; those rows are marked '!'")  # fmt: skip
    inputs = Inputs.make(model)
    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    cells: list[GoodputCell] = []
    references: list[Reference] = []
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(loads) * (2 + len(variants)))
        traces = []
        for load in loads:
            progress.update(task, description=f"optimum {load.label}")
            times = arrivals(load.pattern, load.rate, plan.duration_s, period_s=period_s)
            best = optimum(times, deadline_s, cost)
            references.append(
                Reference(load.pattern, load.label, load.fraction, len(times), len(times) / plan.duration_s, best,
                          best / plan.duration_s)
            )  # fmt: skip
            traces.append(times)
            progress.advance(task)
        gc.collect()
        gc.freeze()  # what exists now is not garbage: keep collections short during the measurements
        try:
            for load, times, ref in zip(loads, traces, references, strict=True):
                for variant in variants:
                    progress.update(task, description=f"{variant.name} {load.label}")
                    out = _measure(variant, model, inputs, times, deadline_s, plan)
                    cells.append(summarize(variant, load, ref, out, capacity, plan.duration_s, model_cost))
                    progress.advance(task)
        finally:
            gc.unfreeze()
        for index, (times, ref) in enumerate(zip(traces, references, strict=True)):
            progress.update(task, description=f"optimum at the measured speed, {ref.load}")
            references[index] = _at_speed(ref, [c for c in cells if c.load == ref.load], times, deadline_s, cost,
                                          plan.duration_s)  # fmt: skip
            progress.advance(task)
    settings = {
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
        "deadline_ms": deadline_s * 1000.0,
        "deadline_from": "--deadline-ms" if plan.deadline_ms is not None else f"{DEADLINE_FACTOR:g}x a full batch",
        "capacity_rps": capacity,
        "max_batch_size": max_batch,
        "burst_period_ms": period_s * 1000.0,
        "reference": plan.reference.label,
        "grace_ms": GRACE_S * 1000.0,
        "inputs": f"{POOL} distinct samples, cycled; each answer checked against its own",
        "optimum": "exact: the most requests a one-batch-at-a-time server knowing every arrival could answer within "
        "their deadlines, on the measured cost curve",
        "optimum_at_speed": "the same with the cost curve slowed to the median model speed of the trace's cells",
    }
    cost_curve = {
        "sizes": list(curve.sizes),
        "ms": [s * 1000.0 for s in curve.seconds],
        "model_call_ms": [s * 1000.0 for s in model_curve.seconds],
    }
    write_goodput(plan, model, settings, cost_curve, cells, references, skipped, console)
    return cells, references


def _at_speed(ref: Reference, cells: list[GoodputCell], times: np.ndarray, deadline_s: float, cost: np.ndarray,
              duration_s: float) -> Reference:  # fmt: skip
    """The reference with the optimum recomputed at the median speed the model ran at in ``cells``."""
    speeds = [c.model_speed for c in cells if c.model_speed is not None]
    if not speeds:
        return ref
    speed = float(np.median(speeds))
    best = optimum(times, deadline_s, cost / speed)
    return replace(ref, speed=speed, optimum_at_speed_rps=best / duration_s)


def _measure(
    variant: GoodputVariant, model: Model, inputs: Inputs, times: np.ndarray, deadline_s: float, plan: GoodputPlan
) -> Outcome:
    """One cell, on a fresh event loop."""

    async def cell() -> Outcome:
        async with variant.serve(model) as send:
            return await replay(
                send, model, inputs, times, deadline_s=deadline_s, duration_s=plan.duration_s,
                warmup_s=plan.warmup_s, warm_clients=variant.setting.batch_size,
            )  # fmt: skip

    return asyncio.run(cell())
