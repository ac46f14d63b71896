"""Pending requests: grouped by collate key, served by urgency, dead ones dropped.

Each request carries the key its input was given by the collator (shape, dtype,
structure...). Requests with different keys can never be stacked together, so
the queue keeps one group per key; the scheduler decides which group goes next.

Within a group, requests are taken in order of *urgency*, one number per request:

    urgency = deadline - priority * priority_aging

where a request without a deadline counts as due ``slack`` after it arrived. So
among equal priorities the earliest deadline goes first, and each priority level
is worth ``priority_aging`` seconds of head start (a low-priority request that
has waited long enough still goes first: none starves).

*Plain* requests (no priority, deadline or cost of their own) are the common
case. They arrive in urgency and deadline order, so they sit in a FIFO: O(1) per
request, and the head is both the oldest and the earliest deadline. The others
go through a heap by urgency, plus a heap by deadline and a list by arrival.

The queue never changes a request's state; the scheduler does. A request that
leaves early (cancelled, expired) is not searched for: the scheduler marks it and
clears its input at once, ``forget`` counts it out, and the queue drops it when
it reaches a head, or when a group holds more dead entries than live ones (it is
then compacted). So memory stays within a small factor of ``live``, which
``max_queue_size`` bounds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any

__all__ = ["CANCELLED", "DONE", "FOLLOWING", "QUEUED", "RUNNING", "TIMED_OUT", "Request", "RequestQueue"]

# Request.state moves forward only: QUEUED -> RUNNING -> DONE, or to CANCELLED /
# TIMED_OUT from either of the first two. The scheduler makes every change.
# With dedup_key a request may also be FOLLOWING an identical one's computation
# (never queued, never sent); it is QUEUED from there only when it takes over a
# computation whose queued requests all left (see DedupScheduler).
QUEUED = 0
RUNNING = 1
DONE = 2
CANCELLED = 3
TIMED_OUT = 4
FOLLOWING = 5

_sequence = itertools.count()
_COMPACT_MIN = 64  # dead entries a group may hold before it is compacted, whatever its size


class Request:
    """One caller's input and the handle that wakes it up."""

    __slots__ = ("channel", "cost", "deadline", "enqueued_at", "item", "key", "state", "urgency", "waiter")

    def __init__(
        self, item: Any, key: Hashable, enqueued_at: float, deadline: float, urgency: float, cost: float = 1.0
    ) -> None:
        self.item = item
        self.key = key
        self.enqueued_at = enqueued_at
        self.deadline = deadline  # math.inf when there is none
        self.urgency = urgency
        self.cost = cost
        self.state = QUEUED
        self.waiter: Any = None  # backend-specific: an asyncio future or a trio task
        self.channel: Any = None  # a streaming request's items go here (see _stream.Channel)


class _Group:
    __slots__ = ("by_arrival", "by_deadline", "cost", "fifo", "live", "urgent")

    def __init__(self) -> None:
        self.fifo: deque[Request] = deque()  # plain requests
        self.urgent: list[tuple[float, int, Request]] = []  # the others, a heap by urgency
        self.by_arrival: deque[Request] = deque()  # the others, in arrival order
        self.by_deadline: list[tuple[float, int, Request]] = []  # the others with a deadline
        self.live = 0
        self.cost = 0.0

    def oldest(self) -> Request:
        """The live request that arrived first (the group has one)."""
        fifo, by_arrival = self.fifo, self.by_arrival
        while fifo and fifo[0].state != QUEUED:
            fifo.popleft()
        while by_arrival and by_arrival[0].state != QUEUED:
            by_arrival.popleft()
        if not by_arrival:
            return fifo[0]
        if not fifo or by_arrival[0].enqueued_at < fifo[0].enqueued_at:
            return by_arrival[0]
        return fifo[0]

    def earliest_deadline(self) -> float:
        by_deadline = self.by_deadline
        while by_deadline and by_deadline[0][2].state != QUEUED:
            heapq.heappop(by_deadline)
        fifo = self.fifo
        while fifo and fifo[0].state != QUEUED:
            fifo.popleft()
        first = fifo[0].deadline if fifo else math.inf
        return min(first, by_deadline[0][0]) if by_deadline else first

    def most_urgent(self) -> Request | None:
        fifo, urgent = self.fifo, self.urgent
        while fifo and fifo[0].state != QUEUED:
            fifo.popleft()
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

    def compact_if_sparse(self) -> None:
        entries = len(self.fifo) + len(self.by_arrival)
        if entries > 2 * self.live + _COMPACT_MIN:
            self.fifo = deque(r for r in self.fifo if r.state == QUEUED)
            self.by_arrival = deque(r for r in self.by_arrival if r.state == QUEUED)
            self.urgent = [e for e in self.urgent if e[2].state == QUEUED]
            self.by_deadline = [e for e in self.by_deadline if e[2].state == QUEUED]
            heapq.heapify(self.urgent)
            heapq.heapify(self.by_deadline)


class RequestQueue:
    """Groups of queued requests keyed by their collate key."""

    __slots__ = ("_groups", "live")

    def __init__(self) -> None:
        self._groups: dict[Hashable, _Group] = {}
        self.live = 0

    def push(self, request: Request, plain: bool) -> _Group:
        """Add ``request``; ``plain`` when it has no priority, deadline or cost of its own."""
        group = self._groups.get(request.key)
        if group is None:
            group = self._groups[request.key] = _Group()
        fifo = group.fifo
        # The FIFO stays in urgency and deadline order (a configure() may break that).
        if plain and (not fifo or (fifo[-1].urgency <= request.urgency and fifo[-1].deadline <= request.deadline)):
            fifo.append(request)
        else:
            entry = (request.urgency, next(_sequence), request)
            heapq.heappush(group.urgent, entry)
            group.by_arrival.append(request)
            if request.deadline != math.inf:
                heapq.heappush(group.by_deadline, (request.deadline, entry[1], request))
        group.live += 1
        group.cost += request.cost
        self.live += 1
        return group

    def ahead(self, request: Request, plain: bool) -> int:
        """How many live requests of its group are sure to be served before ``request`` if it were pushed now.

        A plain request that would join the FIFO's tail goes after every live
        FIFO entry (at least ``live`` less the entries outside the FIFO); one that
        would go through the heaps is counted as first (0): a lower bound.
        """
        group = self._groups.get(request.key)
        if group is None or not plain:
            return 0
        fifo = group.fifo
        if fifo and (fifo[-1].urgency > request.urgency or fifo[-1].deadline > request.deadline):
            return 0
        return max(0, group.live - len(group.by_arrival))

    def forget(self, request: Request) -> None:
        """Count out a queued request that is leaving (the scheduler marks its new state)."""
        group = self._groups[request.key]
        group.live -= 1
        group.cost -= request.cost
        self.live -= 1
        if not group.live:
            del self._groups[request.key]
        else:
            group.compact_if_sparse()

    def groups(self) -> Iterator[tuple[Hashable, _Group]]:
        """(key, group) for every group with a live request."""
        return iter(list(self._groups.items()))

    def expired(self, now: float) -> list[Request]:
        """Remove and return the requests whose deadline is ``now`` or earlier."""
        found: list[Request] = []
        for group in self._groups.values():
            if group.earliest_deadline() <= now:
                _due_by(group, now, found)
        for request in found:
            self.forget(request)
        return found

    def expired_in(self, key: Hashable, before: float) -> list[Request]:
        """Remove and return the requests of group ``key`` whose deadline is ``before`` or earlier."""
        found: list[Request] = []
        group = self._groups.get(key)
        if group is not None and group.earliest_deadline() <= before:
            _due_by(group, before, found)
            for request in found:
                self.forget(request)
        return found

    def group(self, key: Hashable) -> _Group | None:
        """Group ``key``, if it has a live request."""
        return self._groups.get(key)

    def pop(self, key: Hashable, limit: int, max_cost: float | None = None, padded: bool = False) -> list[Request]:
        """Take up to ``limit`` live requests of group ``key``, most urgent first.

        With ``max_cost``, stop before the batch's cost would exceed it (a batch
        always takes at least one request). The cost of a batch is the sum of its
        requests' costs, or, when ``padded``, its size times the largest cost
        (padding makes every row as long as the longest).
        """
        group = self._groups.get(key)
        if group is None:
            return []
        batch: list[Request] = []
        if max_cost is None and not group.urgent:  # the common case: a plain FIFO
            fifo = group.fifo
            while fifo and len(batch) < limit:
                head = fifo.popleft()
                if head.state == QUEUED:
                    batch.append(head)
            return self._taken(key, group, batch, float(len(batch)))
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
        if not group.live:  # only dead entries left, if any: forget them with the group
            del self._groups[key]
        else:
            group.compact_if_sparse()
        return batch

    def pop_all(self) -> list[Request]:
        """Take every live request (used when the batcher stops)."""
        batch: list[Request] = []
        for key in list(self._groups):
            batch.extend(self.pop(key, self._groups[key].live))
        return batch


def _due_by(group: _Group, before: float, found: list[Request]) -> None:
    """Move the live requests of ``group`` with a deadline at ``before`` or earlier into ``found``."""
    fifo = group.fifo
    while fifo and (fifo[0].state != QUEUED or fifo[0].deadline <= before):
        head = fifo.popleft()
        if head.state == QUEUED:
            found.append(head)
    by_deadline = group.by_deadline
    while by_deadline and by_deadline[0][0] <= before:
        request = heapq.heappop(by_deadline)[2]
        if request.state == QUEUED:
            found.append(request)
