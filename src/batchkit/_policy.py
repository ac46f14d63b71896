"""When to flush: the rule that turns a queue into batches.

A group of pending requests is flushed as soon as either

* it holds ``max_batch_size`` live requests (a full batch gains nothing by waiting), or
* the policy's flush time for it has come.

``FixedWait`` puts that time ``max_wait`` seconds after the group's oldest request
arrived: a request never waits longer than ``max_wait`` for batch-mates (it may
still wait for the model to finish the batch ahead of it). With ``max_wait=0`` a
group is due at once, so the worker sends whatever is queued whenever it is free;
requests that arrive while the model runs are gathered into the next batch anyway.
"""

from __future__ import annotations

from typing import Protocol

from ._queue import Request

__all__ = ["FixedWait", "FlushPolicy"]


class FlushPolicy(Protocol):
    """Decides when a group that is not yet full should be flushed."""

    def flush_at(self, oldest: Request, size: int) -> float:
        """Return the clock time at which this group should be sent to the model."""
        ...


class FixedWait:
    """Flush when the oldest request has waited ``max_wait`` seconds."""

    __slots__ = ("max_wait",)

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def flush_at(self, oldest: Request, size: int) -> float:
        return oldest.enqueued_at + self.max_wait
