"""Pending requests: grouped by collate key, served by urgency.

Each request carries the key its input was given by the collator (shape, dtype,
structure...). Requests with different keys can never be stacked together, so
the queue keeps one group per key, and the worker serves the ready group whose
oldest live request is the oldest overall: no key can starve another.

Within a group, requests are taken in order of *urgency*, one number per request:

    urgency = deadline - priority * priority_aging

where a request without a deadline counts as due ``slack`` after it arrived
(the batcher's default timeout, or 10 s). So among equal priorities the earliest
deadline goes first (plain FIFO when every request has the same timeout), and
each priority level is worth ``priority_aging`` seconds of head start: a
high-priority request jumps ahead, but a low-priority one that has waited long
enough is served before newer high-priority ones, so none starves.

Requests with no priority and no deadline of their own are the common case; they
arrive in urgency order, so they sit in a plain FIFO (O(1) per request). Only the
others go through a heap (O(log n)). Cancelled and timed-out requests are not
searched for: they are marked dead and skipped when reached. ``live`` counts
only requests that still want an answer.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["CANCELLED", "DONE", "QUEUED", "RUNNING", "TIMED_OUT", "Request", "RequestQueue"]

# Request.state: a request moves forward only, and is answered exactly once,
# by whichever transition takes it out of QUEUED/RUNNING first.
QUEUED = 0
RUNNING = 1
DONE = 2
CANCELLED = 3
TIMED_OUT = 4

_sequence = itertools.count()


class Request:
    """One caller's input and the handle that wakes it up."""

    __slots__ = ("cost", "deadline", "enqueued_at", "item", "key", "state", "timer", "urgency", "waiter")

    def __init__(
        self,
        item: Any,
        key: Hashable,
        enqueued_at: float,
        deadline: float | None,
        urgency: float,
        cost: float = 1.0,
    ) -> None:
        self.item = item
        self.key = key
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.urgency = urgency
        self.cost = cost
        self.state = QUEUED
        self.waiter: Any = None  # backend-specific: an asyncio future or a trio task
        self.timer: Any = None  # backend-specific deadline handle, if any


def _drop_dead(requests: deque[Request]) -> None:
    while requests and requests[0].state != QUEUED:
        requests.popleft()


class _Group:
    __slots__ = ("cost", "fifo", "live", "urgent", "urgent_by_age")

    def __init__(self) -> None:
        self.fifo: deque[Request] = deque()  # plain requests: arrival order is urgency order
        self.urgent: list[tuple[float, int, Request]] = []  # the others, a heap by urgency
        self.urgent_by_age: deque[Request] = deque()  # the same, in arrival order
        self.live = 0
        self.cost = 0.0

    def oldest(self) -> Request | None:
        _drop_dead(self.fifo)
        _drop_dead(self.urgent_by_age)
        heads = [q[0] for q in (self.fifo, self.urgent_by_age) if q]
        return min(heads, key=lambda r: r.enqueued_at) if heads else None

    def most_urgent(self) -> Request | None:
        """The next request to serve (left in place)."""
        fifo, urgent = self.fifo, self.urgent
        _drop_dead(fifo)
        while urgent and urgent[0][2].state != QUEUED:
            heapq.heappop(urgent)
        if not urgent:
            return fifo[0] if fifo else None
        if fifo and fifo[0].urgency <= urgent[0][0]:
            return fifo[0]
        return urgent[0][2]

    def remove_head(self, request: Request) -> None:
        if self.fifo and self.fifo[0] is request:
            self.fifo.popleft()
        else:
            heapq.heappop(self.urgent)


class RequestQueue:
    """Groups of requests keyed by their collate key."""

    __slots__ = ("_groups", "live")

    def __init__(self) -> None:
        self._groups: dict[Hashable, _Group] = {}
        self.live = 0

    def push(self, request: Request, plain: bool) -> _Group:
        """Add ``request``; ``plain`` when it has no priority or deadline of its own."""
        group = self._groups.get(request.key)
        if group is None:
            group = self._groups[request.key] = _Group()
        if plain:
            group.fifo.append(request)
        else:
            heapq.heappush(group.urgent, (request.urgency, next(_sequence), request))
            group.urgent_by_age.append(request)
        group.live += 1
        group.cost += request.cost
        self.live += 1
        return group

    def discard(self, request: Request) -> None:
        """Forget a queued request that no longer wants an answer (lazy removal)."""
        group = self._groups[request.key]
        group.live -= 1
        group.cost -= request.cost
        self.live -= 1

    def oldest(self) -> list[tuple[Hashable, Request, _Group]]:
        """(key, oldest live request, group) for each non-empty group."""
        heads = []
        for key, group in list(self._groups.items()):
            head = group.oldest()
            if head is None:
                del self._groups[key]
            else:
                heads.append((key, head, group))
        return heads

    def pop(self, key: Hashable, limit: int, max_cost: float | None = None, padded: bool = False) -> list[Request]:
        """Take up to ``limit`` live requests of group ``key``, most urgent first.

        With ``max_cost``, stop before the batch's cost would exceed it (a batch
        always takes at least one request). The cost of a batch is the sum of its
        requests' costs, or, when ``padded``, its size times the largest cost
        (padding makes every row as long as the longest).
        """
        group = self._groups[key]
        batch: list[Request] = []
        if max_cost is None and not group.urgent:  # the common case: a plain FIFO
            fifo = group.fifo
            while fifo and len(batch) < limit:
                head = fifo.popleft()
                if head.state == QUEUED:
                    batch.append(head)
            return self._taken(key, group, batch, sum(r.cost for r in batch))
        total = largest = 0.0
        while len(batch) < limit:
            request = group.most_urgent()
            if request is None:
                break
            if max_cost is not None and batch:
                cost = request.cost
                after = (len(batch) + 1) * max(largest, cost) if padded else total + cost
                if after > max_cost:
                    break
            group.remove_head(request)
            batch.append(request)
            total += request.cost
            largest = max(largest, request.cost)
        return self._taken(key, group, batch, total)

    def _taken(self, key: Hashable, group: _Group, batch: list[Request], cost: float) -> list[Request]:
        group.live -= len(batch)
        group.cost -= cost
        self.live -= len(batch)
        if not group.live:  # only dead requests left, if any: forget them with the group
            del self._groups[key]
        return batch

    def pop_all(self) -> list[Request]:
        """Take every live request (used when the batcher dies)."""
        batch: list[Request] = []
        for key in list(self._groups):
            batch.extend(self.pop(key, self._groups[key].live))
        return batch
