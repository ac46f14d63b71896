"""Helpers shared by the reliability tests (tests/test_reliability_*.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

import batchkit

BACKENDS = ["asyncio", "trio"]


def check_invariant(stats: batchkit.BatcherStats) -> None:
    """requests == completed + failed + rejected + timed_out + cancelled + pending + in_flight."""
    ended = stats.completed + stats.failed + stats.rejected + stats.timed_out + stats.cancelled
    assert stats.requests == ended + stats.pending + stats.in_flight, stats
    assert stats.pending >= 0, stats
    assert stats.in_flight >= 0, stats


def check_settled(stats: batchkit.BatcherStats) -> None:
    """The invariant holds and nothing is left queued or running."""
    check_invariant(stats)
    assert (stats.pending, stats.in_flight) == (0, 0), stats


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` on the event loop; a hang fails after 10 seconds."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


def batchkit_threads(name: str = "") -> list[threading.Thread]:
    """Live threads started by batchkit (optionally: by the batcher called ``name``)."""
    prefix = f"batchkit-{name}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def living_tasks() -> int:
    """Tasks alive on the current event loop (asyncio or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return int(trio.lowlevel.current_statistics().tasks_living)
    return len(asyncio.all_tasks())


async def settle_tasks(expected: int) -> None:
    """Wait until exactly ``expected`` tasks are alive (tasks end a few checkpoints after they finish)."""
    with anyio.fail_after(10):
        while living_tasks() != expected:
            await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.001)


class Boom(ValueError):
    """The error a faulty test model raises."""


Outcome = tuple[str, Any]
"""How one ``predict`` call ended: ("value", v) or ("error", exception) or ("cancelled", None)."""


async def call(batcher: batchkit.Batcher[Any, Any], x: Any, **kwargs: Any) -> Outcome:
    """Await one ``predict`` and say how it ended, without raising."""
    try:
        return ("value", await batcher.predict(x, **kwargs))
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as exc:
        return ("error", exc)
