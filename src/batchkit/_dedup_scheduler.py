"""The scheduler of a batcher with ``dedup_key``: identical inputs in progress are computed once.

A subclass of ``Scheduler`` (its bookkeeping of shared computations and the
result cache is in ``_dedup``); like it, the only place a request's state
changes for such a batcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

from ._dedup import MISSING, Computation, FollowerDeadlines, ResultCache, detached, tightest, tightness
from ._errors import (
    BatcherClosedError,
    InvalidInputError,
    QueueFullError,
)
from ._execute import Failed, Outcome, copies
from ._queue import CANCELLED, DONE, FOLLOWING, QUEUED, RUNNING, TIMED_OUT, Request
from ._scheduler import Batch, Scheduler, clock
from ._settings import Settings
from ._stats import BatcherStats
from ._threads import ThreadFuture

__all__ = ["DedupScheduler"]


class DedupScheduler(Scheduler):
    """The scheduler of a batcher with ``dedup_key``: identical inputs in progress are computed once.

    A caller whose input is identical (by ``dedup_key``) to one queued or running
    joins that *computation* (see ``_dedup``) instead of queueing its own: it
    becomes a follower (``FOLLOWING``), is never queued or sent, and gets its own
    copy of the computation's result or error. With ``cache_size``, successful
    results are kept by key and answer later callers at once.

    * A computation is queued under its tightest caller: a joiner whose deadline
      (then urgency) is tighter than every queued request of the computation is
      queued too; when the first of them is sent, the others follow it.
    * A queued request that leaves unsent (its caller cancelled, or its deadline
      passed) hands its input to the tightest follower, which is queued in its
      place (if it is tighter than the requests still queued); with no caller
      left, the computation is gone: nothing is sent for it.
    * A running computation is joined whatever the joiner's deadline (nothing
      new could be answered sooner); its row runs to the end even if its own
      caller left, for the followers.
    * Followers keep their own deadlines (the timer sees them) and may cancel.
    """

    def __init__(self, settings: Settings, key: Callable[[Any], Hashable], *, padded_cost: bool, name: str) -> None:
        super().__init__(settings, key, padded_cost=padded_cost, name=name)
        assert settings.dedup_key is not None
        self._dedup_key = settings.dedup_key
        self._computations: dict[Hashable, Computation] = {}  # by dedup key: the one in progress
        self._of: dict[Request, Computation] = {}  # every carrier, row and follower -> its computation
        self._deadlines = FollowerDeadlines()
        self._followers = 0  # callers FOLLOWING now
        self._queued_followers = 0  # of them, those whose computation is still queued (they count as pending)
        self.cache = ResultCache(settings.cache_size) if settings.cache_size else None

    # -- requests in -------------------------------------------------------------------

    def submit_shared(self, x: Any, timeout_ms: float | None, priority: float) -> tuple[Request | None, Any]:
        """``submit`` with sharing: ``(request, None)`` to wait for, or ``(None, result)`` from the cache."""
        if self.closing:
            raise self.refuse(self.closed_error())
        counters = self.counters
        now = clock()
        try:
            key = self._dedup_key(x)
            try:
                hash(key)
            except TypeError:
                raise InvalidInputError(f"dedup_key returned an unhashable {type(key).__qualname__}") from None
        except BaseException:
            counters.requests += 1
            counters.failed += 1
            raise
        cache = self.cache
        try:  # a key's == runs on a hash collision: it may raise (a key holding a numpy array, say)
            value = MISSING if cache is None else self._cached(cache, key)
            computation = self._computations.get(key)
        except Exception as error:
            counters.requests += 1
            counters.failed += 1
            raise InvalidInputError(
                f"dedup_key returned a key that cannot be compared with another of equal hash "
                f"({type(error).__name__}: {error}); return a tuple, bytes or another plain value"
            ) from error
        if cache is not None:
            if value is not MISSING:
                counters.requests += 1
                counters.completed += 1
                counters.cache_hits += 1
                counters.latency.add(clock() - now)
                return None, value
            counters.cache_misses += 1
        waiting = self._queue.live + self._followers
        if waiting >= self.settings.max_queue_size:
            raise self.refuse(
                QueueFullError(
                    f"batcher {self.name!r} has {waiting} requests queued or waiting for an identical one "
                    f"(max_queue_size={self.settings.max_queue_size})"
                )
            )
        if (
            computation is not None
            and computation.row is not None
            and cache is not None
            and computation.generation != cache.generation
        ):
            computation = None  # it runs with what clear_cache() meant to forget: start afresh
        if computation is not None:
            try:
                joiner = self._special(x, computation.group, now, timeout_ms, priority)
            except BaseException:
                counters.requests += 1
                counters.failed += 1
                raise
            carrier = tightest(computation.carriers)
            if computation.row is not None or (carrier is not None and tightness(joiner) >= tightness(carrier)):
                counters.requests += 1
                self._follow(computation, joiner)
                if joiner.deadline < self._sleep_until:
                    self.wake()  # the worker's timer must see this deadline
                return joiner, None
        request = self.submit(x, timeout_ms, priority)  # the first, or a tighter one: queued
        if computation is None:
            generation = 0 if cache is None else cache.generation
            computation = self._computations[key] = Computation(key, x, request.key, generation)
        computation.carriers[request] = None
        self._of[request] = computation
        return request, None

    def submit_to(self, future: ThreadFuture[Any], x: Any, timeout_ms: float | None, priority: float) -> None:
        """``submit_shared`` for a caller in another thread (on the loop): its answer goes to ``future``."""
        if future.cancelled():
            return
        if self._backend is None:
            future.set_exception(self.refuse(BatcherClosedError(f"batcher {self.name!r} stopped")))
            return
        try:
            request, value = self.submit_shared(x, timeout_ms, priority)
        except BaseException as error:
            future.set_exception(error)
            return
        if request is None:
            future.set_result(value)
            return
        request.waiter = future
        future.request = request

    def _cached(self, cache: ResultCache, key: Hashable) -> Any:
        """A copy of the cached result for ``key``, or ``MISSING``."""
        value = cache.get(key)
        if value is MISSING:
            return MISSING
        try:
            return detached(value)
        except Exception:  # it was copied once, into the cache; if it no longer can be, forget it
            cache.discard(key)
            return MISSING

    def _follow(self, computation: Computation, request: Request) -> None:
        """``request`` (new, or a carrier whose computation was sent) waits for ``computation``."""
        request.state = FOLLOWING
        request.item = None
        computation.followers[request] = None
        self._of[request] = computation
        self._followers += 1
        if computation.row is None:
            self._queued_followers += 1
        else:
            self.counters.in_flight += 1
        self._deadlines.push(request, self._followers)

    def _unfollow(self, request: Request) -> Computation:
        computation = self._of.pop(request)
        del computation.followers[request]
        self._followers -= 1
        if computation.row is None:
            self._queued_followers -= 1
        else:
            self.counters.in_flight -= 1
        return computation

    def abandon(self, request: Request) -> None:
        if request.state == FOLLOWING:
            self._unfollow(request)
            request.state = CANCELLED
            self.counters.cancelled += 1
        else:
            super().abandon(request)  # a queued carrier's input goes to a follower (_left)

    def _left(self, request: Request) -> None:
        computation = self._of.pop(request, None)
        if computation is None:
            return
        del computation.carriers[request]
        if computation.row is None and not any(c.state == RUNNING for c in computation.carriers):
            self._requeue(computation)

    def _requeue(self, computation: Computation) -> None:
        """A queued request of ``computation`` left: queue its tightest follower if none as tight is queued."""
        follower = tightest(computation.followers)
        carrier = tightest(computation.carriers)
        if follower is not None and (carrier is None or tightness(follower) < tightness(carrier)):
            del computation.followers[follower]
            self._followers -= 1
            self._queued_followers -= 1
            follower.state = QUEUED
            follower.item = computation.item
            computation.carriers[follower] = None
            if not self._queue.live:
                self._oldest_queued = follower.enqueued_at
            self._queue.push(follower, False)
            self.wake()
        elif carrier is None and self._computations.get(computation.key) is computation:  # no caller left
            del self._computations[computation.key]

    # -- batches out -------------------------------------------------------------------

    def take(self, now: float, *, limit: int | None = None, due: bool = False) -> Batch | None:
        batch = super().take(now, limit=limit, due=due)
        if batch is not None:
            self._started(batch)
        return batch

    def _started(self, batch: Batch) -> None:
        """``batch`` was formed: each computation in it runs now, and its other requests follow it."""
        of = self._of
        counters = self.counters
        repeated: list[int] = []
        for index, request in enumerate(batch.requests):
            computation = of.get(request)
            if computation is None:
                continue
            if computation.row is not None:  # a second request of a computation already in this batch
                repeated.append(index)
                counters.in_flight -= 1  # counted again as a follower
                self._follow(computation, request)
                continue
            computation.row = request
            computation.item = None
            carriers = computation.carriers
            del carriers[request]
            waiting = len(computation.followers)
            if waiting:
                counters.in_flight += waiting
                self._queued_followers -= waiting
            if carriers:
                for carrier in list(carriers):
                    if carrier.state == QUEUED:  # queued still, maybe in another group: it follows now
                        self._queue.forget(carrier)
                        self._follow(computation, carrier)
                carriers.clear()  # those in this batch are found through self._of
        if repeated:
            sizes = counters.batch_sizes
            size = len(batch.requests)
            sizes[size] -= 1
            if not sizes[size]:
                del sizes[size]
            skip = set(repeated)
            batch.requests = [r for i, r in enumerate(batch.requests) if i not in skip]
            batch.items = [x for i, x in enumerate(batch.items) if i not in skip]
            size = len(batch.requests)
            sizes[size] = sizes.get(size, 0) + 1

    def expire(self, now: float) -> None:
        # Followers first: a queued request that expires now hands its input to one still in time.
        for request in self._deadlines.expired(now):
            self._unfollow(request)
            request.state = TIMED_OUT
            self.counters.timed_out += 1
            self._fail(request, self._timeout_error(request))
        super().expire(now)

    def _next_deadline(self) -> float:
        return min(super()._next_deadline(), self._deadlines.earliest())

    # -- answers -----------------------------------------------------------------------

    def answer(self, batch: Batch, outcome: Outcome) -> None:
        outputs = outcome.outputs
        if outputs is not None:  # (else fail_batch answers)
            of, computations, cache = self._of, self._computations, self.cache
            for request, output in zip(batch.requests, outputs, strict=True):
                computation = of.pop(request, None)
                if computation is None:
                    continue
                if computation.followers or cache is not None:
                    self._settle(computation, output, first=request.state != RUNNING)
                elif computations.get(computation.key) is computation:  # nobody else asked for it
                    del computations[computation.key]
        super().answer(batch, outcome)

    def fail_batch(self, batch: Batch, error: BaseException) -> None:
        of = self._of
        for request in batch.requests:
            computation = of.pop(request, None)
            if computation is not None:
                self._settle(computation, Failed(error))
        super().fail_batch(batch, error)

    def fail_queued(self, error: BaseException) -> int:
        followers = 0
        for computation in list(self._computations.values()):
            if computation.row is None:
                for carrier in computation.carriers:
                    del self._of[carrier]
                computation.carriers.clear()
                followers += len(computation.followers)
                self._settle(computation, Failed(error), shared=False)
        return super().fail_queued(error) + followers

    def _settle(self, computation: Computation, output: Any, *, first: bool = False, shared: bool = True) -> None:
        """Answer ``computation``'s followers with their own copies of ``output`` (a result or ``Failed``).

        ``first``: its row's caller is gone, so the first follower may have the
        model's object itself. A result fills the cache (with a copy of its own).
        ``shared``: the computation ran (else its followers are not counted as
        ``deduplicated``).
        """
        if self._computations.get(computation.key) is computation:
            del self._computations[computation.key]
        failed = type(output) is Failed
        cache = self.cache
        if not failed and cache is not None and computation.generation == cache.generation:
            with contextlib.suppress(Exception):  # a result that cannot be copied is not cached
                cache.put(computation.key, detached(output))
        followers = list(computation.followers)
        if not followers:
            return
        computation.followers.clear()
        counters = self.counters
        n = len(followers)
        self._followers -= n
        if computation.row is None:
            self._queued_followers -= n
        else:
            counters.in_flight -= n
        if shared:
            counters.deduplicated += n
        counters.latency.add_since(clock(), [f.enqueued_at for f in followers])
        of = self._of
        for follower in followers:
            del of[follower]
            follower.state = DONE
        if failed:
            counters.failed += n
            for follower, error in zip(followers, copies(output.error, n + 1)[1:], strict=True):
                self._fail(follower, error)
            return
        answered: list[Request] = []
        values: list[Any] = []
        for follower in followers:
            if first:
                value, first = output, False
            else:
                try:
                    value = detached(output)
                except Exception as error:
                    counters.failed += 1
                    self._fail(follower, self._uncopyable(output, error))
                    continue
            answered.append(follower)
            values.append(value)
        counters.completed += len(answered)
        backend = self._backend
        assert backend is not None
        backend.resolve(answered, values)

    def _uncopyable(self, output: Any, error: Exception) -> TypeError:
        failure = TypeError(
            f"batcher {self.name!r}: this request shares an identical one's result (dedup_key), and a "
            f"{type(output).__qualname__} cannot be copied for it: {error}"
        )
        failure.__cause__ = error
        return failure

    # -- the cache, introspection ------------------------------------------------------

    def clear_cache(self) -> None:
        """Empty the cache; computations already begun do not fill it (on the loop)."""
        if self.cache is not None:
            self.cache.clear()

    def stats(self) -> BatcherStats:
        stats = super().stats()
        queued = self._queued_followers  # waiting for a queued computation: pending too
        return dataclasses.replace(stats, pending=stats.pending + queued) if queued else stats
