"""Drive a variant with a load and record what every request and the loop went through.

Closed loop: ``concurrency`` clients, each sending its next request when the
previous one is answered (and yielding to the loop once in between, as a client
behind a socket would). Open loop: requests arrive at Poisson times at a given
rate whatever happens to the earlier ones; latency is counted from the planned
arrival time, so a loop too busy to start a request on time is charged for it.

A heartbeat task sleeps 1 ms over and over and records how late it wakes: that
is how long any other coroutine (an HTTP handler, a health check) would wait.

Only the measurement window (after the warm-up) is counted. Requests still
unanswered when the drain time runs out are cancelled and counted as
``unfinished``, with the time they had waited as a lower bound of their latency.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ._model import Model
from ._variants import Predict

__all__ = ["HEARTBEAT_S", "Load", "Trace", "generator_reach", "run_load", "run_offline"]

HEARTBEAT_S = 0.001

clock = time.perf_counter


@dataclass(frozen=True)
class Load:
    """``closed`` at a concurrency, ``open`` at a rate (requests/s), or ``offline``."""

    kind: Literal["closed", "open", "offline"]
    value: float
    fraction: float | None = None  # open loop: the rate as a fraction of offline capacity
    reach: float | None = None
    """Open loop: the share of arrivals the generator alone issues on time at this rate (see ``generator_reach``)."""

    @property
    def label(self) -> str:
        if self.kind == "closed":
            return f"closed {self.value:g}"
        if self.kind == "open":
            share = f" ({self.fraction:.0%})" if self.fraction is not None else ""
            return f"open {self.value:.0f}/s{share}"
        return f"offline b={self.value:g}"


@dataclass
class Trace:
    """Raw observations of one measurement window (times in seconds)."""

    window_s: float
    completions: int = 0
    latencies: list[float] = field(default_factory=list)
    unfinished: list[float] = field(default_factory=list)
    errors: int = 0
    lags: list[float] = field(default_factory=list)
    model_busy: float = 0.0
    """Share of the window the model spent running (parallel calls can push it above 1)."""


class _Recorder:
    """Keeps what falls inside ``[start, stop]``."""

    def __init__(self, start: float, stop: float) -> None:
        self.start = start
        self.stop = stop
        self.trace = Trace(window_s=stop - start)

    def answered(self, sent: float, done: float) -> None:
        if self.start <= done <= self.stop:
            self.trace.completions += 1
        if sent >= self.start:
            self.trace.latencies.append(done - sent)

    def failed(self, sent: float) -> None:
        if sent >= self.start:
            self.trace.errors += 1


async def _heartbeat(recorder: _Recorder) -> None:
    """Sleep 1 ms over and over; record how late each sleep that overlaps the window ends.

    A sleep still pending when the heartbeat is cancelled is recorded too, as
    the lateness so far, and so is one that began before the window and ended in
    or after it: a loop blocked for the whole window still shows.
    """
    lags = recorder.trace.lags
    while True:
        before = clock()
        try:
            await asyncio.sleep(HEARTBEAT_S)
        finally:
            after = clock()
            late = after - before - HEARTBEAT_S
            if before <= recorder.stop and after >= recorder.start and late > 0:
                lags.append(late)


async def _call(predict: Predict, x: Any, sent: float, recorder: _Recorder) -> None:
    try:
        await predict(x)
    except Exception:
        recorder.failed(sent)
    else:
        recorder.answered(sent, clock())


async def _closed_client(predict: Predict, x: Any, recorder: _Recorder) -> None:
    while (sent := clock()) < recorder.stop:
        await _call(predict, x, sent, recorder)
        await asyncio.sleep(0)


async def _open_arrivals(
    predict: Predict, x: Any, rate: float, recorder: _Recorder, calls: set[asyncio.Task[None]], seed: int
) -> None:
    rng = random.Random(seed)
    due = clock()
    while (due := due + rng.expovariate(rate)) < recorder.stop:
        await asyncio.sleep(max(0.0, due - clock()))  # yields even when late, like an accept loop
        task = asyncio.get_running_loop().create_task(_call(predict, x, due, recorder))
        calls.add(task)
        task.add_done_callback(calls.discard)


async def _reach(rate: float, seconds: float) -> float:
    async def instant() -> None:
        pass

    loop = asyncio.get_running_loop()
    rng = random.Random(0)
    stop = (due := clock()) + seconds
    planned = on_time = 0
    while (due := due + rng.expovariate(rate)) < stop:
        planned += 1
        if clock() > stop:  # out of time: the arrivals still to issue are all late
            continue
        await asyncio.sleep(max(0.0, due - clock()))
        await loop.create_task(instant())
        on_time += clock() - due < _ON_TIME_S
    return on_time / planned if planned else 1.0


_ON_TIME_S = 0.01


def generator_reach(rate: float, seconds: float = 0.2) -> float:
    """The share of open-loop arrivals at ``rate`` the generator issues on time (10 ms late at most).

    Arrivals are planned as in an open-loop run, each started as a task that
    returns at once, on a fresh event loop, for ``seconds``. Well below 1, the
    generator cannot offer this load on this machine, whatever it drives.
    """
    return asyncio.run(_reach(rate, seconds))


async def _drain(tasks: set[asyncio.Task[None]], timeout: float, recorder: _Recorder) -> None:
    """Wait for ``tasks`` at most ``timeout``; cancel the rest and count them unfinished."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout)
    leftovers = [task for task in tasks if not task.done()]
    now = clock()
    for task in leftovers:
        task.cancel()
    recorder.trace.unfinished = [now - recorder.start] * len(leftovers)
    await asyncio.gather(*leftovers, return_exceptions=True)


async def run_load(predict: Predict, model: Model, load: Load, *, warmup_s: float, duration_s: float) -> Trace:
    """Apply ``load`` to ``predict`` for ``warmup_s + duration_s``; return the window's trace."""
    x = model.sample()
    start = clock() + warmup_s
    recorder = _Recorder(start, start + duration_s)
    heartbeat = asyncio.get_running_loop().create_task(_heartbeat(recorder))
    calls: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    if load.kind == "closed":
        calls.update(loop.create_task(_closed_client(predict, x, recorder)) for _ in range(int(load.value)))
        await asyncio.wait(set(calls), timeout=warmup_s + 2 * duration_s + 1.0)
    else:
        await _open_arrivals(predict, x, load.value, recorder, calls, seed=int(load.value))
    await _drain(calls, max(1.0, duration_s), recorder)
    heartbeat.cancel()
    await asyncio.gather(heartbeat, return_exceptions=True)
    recorder.trace.model_busy = model.busy(recorder.start, recorder.stop)
    return recorder.trace


def run_offline(model: Model, batch_size: int, *, warmup_s: float, duration_s: float) -> Trace:
    """The ceiling: full stacked batches back to back, no event loop, no callers."""
    import torch

    batch = torch.stack([model.sample() for _ in range(batch_size)])
    start = clock() + warmup_s
    recorder = _Recorder(start, start + duration_s)
    while (sent := clock()) < recorder.stop:
        model(batch)
        done = clock()
        for _ in range(batch_size):
            recorder.answered(sent, done)
    recorder.trace.model_busy = model.busy(recorder.start, recorder.stop)
    return recorder.trace
