"""The records behind ``dedup_key``: computations shared by identical requests, and the result cache.

Like ``_queue.py`` for the queue, this module keeps records and never changes a
request's state: ``DedupScheduler`` (in ``_dedup_scheduler.py``) does.

A *computation* is one input being computed for every caller that sent it
(identical by ``dedup_key``) while it is queued or running. Its callers are:

* *carriers*: its requests in the queue. Usually one; a caller whose deadline
  (or urgency) is tighter than every carrier's is queued as one more, so the
  flush decision sees it. When the first of them is sent, the others become
  followers (and a second one in the same batch is taken out of it).
* the *row*: the carrier whose row is in a running batch.
* *followers*: callers waiting without a queue entry. They are answered with a
  copy of the row's result or error.

``detached`` makes those copies; ``ResultCache`` keeps the results of
``cache_size`` keys, least recently used first out.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import sys
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

from ._queue import FOLLOWING, Request

__all__ = ["MISSING", "Computation", "FollowerDeadlines", "ResultCache", "detached", "tightest", "tightness"]

MISSING: Any = object()
"""What ``ResultCache.get`` returns for a key it does not hold (a result may be ``None``)."""

_ATOMS = frozenset({int, float, complex, bool, str, bytes, type(None), range})
_COMPACT_MIN = 64  # dead deadline entries kept before the heap is rebuilt, whatever the number of followers
_sequence = itertools.count()


def detached(value: Any) -> Any:
    """A copy of ``value`` that shares nothing mutable with it.

    numpy arrays of numbers are ``copy()``-ed, torch tensors ``clone()``-d,
    immutable scalars, strings and bytes are returned as they are, tuples, lists
    and dicts are copied item by item; anything else (numpy arrays of objects,
    rows of structured arrays, other objects, a structure that refers to itself)
    goes through ``copy.deepcopy``, whose error, for an object that cannot be
    copied, is raised.
    """
    try:
        return _detached(value)
    except RecursionError:  # a structure with a cycle (or very deep): deepcopy keeps a memo
        return copy.deepcopy(value)


def _detached(value: Any) -> Any:
    kind = type(value)
    if kind in _ATOMS or (isinstance(value, np.generic) and kind is not np.void):
        return value
    if kind is np.ndarray and not value.dtype.hasobject:
        return value.copy()
    if kind is tuple:
        return tuple(_detached(item) for item in value)
    if kind is list:
        return [_detached(item) for item in value]
    if kind is dict:
        return {key: _detached(item) for key, item in value.items()}
    torch = sys.modules.get("torch")  # a tensor exists only if its program imported torch
    if torch is not None and isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:  # a subclass keeps its type through copy()
        return value.copy()
    return copy.deepcopy(value)  # np.void rows are views; object arrays hold mutable objects


def tightness(request: Request) -> tuple[float, float]:
    """How tight a request is: its deadline first (missing one fails it), then its urgency (priority)."""
    return (request.deadline, request.urgency)


def tightest(requests: Iterable[Request]) -> Request | None:
    """The tightest of ``requests`` (the earliest arrival among equals), or None."""
    return min(requests, key=tightness, default=None)


class Computation:
    """One input computed for every caller that sent it while it is queued or running."""

    __slots__ = ("carriers", "followers", "generation", "group", "item", "key", "row")

    def __init__(self, key: Hashable, item: Any, group: Hashable, generation: int) -> None:
        self.key = key  # the dedup key
        self.item = item  # the input, kept while queued: a follower that takes over carries it
        self.group = group  # the queue group (collate key) of its requests
        self.generation = generation  # the cache's generation when it began: a clear_cache() since voids it
        self.carriers: dict[Request, None] = {}  # its requests in the queue, in arrival order
        self.followers: dict[Request, None] = {}  # callers waiting without a queue entry, in arrival order
        self.row: Request | None = None  # the request whose row is in a running batch (None: queued)


class FollowerDeadlines:
    """The deadlines of followers, earliest first: the scheduler's timer sees them as it sees the queue's.

    Entries of followers that left are dropped when they reach the top, or when
    they outnumber the followers still waiting (plus 64): the heap is then rebuilt.
    """

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Request]] = []

    def push(self, request: Request, waiting: int) -> None:
        """Watch ``request``'s deadline (if it has one); ``waiting``: followers waiting now."""
        if request.deadline == math.inf:
            return
        heap = self._heap
        heapq.heappush(heap, (request.deadline, next(_sequence), request))
        if len(heap) > 2 * waiting + _COMPACT_MIN:
            self._heap = [entry for entry in heap if entry[2].state == FOLLOWING]
            heapq.heapify(self._heap)

    def earliest(self) -> float:
        """The earliest deadline of a follower still waiting (``math.inf`` if none)."""
        heap = self._heap
        while heap and heap[0][2].state != FOLLOWING:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def expired(self, now: float) -> list[Request]:
        """Remove and return the followers whose deadline is ``now`` or earlier (each once)."""
        heap = self._heap
        found: dict[Request, None] = {}  # a follower may have two entries (it was queued for a while)
        while heap and heap[0][0] <= now:
            request = heapq.heappop(heap)[2]
            if request.state == FOLLOWING:
                found[request] = None
        return list(found)


class ResultCache:
    """The results of the last ``size`` keys computed, least recently used first out.

    ``clear()`` empties it and starts a new *generation*: a computation begun
    before a clear does not fill it. Used on the event loop only.
    """

    __slots__ = ("_entries", "generation", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.generation = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any:
        """The result kept for ``key`` (now the most recently used), or ``MISSING``."""
        entries = self._entries
        value = entries.get(key, MISSING)
        if value is not MISSING:
            entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` for ``key``, dropping the least recently used entry past ``size``."""
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
