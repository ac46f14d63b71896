"""Replaying one arrival trace against one variant, and what became of every request.

Each request is sent at its planned time, whatever happened to the earlier ones
(an open loop), as a task of its own; its deadline runs from that planned time,
so a loop too busy to send it on time is charged for it. It ends in exactly one
bucket: good (its own answer, by its deadline), late, refused
(``QueueFullError``), timed out (``RequestTimeoutError``), an error, a wrong
answer, or unanswered (cancelled a grace period after the last deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import batchkit

from ._loads import _heartbeat, _Recorder, clock
from ._model import Model

__all__ = ["GRACE_S", "POOL", "Inputs", "Outcome", "Send", "replay"]

GRACE_S = 0.25
"""How long past the last deadline unanswered requests are still waited for (they are late anyway)."""
POOL = 64
"""Distinct inputs, cycled through by the requests; each answer is checked against its input's."""

Send = Callable[[Any, "float | None"], Awaitable[Any]]
"""``send(x, seconds_left)``: one request; ``seconds_left`` until its deadline (None during the warm-up)."""


@dataclass
class Outcome:
    """What became of every request of a trace. Times in seconds."""

    good: int = 0
    late: int = 0
    refused: int = 0
    timed_out: int = 0
    errors: int = 0
    wrong: int = 0
    unanswered: int = 0
    latencies: list[float] = field(default_factory=list)
    """Of answered requests, from the planned arrival."""
    lags: list[float] = field(default_factory=list)
    model_busy: float = 0.0
    mean_batch_size: float = 0.0
    runs: list[tuple[float, float, int]] = field(default_factory=list)
    """``(start, end, batch size)`` of the model calls from the first arrival to the end."""

    @property
    def total(self) -> int:
        return self.good + self.late + self.refused + self.timed_out + self.errors + self.wrong + self.unanswered


@dataclass(frozen=True)
class Inputs:
    """The inputs the requests cycle through, and the start of each one's correct answer."""

    items: list[Any]
    expected: list[list[float]]

    @classmethod
    def make(cls, model: Model) -> Inputs:
        items = [model.sample() for _ in range(POOL)]
        expected = [output[:4].tolist() for output in model.run_list(items)]
        model.reset_counts()
        return cls(items, expected)

    def matches(self, index: int, output: Any) -> bool:
        got = output[:4].tolist()
        return all(abs(g - e) <= 1e-4 + 1e-3 * abs(e) for g, e in zip(got, self.expected[index], strict=True))


async def _request(send: Send, inputs: Inputs, index: int, due: float, deadline_s: float, out: Outcome) -> None:
    seconds_left = due + deadline_s - clock()
    if seconds_left <= 0:  # the generator itself was too late to send it in time
        out.late += 1
        return
    pick = index % POOL
    try:
        output = await send(inputs.items[pick], seconds_left)
    except batchkit.QueueFullError:
        out.refused += 1
    except batchkit.RequestTimeoutError:
        out.timed_out += 1
    except Exception:
        out.errors += 1
    else:
        latency = clock() - due
        out.latencies.append(latency)
        if not inputs.matches(pick, output):
            out.wrong += 1
        elif latency <= deadline_s:
            out.good += 1
        else:
            out.late += 1


async def _warm_up(send: Send, inputs: Inputs, clients: int, seconds: float) -> None:
    """Closed-loop traffic (every client waits for its answer), so threads and kernels are warm and nothing queued."""
    stop = clock() + seconds

    async def client(first: int) -> None:
        index = first
        while clock() < stop:
            await send(inputs.items[index % POOL], None)
            index += clients

    if seconds > 0:
        await asyncio.gather(*(client(i) for i in range(clients)))
        await asyncio.sleep(0.02)


async def replay(
    send: Send, model: Model, inputs: Inputs, times: np.ndarray, *, deadline_s: float, duration_s: float,
    warmup_s: float, warm_clients: int,
) -> Outcome:  # fmt: skip
    """Send a request at each planned time (seconds from now); wait for the answers; return what became of them."""
    await _warm_up(send, inputs, warm_clients, warmup_s)
    out = Outcome()
    model.reset_counts()
    loop = asyncio.get_running_loop()
    start = clock() + 0.005
    recorder = _Recorder(start, start + duration_s)
    heartbeat = loop.create_task(_heartbeat(recorder))
    calls: set[asyncio.Task[None]] = set()
    for index, at in enumerate(times.tolist()):
        due = start + at
        await asyncio.sleep(max(0.0, due - clock()))  # yields even when late, like an accept loop
        task = loop.create_task(_request(send, inputs, index, due, deadline_s, out))
        calls.add(task)
        task.add_done_callback(calls.discard)
    cutoff = start + (float(times[-1]) if len(times) else 0.0) + deadline_s + GRACE_S
    if calls:
        await asyncio.wait(set(calls), timeout=max(0.0, cutoff - clock()))
    leftovers = [task for task in calls if not task.done()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
    out.unanswered += len(leftovers)
    heartbeat.cancel()
    await asyncio.gather(heartbeat, return_exceptions=True)
    out.lags = recorder.trace.lags
    out.model_busy = model.busy(recorder.start, recorder.stop)
    out.mean_batch_size = model.mean_batch_size
    out.runs = model.run_log()
    return out
