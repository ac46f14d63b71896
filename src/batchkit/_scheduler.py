"""The scheduler: owns every request from ``submit`` to its answer.

It holds the queue, decides when a group is flushed, keeps the deadlines (one
timer per batcher: the worker's sleep, never one per request), and makes every
change of a request's state:

```text
            submit                 take                  finish
  (caller) ───────▶ QUEUED ─────────────▶ RUNNING ─────────────▶ DONE
                      │  \\                   │ \\
               abandon│   expire / hopeless  │  expire
                      ▼        ▼     abandon ▼   ▼
                  CANCELLED  TIMED_OUT   CANCELLED TIMED_OUT
```

A request is answered exactly once, by whichever transition takes it out of
``QUEUED``/``RUNNING`` first; every later one sees its state and does nothing.
Everything here runs on the event loop thread, so nothing needs a lock.

``DedupScheduler`` (at the end) is the scheduler of a batcher with
``dedup_key``: a request may also be ``FOLLOWING`` an identical one's
computation, never queued or sent, and answered with a copy of its answer.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

import anyio
import numpy as np

from ._backend import Backend
from ._cost import CostBook
from ._deadlines import flush_by, hopeless_before, time_to_answer
from ._errors import (
    BatcherClosedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
    StreamBufferFullError,
)
from ._execute import Failed, Outcome, copies
from ._flushes import CAP, COST, DEADLINE, DRAIN, FULL, IDLE, STEP, TIMER
from ._policy import ArrivalRate, FlushPolicy, OomCap, make_policy
from ._queue import CANCELLED, DONE, QUEUED, RUNNING, TIMED_OUT, Request, RequestQueue
from ._settings import Settings, check_ms
from ._stats import BatcherStats, Counters
from ._stream import END
from ._threads import ThreadFuture

__all__ = ["Batch", "Scheduler", "clock"]

logger = logging.getLogger("batchkit")

clock = time.perf_counter
"""batchkit's clock for arrival times, deadlines and latencies (sub-microsecond, monotonic)."""

_NO_GROUP = object()  # a collate key may be None


def _now() -> float:
    """``clock()``, looked up at each call (a test or a simulation may replace it)."""
    return clock()


class Batch:
    """Requests taken together for one model call, with their inputs."""

    __slots__ = ("deadline", "items", "key", "requests", "started_at")

    def __init__(
        self, requests: list[Request], items: list[Any], deadline: float, started_at: float, key: Hashable = None
    ) -> None:
        self.requests = requests
        self.items = items
        self.deadline = deadline  # the earliest deadline of a request still waiting
        self.started_at = started_at
        self.key = key  # the batch_key its requests share (None without one)


def _keyed(batch_key: Hashable, collate_key: Hashable) -> Hashable:
    """The group of a request with a ``batch_key``: its key, then its collate key."""
    try:
        hash(batch_key)
    except TypeError:
        raise InvalidInputError(f"batch_key returned an unhashable {type(batch_key).__qualname__}") from None
    return (batch_key, collate_key)


def _real(value: object) -> float | None:
    """``value`` as a float if it is a real number (numpy's included, bools not), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_cost(cost: object) -> float:
    value = _real(cost)
    if value is None:
        raise TypeError(f"batch_cost must return a number, got {type(cost).__qualname__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"batch_cost must return a finite number >= 0, got {cost}")
    return value


def _check_priority(priority: object) -> float:
    value = _real(priority)
    if value is None:
        raise TypeError(f"priority must be a number, got {type(priority).__qualname__}")
    if not math.isfinite(value):
        raise ValueError(f"priority must be finite, got {priority}")
    return value


class Scheduler:
    """The queue, the flush decision, the deadlines and every request state change."""

    def __init__(self, settings: Settings, key: Callable[[Any], Hashable], *, padded_cost: bool, name: str) -> None:
        self.settings = settings
        self.name = name
        self.counters = Counters()
        self.costs = CostBook()  # run time by batch size: batcher-wide and per group (see _cost.py)
        self.cost_model = self.costs.all
        self.guard_deadlines = True  # admission and early failure by predicted run time (off: a plain FIFO)
        self.closing = False
        self._key = key
        self._padded_cost = padded_cost
        self._queue = RequestQueue()
        self._running: set[Batch] = set()
        self._arrivals = ArrivalRate()
        self._policy: FlushPolicy = self._make_policy(settings)
        self._oom = OomCap()
        self.limit = settings.limit  # the largest batch to form now (OOM cap included)
        self.concurrency_limit = settings.slots  # batches in flight allowed now (the worker's, with "auto")
        self._backend: Backend | None = None
        self._blocked: set[Batch] = set()  # hung batches whose slot waits for the call to return
        self._oldest_queued = math.inf  # arrival of the oldest queued request, as of the last look
        self._wakeup: anyio.Event | None = None  # set while the worker sleeps
        self._wake_size: float = 1  # a push wakes the sleeping worker when its group reaches this size
        self._sleep_until = math.inf  # when the sleeping worker wakes anyway
        self._flush_at = math.inf  # the earliest time a group not yet due becomes due

    # -- binding to an event loop ---------------------------------------------------

    def attach(self, backend: Backend) -> None:
        self._backend = backend

    def detach(self) -> None:
        self._backend = None
        self._wakeup = None

    # -- settings ---------------------------------------------------------------------

    def reconfigure(self, settings: Settings, *, reset_oom: bool) -> None:
        """Swap in new settings (from the next batch on) and look at the queue again."""
        if settings.max_wait_ms != self.settings.max_wait_ms or settings.max_latency != self.settings.max_latency:
            self._policy = self._make_policy(settings)
        self.settings = settings
        if reset_oom:
            self._oom.reset()
        self.limit = self._oom.limit(settings.limit)
        self.wake()

    def _make_policy(self, settings: Settings) -> FlushPolicy:
        return make_policy(settings, self.cost_model, self._running, self._arrivals, _now, self._slots)

    def _slots(self) -> int:
        """Batches that may run at once now: the tuner's limit, less slots a hung call still blocks."""
        return max(1, min(self.concurrency_limit, self.settings.slots - len(self._blocked)))

    # -- requests in: the caller's side --------------------------------------------

    def refuse(self, error: BaseException) -> BaseException:
        """Count a request refused before it was queued; returns ``error`` for the caller to raise."""
        self.counters.requests += 1
        self.counters.rejected += 1
        return error

    def closed_error(self) -> BatcherClosedError:
        return BatcherClosedError(f"batcher {self.name!r} is closed")

    def submit(self, x: Any, timeout_ms: float | None, priority: float) -> Request:
        """Queue one input (on the loop); raises for this caller only."""
        counters = self.counters
        counters.requests += 1
        settings = self.settings
        if self.closing:
            counters.rejected += 1
            raise self.closed_error()
        queue = self._queue
        if queue.live >= settings.max_queue_size:
            counters.rejected += 1
            counters.recent.refused(clock())
            raise QueueFullError(
                f"batcher {self.name!r} has {queue.live} requests queued (max_queue_size={settings.max_queue_size})"
            )
        now = clock()
        try:
            try:
                key = self._key(x)
            except TypeError as error:
                if isinstance(error, InvalidInputError):
                    raise
                raise InvalidInputError(str(error)) from error
            if settings.batch_key is not None:
                key = _keyed(settings.batch_key(x), key)
            if not priority and settings.batch_cost is None:  # the common case, kept short
                timeout = settings.timeout if timeout_ms is None else check_ms("timeout_ms", timeout_ms) / 1000
                if timeout is None:
                    request = Request(x, key, now, math.inf, now + settings.slack)
                    admit = False  # no deadline: nothing to predict, nothing paid
                else:
                    request = Request(x, key, now, now + timeout, now + timeout)
                    admit = self.guard_deadlines
                plain = True  # the queue keeps it in its FIFO if that keeps the FIFO in order
            else:
                request = self._special(x, key, now, timeout_ms, priority)
                plain = not priority
                admit = self.guard_deadlines and request.deadline != math.inf
        except BaseException:
            counters.failed += 1
            raise
        if admit:
            self._admit(request, plain, now)
        if not queue.live:
            self._oldest_queued = now
        group = queue.push(request, plain)
        wakeup = self._wakeup
        if wakeup is not None and (
            group.live >= self._wake_size
            or request.deadline < self._sleep_until
            or (settings.max_batch_cost is not None and group.cost >= settings.max_batch_cost)
        ):
            self._wakeup = None
            wakeup.set()
        return request

    def submit_to(self, future: ThreadFuture[Any], x: Any, timeout_ms: float | None, priority: float) -> None:
        """``submit`` for a caller in another thread (on the loop): its answer goes to ``future``."""
        if future.cancelled():
            return  # withdrawn before it got here: never a request
        if self._backend is None:  # its worker has ended: nobody would serve it
            future.set_exception(self.refuse(BatcherClosedError(f"batcher {self.name!r} stopped")))
            return
        try:
            request = self.submit(x, timeout_ms, priority)
        except BaseException as error:
            future.set_exception(error)
            return
        request.waiter = future
        future.request = request

    def _special(self, x: Any, key: Hashable, now: float, timeout_ms: float | None, priority: float) -> Request:
        """A request with its own timeout or priority, or a cost."""
        settings = self.settings
        cost = 1.0 if settings.batch_cost is None else _check_cost(settings.batch_cost(x))
        if timeout_ms is None:
            deadline = math.inf if settings.timeout is None else now + settings.timeout
        else:
            deadline = now + check_ms("timeout_ms", timeout_ms) / 1000
        due = now + settings.slack if deadline == math.inf else deadline
        return Request(x, key, now, deadline, due - _check_priority(priority) * settings.priority_aging, cost)

    def _admit(self, request: Request, plain: bool, now: float) -> None:
        """Refuse a request whose predicted answer comes after its deadline (counted as timed out)."""
        model = self.costs.own(request.key)
        if model is None:
            return  # nothing known of this group yet: admit (its batches teach its own model)
        running = [(self.costs.model(b.requests[0].key), len(b.requests), now - b.started_at) for b in self._running]
        ahead = self._queue.ahead(request, plain)
        predicted = time_to_answer(model, ahead, self.limit, self._slots(), running, now)
        if now + predicted <= request.deadline:
            return
        self.counters.timed_out += 1
        raise RequestTimeoutError(
            f"batcher {self.name!r}: request cannot finish within its {(request.deadline - now) * 1000:.6g} ms "
            f"timeout (its answer is predicted in {predicted * 1000:.3g} ms, {ahead} queued ahead of it); refused"
        )

    def abandon(self, request: Request) -> None:
        """The caller stopped waiting (cancelled): never answer it, never send it."""
        state = request.state
        if state == QUEUED:
            request.state = CANCELLED
            request.item = None
            self._queue.forget(request)
            self._left(request)
        elif state == RUNNING:
            request.state = CANCELLED
            self.counters.in_flight -= 1
        else:
            return
        self.counters.cancelled += 1

    def _left(self, request: Request) -> None:
        """A queued request left unsent (cancelled, timed out): a hook for ``DedupScheduler``."""

    # -- batches out: the worker's side ----------------------------------------------

    @property
    def pending(self) -> int:
        return self._queue.live

    @property
    def flush_at(self) -> float:
        """When the next queued group not yet due becomes due, as of the last ``take`` (inf: none)."""
        return self._flush_at

    def take(self, now: float, *, limit: int | None = None, due: bool = False) -> Batch | None:
        """The batch to run now, if a group is due; else remember when one will be.

        ``limit`` caps the batch below the batcher's limit, and ``due`` makes any
        queued request due now (a step-level batcher admits rows into a running
        state without waiting).
        """
        self._arrivals.observe(self.counters.requests, now)
        while True:
            key, reason = self._due_group(now, due)
            if key is _NO_GROUP:
                return None
            batch = self._take_group(key, now, self.limit if limit is None else min(limit, self.limit), reason)
            if batch is not None:
                return batch

    def due(self, now: float) -> tuple[float, float] | None:
        """What ``take(now)`` would send: its earliest deadline and expected run time; None if nothing is due."""
        key, _ = self._due_group(now)
        if key is _NO_GROUP:
            return None
        for group_key, group in self._queue.groups():
            if group_key == key:
                return group.earliest_deadline(), self.costs.model(key).expected(min(group.live, self.limit))
        return None  # pragma: no cover - _due_group returns the key of a group it saw

    def _take_group(self, key: Hashable, now: float, limit: int, reason: int) -> Batch | None:
        horizon = self._drop_hopeless(key, now, limit) if self.guard_deadlines else now
        requests = self._queue.pop(key, limit, self.settings.max_batch_cost, self._padded_cost)
        if reason == FULL:  # the group was full by size or by cost: which one the batch met
            reason = COST if len(requests) < limit else CAP if self.limit < self.settings.limit else FULL
        backend = self._backend
        assert backend is not None
        counters = self.counters
        taken: list[Request] = []
        items: list[Any] = []
        starts: list[float] = []
        deadline = math.inf
        withdrawn = backend.withdrawn
        for request in requests:
            if withdrawn(request):  # cancelled in this very tick: its task has not run yet
                request.state = CANCELLED
                request.item = None
                counters.cancelled += 1
                self._left(request)
            elif request.deadline <= horizon:
                # It cannot finish in time (less time left than even a quick run of this batch): fail it now.
                request.state = TIMED_OUT
                request.item = None
                counters.timed_out += 1
                self._fail(request, self._timeout_error(request, early=request.deadline > now, size=len(requests)))
                self._left(request)
            else:
                request.state = RUNNING
                taken.append(request)
                items.append(request.item)
                request.item = None
                starts.append(request.enqueued_at)
                if request.deadline < deadline:
                    deadline = request.deadline
        if not taken:
            return None
        counters.queue_wait.add_since(now, starts)
        counters.in_flight += len(taken)
        counters.flushed(reason, len(taken), now, backlog=self._queue.live > 0)
        shared = cast("tuple[Hashable, Hashable]", key)[0] if self.settings.batch_key is not None else None
        batch = Batch(taken, items, deadline, now, shared)
        self._running.add(batch)
        return batch

    def _drop_hopeless(self, key: Hashable, now: float, limit: int) -> float:
        """Fail the requests of group ``key`` that its next batch cannot answer in time; returns that horizon.

        They leave before the batch is formed, so that requests that can still
        make it take their places.
        """
        group = self._queue.group(key)
        if group is None or group.earliest_deadline() == math.inf:
            return now
        size = min(group.live, limit)
        model = self.costs.own(key)
        if model is None:
            return now  # nothing known of this group yet: nobody is failed early
        horizon = hopeless_before(model, size, now, backlog=group.live > limit)
        counters = self.counters
        for request in self._queue.expired_in(key, horizon):
            request.state = TIMED_OUT
            request.item = None
            counters.timed_out += 1
            self._fail(request, self._timeout_error(request, early=request.deadline > now, size=size))
            self._left(request)
        return horizon

    def _due_group(self, now: float, due_now: bool = False) -> tuple[Hashable, int]:
        """The key of the group to flush now (the one whose oldest request is oldest), or ``_NO_GROUP``,
        and the reason it is due (see ``_flushes``; ``FULL`` stands for full by size or by cost)."""
        best_key: Hashable = _NO_GROUP
        best_reason = FULL
        best_time = math.inf
        oldest = math.inf
        flush_at = math.inf
        limit = self.limit
        max_cost = self.settings.max_batch_cost
        for key, group in self._queue.groups():
            head = group.oldest()
            oldest = min(oldest, head.enqueued_at)
            if group.live >= limit or (max_cost is not None and group.cost >= max_cost):
                due, reason = now, FULL
            else:
                due = wait_until = self._policy.flush_at(head, group.live, limit)
                deadline = group.earliest_deadline()
                if deadline < due:  # early enough for the earliest deadline (see _deadlines.flush_by)
                    due = min(due, flush_by(self.costs.model(key), min(group.live, limit), deadline, head.enqueued_at))
                if wait_until <= now:
                    reason = IDLE if wait_until == head.enqueued_at else TIMER
                elif due <= now:
                    reason = DEADLINE
                elif due_now or self.closing:
                    due, reason = now, STEP if due_now else DRAIN
            if due <= now:
                if head.enqueued_at < best_time:
                    best_key, best_reason, best_time = key, reason, head.enqueued_at
            elif due < flush_at:
                flush_at = due
        self._flush_at = flush_at
        self._oldest_queued = oldest
        return best_key, best_reason

    def expire(self, now: float) -> None:
        """Fail every request whose deadline has passed, queued or running."""
        counters = self.counters
        for request in self._queue.expired(now):
            request.state = TIMED_OUT
            request.item = None
            counters.timed_out += 1
            self._fail(request, self._timeout_error(request))
            self._left(request)
        for batch in self._running:
            if batch.deadline > now:
                continue
            earliest = math.inf
            for request in batch.requests:
                if request.state != RUNNING:
                    continue
                if request.deadline <= now:
                    request.state = TIMED_OUT
                    counters.timed_out += 1
                    counters.in_flight -= 1
                    self._fail(request, self._timeout_error(request))
                elif request.deadline < earliest:
                    earliest = request.deadline
            batch.deadline = earliest

    def _next_deadline(self) -> float:
        earliest = min((group.earliest_deadline() for _, group in self._queue.groups()), default=math.inf)
        return min(earliest, min((batch.deadline for batch in self._running), default=math.inf))

    async def sleep(self, *, can_start: bool, until: float = math.inf) -> None:
        """Sleep until a batch may be due, a deadline passes, ``until``, or ``wake()``."""
        wake_at = min(until, self._next_deadline())
        if can_start:
            wake_at = min(wake_at, self._flush_at)
            # Nothing queued: any push may be due. Something queued: its flush time is
            # known, so only a group becoming full (or a new, earlier deadline) changes it.
            self._wake_size = 1 if self._flush_at == math.inf else self.limit
        else:
            self._wake_size = math.inf  # all slots busy: only a finished batch (or a deadline) matters
        self._sleep_until = wake_at
        wakeup = self._wakeup = anyio.Event()
        try:
            if wake_at == math.inf:
                await wakeup.wait()
            else:
                with anyio.move_on_after(max(0.0, wake_at - clock())):
                    await wakeup.wait()
        finally:
            self._wakeup = None
            self._sleep_until = -math.inf

    def wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    # -- answers -----------------------------------------------------------------------

    def finish(self, batch: Batch, outcome: Outcome) -> None:
        """A batch ran: learn from it, then answer each of its callers still waiting."""
        self.learn(batch, outcome)
        self.answer(batch, outcome)

    def learn(self, batch: Batch, outcome: Outcome) -> None:
        """Take in what a finished batch tells about the model (run time, memory) before the next forms."""
        self._running.discard(batch)
        counters = self.counters
        counters.ran(outcome.seconds, clock())
        size = len(batch.requests)
        counters.oom_splits += outcome.splits
        if self._oom.observe(outcome.oom_fit, size, self.settings.limit):
            self.limit = self._oom.limit(self.settings.limit)
            if outcome.oom_fit is not None:
                logger.warning("batcher %r: out of memory; batches capped at %d", self.name, self.limit)
            else:
                logger.info("batcher %r: no out-of-memory error lately; batch cap now %d", self.name, self.limit)
        if outcome.fit is None and outcome.error is None:
            # What a caller waits for: the run, and the hand-offs to and from the slot.
            now = clock()
            self.costs.observe(batch.requests[0].key, size, max(outcome.seconds, now - batch.started_at), now)

    def answer(self, batch: Batch, outcome: Outcome) -> None:
        """Answer each caller of a finished batch that still waits."""
        counters = self.counters
        if outcome.outputs is None:
            assert outcome.error is not None
            self.fail_batch(batch, outcome.error)
            return
        backend = self._backend
        assert backend is not None
        answered: list[Request] = []
        values: list[Any] = []
        starts: list[float] = []
        for request, output in zip(batch.requests, outcome.outputs, strict=True):
            if request.state != RUNNING:
                continue
            request.state = DONE
            if type(output) is Failed:
                counters.failed += 1
                starts.append(request.enqueued_at)
                backend.fail(request, output.error)
            else:
                answered.append(request)
                values.append(output)
                starts.append(request.enqueued_at)
        counters.in_flight -= len(starts)
        counters.completed += len(answered)
        counters.latency.add_since(clock(), starts)
        backend.resolve(answered, values)

    def fail_batch(self, batch: Batch, error: BaseException) -> None:
        """Answer every caller of ``batch`` still waiting with (a copy of) ``error``."""
        self._running.discard(batch)
        self._fail_all([r for r in batch.requests if r.state == RUNNING], error)

    def _fail_all(self, waiting: list[Request], error: BaseException) -> None:
        if not waiting:
            return
        counters = self.counters
        counters.in_flight -= len(waiting)
        counters.failed += len(waiting)
        counters.latency.add_since(clock(), [r.enqueued_at for r in waiting])
        for request, copied in zip(waiting, copies(error, len(waiting)), strict=True):
            request.state = DONE
            self._fail(request, copied)

    def fail_requests(self, requests: list[Request], error: BaseException) -> None:
        """Answer each of ``requests`` still running with (a copy of) ``error``."""
        self._fail_all([r for r in requests if r.state == RUNNING], error)

    def fail_running(self, error: BaseException) -> None:
        """Answer every running request with ``error`` (its worker stopped)."""
        for batch in list(self._running):
            self.fail_batch(batch, error)

    def hung(self, batch: Batch, error: BaseException, *, blocked: bool = False) -> None:
        """A batch ran past ``run_timeout_ms`` and was given up on (``blocked``: its slot still waits)."""
        self.counters.hung += 1
        self.fail_batch(batch, error)
        if blocked:
            self._blocked.add(batch)

    def unblocked(self, batch: Batch) -> None:
        """The call of a hung batch returned: its slot is free again."""
        self._blocked.discard(batch)

    def fail_queued(self, error: BaseException) -> int:
        """Answer every queued request with ``error`` (the worker stopped); returns how many."""
        leftovers = self._queue.pop_all()
        for request in leftovers:
            request.state = DONE
            request.item = None
            self._fail(request, error)
        self.counters.failed += len(leftovers)
        return len(leftovers)

    def _fail(self, request: Request, error: BaseException) -> None:
        """Wake a caller with ``error`` (its stream ends with it, for a streaming request)."""
        if request.channel is not None:
            request.channel.close(error)
        elif self._backend is not None:
            self._backend.fail(request, error)

    # -- streams: many items per request --------------------------------------------------

    def deliver(self, requests: list[Request], items: Sequence[Any], finished: Sequence[bool] | None) -> None:
        """One step's items, one per request; ``END`` or ``finished`` ends a request's stream."""
        counters = self.counters
        ended: list[Request] = []
        for index, (request, item) in enumerate(zip(requests, items, strict=True)):
            if request.state != RUNNING:
                continue  # cancelled or expired: its items are dropped
            if item is END:
                ended.append(request)
                continue
            if not request.channel.push(item):
                request.state = DONE
                counters.in_flight -= 1
                counters.failed += 1
                request.channel.close(
                    StreamBufferFullError(
                        f"batcher {self.name!r}: this stream's reader fell {self.settings.stream_buffer} items "
                        "behind (stream_buffer); it was cut off so that the other rows do not wait"
                    )
                )
            elif finished is not None and finished[index]:
                ended.append(request)
        self._end(ended)

    def end_streams(self, batch: Batch, error: BaseException | None) -> None:
        """A generator finished (or raised): every stream of ``batch`` still open ends."""
        self._running.discard(batch)
        open_ = [r for r in batch.requests if r.state == RUNNING]
        if error is not None:
            self._fail_all(open_, error)
        else:
            self._end(open_)

    def _end(self, requests: list[Request]) -> None:
        if not requests:
            return
        for request in requests:
            request.state = DONE
            request.channel.close()
        counters = self.counters
        counters.in_flight -= len(requests)
        counters.completed += len(requests)
        counters.latency.add_since(clock(), [r.enqueued_at for r in requests])

    def prune_running(self) -> None:
        """Forget running batches none of whose requests still waits (step-level rows end one by one)."""
        done = [b for b in self._running if all(r.state != RUNNING for r in b.requests)]
        for batch in done:
            self._running.discard(batch)

    def _timeout_error(self, request: Request, *, early: bool = False, size: int = 1) -> RequestTimeoutError:
        timeout = (request.deadline - request.enqueued_at) * 1000.0
        if early:
            expected = self.costs.model(request.key).expected(size) * 1000
            left = (request.deadline - clock()) * 1000
            return RequestTimeoutError(
                f"batcher {self.name!r}: request cannot finish within its {timeout:.6g} ms timeout "
                f"({left:.3g} ms left, and a batch of {size} is expected to take {expected:.3g} ms); not sent"
            )
        return RequestTimeoutError(f"batcher {self.name!r}: request timed out after {timeout:.6g} ms")

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot; safe from any thread (it copies, under the GIL, and never sorts)."""
        now = clock()
        pending = self._queue.live
        backend = self._backend
        if pending and backend is not None and backend.is_current():  # exact on the loop; a hint elsewhere
            self._oldest_queued = min(group.oldest().enqueued_at for _, group in self._queue.groups())
        started = [b.started_at for b in list(self._running) + list(self._blocked)]
        settings = self.settings
        return self.counters.snapshot(
            pending=pending,
            batch_size_limit=self.limit,
            oldest_queued_ms=max(0.0, now - self._oldest_queued) * 1000 if pending else 0.0,
            oldest_running_ms=(now - min(started)) * 1000 if started else 0.0,
            blocked_slots=len(self._blocked),
            concurrency_limit=self.concurrency_limit,
            now=now,
            slots=self.concurrency_limit,  # the slots in use ("auto": those the tuner allows)
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
        )
