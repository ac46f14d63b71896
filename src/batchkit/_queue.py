"""Pending requests, grouped by collate key, oldest first.

Each request carries the key its input was given by the collator (shape, dtype,
structure...). Requests with different keys can never be stacked together, so
the queue keeps one FIFO group per key and the worker always serves the group
whose oldest live request is the oldest overall: no key can starve another.

Cancelled and timed-out requests are not searched for and removed (that would
cost O(n) per cancellation); they are marked dead and skipped when the worker
pops a batch. ``live`` counts only the requests that still want an answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["QUEUED", "RUNNING", "DONE", "CANCELLED", "TIMED_OUT", "Request", "RequestQueue"]

# Request.state: a request moves forward only, and is answered exactly once,
# by whichever transition takes it out of QUEUED/RUNNING first.
QUEUED = 0
RUNNING = 1
DONE = 2
CANCELLED = 3
TIMED_OUT = 4


class Request:
    """One caller's input and the handle that wakes it up."""

    __slots__ = ("deadline", "enqueued_at", "item", "key", "state", "timer", "waiter")

    def __init__(self, item: Any, key: Hashable, enqueued_at: float, deadline: float | None) -> None:
        self.item = item
        self.key = key
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.state = QUEUED
        self.waiter: Any = None  # backend-specific: an asyncio future or a trio task
        self.timer: Any = None  # backend-specific deadline handle, if any


class _Group:
    __slots__ = ("items", "live")

    def __init__(self) -> None:
        self.items: deque[Request] = deque()
        self.live = 0


class RequestQueue:
    """FIFO groups of requests keyed by their collate key."""

    __slots__ = ("_groups", "live")

    def __init__(self) -> None:
        self._groups: dict[Hashable, _Group] = {}
        self.live = 0

    def push(self, request: Request) -> int:
        """Append ``request``; return how many live requests its group now holds."""
        group = self._groups.get(request.key)
        if group is None:
            group = self._groups[request.key] = _Group()
        group.items.append(request)
        group.live += 1
        self.live += 1
        return group.live

    def discard(self, request: Request) -> None:
        """Forget a queued request that no longer wants an answer (lazy removal)."""
        group = self._groups[request.key]
        group.live -= 1
        self.live -= 1

    def _head(self, key: Hashable, group: _Group) -> Request | None:
        items = group.items
        while items and items[0].state != QUEUED:
            items.popleft()
        if not items:
            del self._groups[key]
            return None
        return items[0]

    def oldest(self) -> list[tuple[Hashable, Request, int]]:
        """(key, oldest live request, live count) for each non-empty group."""
        heads = []
        for key, group in list(self._groups.items()):
            head = self._head(key, group)
            if head is not None:
                heads.append((key, head, group.live))
        return heads

    def pop(self, key: Hashable, limit: int) -> list[Request]:
        """Take up to ``limit`` live requests of group ``key``, oldest first."""
        group = self._groups[key]
        items = group.items
        batch: list[Request] = []
        while items and len(batch) < limit:
            request = items.popleft()
            if request.state == QUEUED:
                batch.append(request)
        group.live -= len(batch)
        self.live -= len(batch)
        if not items:
            del self._groups[key]
        return batch

    def pop_all(self) -> list[Request]:
        """Take every live request (used when the batcher dies)."""
        batch: list[Request] = []
        for key in list(self._groups):
            batch.extend(self.pop(key, self._groups[key].live))
        return batch
