"""``batchkit bench --scenario generate``: why step-level batching matters for models that answer in steps.

The model is the GRU of ``_gru``; each request asks for a long-tailed number of
steps (1 to 256, median 16). Seven ways to serve it:

- ``naive-thread``: one request at a time per thread (``asyncio.to_thread``), no batching;
- ``request-padded``: request-level batching as issue #13 defines it: a ``Batcher`` whose fn generates the
  whole batch, every row computed at every step until the longest is done (finished rows padded, their
  outputs discarded), every output returned at the end;
- ``request``: the same, but finished rows are dropped between steps (the batch shrinks): a cheaper baseline;
- ``stream-padded`` and ``stream``: a ``Batcher`` whose fn is a generator (each step yields an item per
  request, END once done), finished rows padded or dropped;
- ``ray-serve-stream``: Ray Serve's ``@serve.batch`` on an async generator (each step on a thread), finished
  rows dropped;
- ``step``: ``batchkit.StepBatcher``, rows joining and leaving between steps.

All but ``step`` run a batch until its longest member is done, and requests
arriving meanwhile wait for the whole batch. Loads: a closed loop (clients
each waiting for their whole answer) for throughput, and Poisson arrivals at
fractions of the ``request-padded`` variant's measured saturation throughput
(the same offered load for every variant), for time to first item and total
latency. Every request's items are checked against what it asked for (``wrong``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import batchkit

from ._gru import GRU, Item, Prompt, State, draw_length
from ._loads import HEARTBEAT_S, Load, _heartbeat, _Recorder, clock, generator_reach
from ._peers import _import, _missing, ray_serve_batcher, stop_ray_serve_batcher
from ._results import REACH, machine_info, percentiles_ms
from ._variants import Setting

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["BASELINE", "GENERATE_FAMILIES", "GenCell", "GenPlan", "run_generate"]

GENERATE_FAMILIES = ("naive-thread", "request-padded", "request", "stream-padded", "stream", "ray-serve-stream", "step")
"""The variants of the generate scenario, in table order."""

BASELINE = "request-padded"
"""Request-level batching as issue #13 defines it: the targets and the open loop's capacity refer to it."""

Stream = Callable[[Prompt], AsyncIterator[Item]]
Serve = Callable[[GRU], AbstractAsyncContextManager[Stream]]


@dataclass(frozen=True)
class GenPlan:
    families: tuple[str, ...]
    reference: Setting
    closed: tuple[int, ...]
    open_fractions: tuple[float, ...]
    open_rates: tuple[float, ...]
    warmup_s: float
    duration_s: float
    threads: int
    out: Path


# -- the variants ----------------------------------------------------------------------------


@asynccontextmanager
async def _naive_thread(model: GRU, setting: Setting) -> AsyncIterator[Stream]:
    async def items(prompt: Prompt) -> AsyncIterator[Item]:
        (output,) = await asyncio.to_thread(model.generate, [prompt])
        for item in output:
            yield item

    yield items


def _request(padded: bool) -> Callable[[GRU, Setting], AbstractAsyncContextManager[Stream]]:
    """Request-level batching: the whole batch's outputs at the end; finished rows padded or dropped."""

    @asynccontextmanager
    async def serve(model: GRU, setting: Setting) -> AsyncIterator[Stream]:
        batcher: batchkit.Batcher[Prompt, list[Item]] = batchkit.Batcher(
            model.generate_padded if padded else model.generate,
            max_batch_size=setting.batch_size,
            max_wait_ms=setting.fixed_wait_ms,
            collate=None,
            name="request-padded" if padded else "request",
        )

        async def items(prompt: Prompt) -> AsyncIterator[Item]:
            for item in await batcher.predict(prompt):
                yield item

        async with batcher:
            yield items

    return serve


def _stream(padded: bool) -> Callable[[GRU, Setting], AbstractAsyncContextManager[Stream]]:
    """Generator streaming: an item per request per step; finished rows padded or dropped."""

    @asynccontextmanager
    async def serve(model: GRU, setting: Setting) -> AsyncIterator[Stream]:
        batcher: batchkit.Batcher[Prompt, Item] = batchkit.Batcher(
            model.generate_steps_padded if padded else model.generate_steps,
            max_batch_size=setting.batch_size,
            max_wait_ms=setting.fixed_wait_ms,
            collate=None,
            name="stream-padded" if padded else "stream",
        )
        async with batcher:
            yield batcher.stream

    return serve


@asynccontextmanager
async def _step(model: GRU, setting: Setting) -> AsyncIterator[Stream]:
    batcher: batchkit.StepBatcher[Prompt, Item] = batchkit.StepBatcher(
        model, max_batch_size=setting.batch_size, max_wait_ms=setting.fixed_wait_ms, name="step"
    )
    async with batcher:
        yield batcher.stream


@asynccontextmanager
async def _ray_serve_stream(model: GRU, setting: Setting) -> AsyncIterator[Stream]:
    """``@serve.batch`` on an async generator: StopIteration in a position ends that caller's stream."""

    async def generate(prompts: list[Prompt]) -> AsyncIterator[list[Any]]:
        state: State = await asyncio.to_thread(model.start, prompts)
        positions = list(range(len(prompts)))
        while positions:
            items, finished = await asyncio.to_thread(model.step, state)
            out: list[Any] = [StopIteration] * len(prompts)
            for position, item in zip(positions, items, strict=True):
                out[position] = item
            yield out
            keep = [row for row, done in enumerate(finished) if not done]
            if len(keep) < len(positions):
                positions = [positions[row] for row in keep]
                if keep:
                    state = model.select(state, keep)

    predict: Any = ray_serve_batcher(generate, setting)
    try:
        yield predict
    finally:
        await stop_ray_serve_batcher(predict)
        asyncio.get_running_loop().set_exception_handler(_ignore_stopped)


def _ignore_stopped(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop what ``@serve.batch``'s generator mode leaves behind when stopped (cancelled batches, ended streams)."""
    if not isinstance(context.get("exception"), (asyncio.CancelledError, StopAsyncIteration)):
        loop.default_exception_handler(context)


SERVES: dict[str, Callable[[GRU, Setting], AbstractAsyncContextManager[Stream]]] = {
    "naive-thread": _naive_thread,
    "request-padded": _request(padded=True),
    "request": _request(padded=False),
    "stream-padded": _stream(padded=True),
    "stream": _stream(padded=False),
    "ray-serve-stream": _ray_serve_stream,
    "step": _step,
}


def available(families: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The families that can run here, and a reason for each one skipped (Ray Serve not installed)."""
    skipped: dict[str, str] = {}
    if "ray-serve-stream" in families:
        reason = _missing("ray.serve")
        if reason is None:
            _import("ray.serve.batching")
        else:
            skipped["ray-serve-stream"] = reason
    return [f for f in GENERATE_FAMILIES if f in families and f not in skipped], skipped


# -- the loads ---------------------------------------------------------------------------------


@dataclass
class GenTrace:
    window_s: float
    completions: int = 0
    items: int = 0
    """Items delivered inside the window."""
    first: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    unfinished: list[float] = field(default_factory=list)
    errors: int = 0
    wrong: int = 0
    """Requests answered with items other than exactly their own, in order."""
    lags: list[float] = field(default_factory=list)
    model_busy: float = 0.0


async def _call(stream: Stream, prompt: Prompt, sent: float, recorder: _Recorder, trace: GenTrace) -> None:
    got: list[tuple[int, int]] = []
    first: float | None = None
    start, stop = recorder.start, recorder.stop
    try:
        async with contextlib.aclosing(cast(AsyncGenerator[Item, None], stream(prompt))) as items:
            async for tag, index, _token in items:
                now = clock()
                if first is None:
                    first = now
                if start <= now <= stop:
                    trace.items += 1
                got.append((tag, index))
    except Exception:
        if sent >= start:
            trace.errors += 1
        return
    done = clock()
    if start <= done <= stop:
        trace.completions += 1
    if got != prompt.expected():
        trace.wrong += 1
    if sent >= start:
        trace.latencies.append(done - sent)
        trace.first.append((first if first is not None else done) - sent)


def _prompt(rng: random.Random, tag: int, vocab: int) -> Prompt:
    return Prompt(tag=tag, token=rng.randrange(vocab), length=draw_length(rng))


async def _closed_client(stream: Stream, client: int, vocab: int, recorder: _Recorder, trace: GenTrace) -> None:
    rng = random.Random(1000 + client)
    count = 0
    while (sent := clock()) < recorder.stop:
        count += 1
        await _call(stream, _prompt(rng, client * 1_000_000 + count, vocab), sent, recorder, trace)
        await asyncio.sleep(0)


async def _open_arrivals(
    stream: Stream, rate: float, vocab: int, recorder: _Recorder, trace: GenTrace, calls: set[asyncio.Task[None]]
) -> None:
    rng = random.Random(7)  # the same arrivals and lengths for every variant at a given rate
    loop = asyncio.get_running_loop()
    due = clock()
    count = 0
    while (due := due + rng.expovariate(rate)) < recorder.stop:
        count += 1
        prompt = _prompt(rng, count, vocab)
        await asyncio.sleep(max(0.0, due - clock()))
        task = loop.create_task(_call(stream, prompt, due, recorder, trace))
        calls.add(task)
        task.add_done_callback(calls.discard)


async def _drain(calls: set[asyncio.Task[None]], timeout: float, recorder: _Recorder, trace: GenTrace) -> None:
    if calls:
        await asyncio.wait(set(calls), timeout=timeout)
    leftovers = [task for task in calls if not task.done()]
    now = clock()
    for task in leftovers:
        task.cancel()
    trace.unfinished = [now - recorder.start] * len(leftovers)
    await asyncio.gather(*leftovers, return_exceptions=True)


async def run_generate_load(stream: Stream, model: GRU, load: Load, *, warmup_s: float, duration_s: float) -> GenTrace:
    """Apply ``load`` to ``stream`` for ``warmup_s + duration_s``; return the window's trace."""
    start = clock() + warmup_s
    recorder = _Recorder(start, start + duration_s)
    trace = GenTrace(window_s=duration_s, lags=recorder.trace.lags)
    loop = asyncio.get_running_loop()
    heartbeat = loop.create_task(_heartbeat(recorder))
    calls: set[asyncio.Task[None]] = set()
    if load.kind == "closed":
        clients = range(int(load.value))
        calls.update(loop.create_task(_closed_client(stream, c, model.vocab, recorder, trace)) for c in clients)
    else:
        await _open_arrivals(stream, load.value, model.vocab, recorder, trace, calls)
    await _drain(calls, max(0.0, recorder.stop - clock()) + max(1.0, duration_s), recorder, trace)
    heartbeat.cancel()
    await asyncio.gather(heartbeat, return_exceptions=True)
    trace.model_busy = model.busy(recorder.start, recorder.stop)
    return trace


# -- the numbers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenCell:
    """One variant under one load. Times in milliseconds."""

    variant: str
    family: str
    max_batch_size: int | None
    load: str
    load_kind: str
    load_value: float
    throughput: float
    """Requests completed per second in the window."""
    tokens_per_s: float
    """Items delivered per second in the window."""
    requests: int
    unfinished: int
    errors: int
    wrong: int
    first_p50_ms: float | None
    """Time to first item, from the request's (planned) arrival."""
    first_p99_ms: float | None
    p50_ms: float | None
    """Total latency: until the last item (unfinished requests count as a lower bound)."""
    p99_ms: float | None
    mean_rows: float
    """Rows per model step."""
    model_busy: float
    lag_p99_ms: float | None
    lag_max_ms: float | None
    load_fraction: float | None = None
    load_reach: float | None = None

    @property
    def load_unreached(self) -> bool:
        return self.load_reach is not None and self.load_reach < REACH


def summarize(family: str, setting: Setting | None, load: Load, trace: GenTrace, mean_rows: float) -> GenCell:
    first_p50, first_p99 = percentiles_ms(trace.first + trace.unfinished, (50, 99))
    p50, p99 = percentiles_ms(trace.latencies + trace.unfinished, (50, 99))
    (lag_p99,) = percentiles_ms(trace.lags, (99,))
    name = family if setting is None else f"{family}[{setting.label}]"
    return GenCell(
        variant=name,
        family=family,
        max_batch_size=setting.batch_size if setting else None,
        load=load.label,
        load_kind=load.kind,
        load_value=load.value,
        throughput=trace.completions / trace.window_s,
        tokens_per_s=trace.items / trace.window_s,
        requests=len(trace.latencies),
        unfinished=len(trace.unfinished),
        errors=trace.errors,
        wrong=trace.wrong,
        first_p50_ms=first_p50,
        first_p99_ms=first_p99,
        p50_ms=p50,
        p99_ms=p99,
        mean_rows=mean_rows,
        model_busy=trace.model_busy,
        lag_p99_ms=lag_p99,
        lag_max_ms=max(trace.lags) * 1000.0 if trace.lags else None,
        load_fraction=load.fraction,
        load_reach=load.reach,
    )


# -- the run -----------------------------------------------------------------------------------


async def _serve_and_load(family: str, model: GRU, load: Load, plan: GenPlan) -> GenTrace:
    async with SERVES[family](model, plan.reference) as stream:
        return await run_generate_load(stream, model, load, warmup_s=plan.warmup_s, duration_s=plan.duration_s)


def measure(family: str, model: GRU, load: Load, plan: GenPlan) -> GenCell:
    """One cell, on a fresh event loop."""
    model.reset_counts()
    trace = asyncio.run(_serve_and_load(family, model, load, plan))
    setting = None if family == "naive-thread" else plan.reference
    return summarize(family, setting, load, trace, model.mean_rows)


def _open_loads(plan: GenPlan, capacity: float) -> list[Load]:
    if plan.open_rates:
        loads = [Load("open", rate, rate / capacity if capacity else None) for rate in plan.open_rates]
    else:
        loads = [Load("open", fraction * capacity, fraction) for fraction in plan.open_fractions]
    return [Load(load.kind, load.value, load.fraction, generator_reach(load.value)) for load in loads]


def run_generate(plan: GenPlan, console: Console) -> list[GenCell]:
    """Measure every (variant, load), then write and show the results."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ._report_generate import write_generate

    model = GRU()
    families, skipped = available(plan.families)
    for family, reason in skipped.items():
        console.print(f"[yellow]skipping {family}[/]: {escape(reason)}")
    one_ms = model.seconds_per_step(1) * 1000.0
    batch_ms = model.seconds_per_step(plan.reference.batch_size) * 1000.0
    console.print(
        f"model gru ({model.parameters:,} parameters), torch threads {plan.threads}: one step {one_ms:.3f} ms for "
        f"1 row, {batch_ms:.3f} ms for {plan.reference.batch_size} rows"
    )

    closed = [Load("closed", c) for c in plan.closed]
    cells: list[GenCell] = []
    capacity = 0.0
    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    gc.collect()
    gc.freeze()
    try:
        with Progress(*columns, console=console) as progress:
            opened = bool(plan.open_fractions or plan.open_rates)
            total = len(families) * (len(closed) + len(plan.open_rates or plan.open_fractions))
            task = progress.add_task("", total=total)
            # The open loads are fractions of request-level batching's saturation throughput: measure it first.
            order = sorted(families, key=lambda f: f != BASELINE)
            for family in order:
                for load in closed:
                    progress.update(task, description=f"{family} {load.label}")
                    cells.append(measure(family, model, load, plan))
                    progress.advance(task)
            if opened and not plan.open_rates:
                capacity = _capacity(cells, closed, model, plan, progress)
            open_loads = _open_loads(plan, capacity) if opened else []
            for load in open_loads:
                if load.reach is not None and load.reach < REACH:
                    console.print(f"[yellow]warning[/]: open loop at {load.value:,.0f} requests/s is beyond "
                                  "this machine's load generator; those rows are marked '!'")  # fmt: skip
            for family in order:
                for load in open_loads:
                    progress.update(task, description=f"{family} {load.label}")
                    cells.append(measure(family, model, load, plan))
                    progress.advance(task)
    finally:
        gc.unfreeze()
    cells.sort(key=lambda c: GENERATE_FAMILIES.index(c.family))

    settings = {
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
        "reference": plan.reference.label,
        "open_loop_capacity_rps": capacity or None,
        "capacity_from": f"{BASELINE} (request-level batching), closed loop at the highest concurrency",
        "heartbeat_ms": HEARTBEAT_S * 1000.0,
        "lengths": "lognormal, median 16, sigma 1.2, clipped to 1..256 steps",
    }
    model_info = {
        "name": "gru",
        "parameters": model.parameters,
        "hidden": model.hidden_size,
        "vocab": model.vocab,
        "ms_per_step_1_row": one_ms,
        f"ms_per_step_{plan.reference.batch_size}_rows": batch_ms,
    }
    meta = {"machine": machine_info("cpu", plan.threads), "model": model_info, "settings": settings}
    write_generate(plan.out, meta, cells, skipped, console)
    return cells


def _capacity(cells: list[GenCell], closed: list[Load], model: GRU, plan: GenPlan, progress: Any) -> float:
    """Request-level batching's throughput (requests/s) at the highest closed-loop concurrency (measured if needed)."""
    top = max((load.value for load in closed), default=64.0)
    for cell in cells:
        if cell.family == BASELINE and cell.load_kind == "closed" and cell.load_value == top:
            return cell.throughput
    progress.update(progress.task_ids[0], description=f"capacity: {BASELINE} closed {top:g}")
    return measure(BASELINE, model, Load("closed", top), plan).throughput


def write_json(path: Path, meta: dict[str, Any], cells: list[GenCell], skipped: dict[str, str]) -> None:
    document = {**meta, "scenario": "generate", "results": [asdict(c) for c in cells], "skipped": skipped}
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
