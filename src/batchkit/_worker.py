"""The worker: one task per bound event loop that turns the scheduler's batches into model runs.

```text
loop:  give up on hung runs ─▶ expire deadlines ─▶ a slot free and a batch due? ─▶ start it
                                                    └── no: sleep until the scheduler's next time
```

A synchronous model runs on its slot's thread; the thread hands the outcome back
with one ``call_soon_threadsafe`` per batch. An async model runs in a task of
the worker's task group. A result is taken only from the run its slot is
waiting for (``slot.batch is batch``): a late result from a run that was given
up on (hung, or the worker stopped) is dropped, as its callers were answered then.

When the worker stops for any reason other than a drained ``aclose`` (its task
cancelled, its loop shutting down), it answers every request it still holds
with ``BatcherClosedError``: queued, and running on a thread. No caller is left
waiting on a worker that is gone.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc

from ._backend import Backend
from ._errors import BatcherClosedError, ModelTimeoutError
from ._execute import Executor, Outcome
from ._queue import RUNNING
from ._runner import Slot, ThreadRunner
from ._scheduler import Batch, Scheduler, clock
from ._shared import Lease, SharedExecutor
from ._threads import Inbox
from ._tuner import ConcurrencyTuner

__all__ = ["BoundWorker", "Worker", "current_batch_key"]

logger = logging.getLogger("batchkit")


_BATCH_KEY: contextvars.ContextVar[Hashable] = contextvars.ContextVar("batchkit_batch_key", default=None)


def current_batch_key() -> Hashable:
    """The ``batch_key`` shared by the batch the calling model function is running.

    ```python
    def model(batch):
        adapter = adapters[batchkit.current_batch_key()]   # every input of this batch has this key
        ...
    ```

    ``None`` outside a model call, or for a batcher without ``batch_key``.
    """
    return _BATCH_KEY.get()


class BoundWorker(Protocol):
    """What a Batcher needs of the worker it binds to a loop (``Worker``, or ``StepWorker``)."""

    backend: Backend
    inbox: Inbox
    done: anyio.Event
    retired: bool

    async def run(self) -> None: ...

    def abandon(self, error: BaseException) -> None: ...


class Worker:
    """Runs one scheduler's batches on one event loop, in slots (threads or tasks)."""

    def __init__(
        self,
        scheduler: Scheduler,
        backend: Backend,
        executor: Executor,
        slot_fns: Sequence[Callable[[Any], Any]],
        *,
        is_async: bool,
        streams: bool = False,
        shared: SharedExecutor | None = None,
        weight: float = 1.0,
    ) -> None:
        self.backend = backend
        self.inbox = Inbox(backend.call_soon_threadsafe)  # requests from other threads
        self.done = anyio.Event()
        self.retired = False
        self._scheduler = scheduler
        self._executor = executor
        self._is_async = is_async
        self._streams = streams
        self._slots = [Slot(i, fn, None if is_async else self._new_runner(i)) for i, fn in enumerate(slot_fns)]
        self._idle = list(reversed(self._slots))  # pop() hands out slot 0 first
        self._tuner = ConcurrencyTuner(len(self._slots)) if scheduler.settings.auto_concurrency else None
        scheduler.concurrency_limit = len(self._slots) if self._tuner is None else self._tuner.limit
        self._task_group: anyio.abc.TaskGroup | None = None
        # A shared executor's turn is needed to start a batch (see _shared). The executor holds
        # this worker weakly: a batcher dropped with its loop is not kept alive by it.
        self._lease: Lease | None = None
        self._turn_lock = threading.Lock()  # who gives a turn back: the loop, or a thread whose loop is gone
        if shared is not None:
            self._lease = shared.join(scheduler.name, weight, functools.partial(_turn_granted, weakref.ref(self)))

    def _new_runner(self, index: int, replacement: int = 0) -> ThreadRunner:
        suffix = f"-r{replacement}" if replacement else ""  # names stay unique after a hung thread
        return ThreadRunner(name=f"batchkit-{self._scheduler.name}-{index}{suffix}")

    async def run(self) -> None:
        """The worker task: returns once ``aclose`` has drained the queue, or when cancelled."""
        try:
            async with anyio.create_task_group() as task_group:  # runs async models' batches
                self._task_group = task_group
                await self._serve()
        except Exception:  # a bug in batchkit: never take the event loop down with it
            logger.exception("batcher %r: worker crashed; failing its requests", self._scheduler.name)
        finally:
            self._stop()

    async def _serve(self) -> None:
        scheduler = self._scheduler
        run_timeout = scheduler.settings.run_timeout
        while not self.retired:
            now = clock()
            if run_timeout is not None:
                self._give_up_hung(now)
            scheduler.expire(now)
            self._dispatch(now)
            if scheduler.closing:
                if not scheduler.pending and all(slot.batch is None or slot.hung for slot in self._slots):
                    return  # drained: everything accepted has been answered (a hung call is not waited for)
                if not self._idle and all(slot.hung for slot in self._slots):
                    scheduler.fail_queued(self._hung_error(closing=True))  # nothing can run them
                    return
            until = min((s.deadline for s in self._slots if s.deadline is not None), default=math.inf)
            waiting_turn = self._lease is not None and self._lease.waiting  # woken when it is promised one
            await scheduler.sleep(can_start=self._can_start() and not waiting_turn, until=until)

    def _dispatch(self, now: float) -> None:
        """Start a due batch in every free slot (with a shared executor: each on a turn of its own)."""
        lease = self._lease
        while self._can_start():
            if lease is not None and not self._take_turn(lease, now):
                return
            batch = self._scheduler.take(now)
            if batch is None:
                if lease is not None:
                    lease.release(0.0, now, ran=False)
                return
            self._start(batch)

    def _can_start(self) -> bool:
        """A slot is free (and, with ``"auto"``, fewer batches run than the tuner allows)."""
        if self._tuner is None or not self._idle:
            return bool(self._idle)
        # A slot blocked by a hung call makes no progress: it does not count against the limit.
        working = len(self._slots) - len(self._idle) - sum(1 for slot in self._slots if slot.hung)
        return working < self._tuner.limit

    def _take_turn(self, lease: Lease, now: float) -> bool:
        due = self._scheduler.due(now)
        if due is None:
            lease.withdraw(now)
            return False
        deadline, expected = due
        return lease.acquire(deadline, expected, now)

    def _start(self, batch: Batch) -> None:
        slot = self._idle.pop()
        slot.batch = batch
        if self._lease is not None:
            slot.turn = batch
        if self._is_async:
            assert self._task_group is not None
            run = self._run_stream_async if self._streams else self._run_async
            self._task_group.start_soon(run, slot, batch)
            return
        self._extend_deadline(slot)
        assert slot.runner is not None
        run_sync = self._run_stream_sync if self._streams else self._run_sync
        slot.runner.submit(functools.partial(run_sync, slot, batch))

    def _extend_deadline(self, slot: Slot) -> None:
        """A run counts as hung past run_timeout_ms from its start (a stream: from its last step)."""
        run_timeout = self._scheduler.settings.run_timeout
        slot.deadline = None if run_timeout is None else clock() + run_timeout

    def _run_sync(self, slot: Slot, batch: Batch) -> None:
        """On the slot's thread: run the batch, hand the outcome to the loop."""
        token = _BATCH_KEY.set(batch.key)
        try:
            outcome = self._executor.run(slot.fn, batch.items)
        finally:
            _BATCH_KEY.reset(token)
        posted = True
        try:
            self.backend.call_soon_threadsafe(self._finish, slot, batch, outcome)
        except RuntimeError:  # the event loop is gone, and its callers with it
            posted = False
        if self._lease is not None:
            self._returned(slot, batch, posted)
        del outcome, batch  # a failed model's frames link back here: hold nothing (see _execute._RELEASE)

    async def _run_async(self, slot: Slot, batch: Batch) -> None:
        outcome: Outcome | None = None
        _BATCH_KEY.set(batch.key)  # this task's own context
        with anyio.move_on_after(self._scheduler.settings.run_timeout):  # None: no limit
            outcome = await self._executor.run_async(slot.fn, batch.items, self.backend.cancel_requested)
        if outcome is None:
            self._release(slot)
            self._scheduler.hung(batch, self._hung_error())
        else:
            self._finish(slot, batch, outcome)
        del outcome, batch  # see _run_sync

    def _run_stream_sync(self, slot: Slot, batch: Batch) -> None:
        """On the slot's thread: iterate a generator model, handing each step's items to the loop."""

        def emit(rows: list[Any]) -> bool:
            try:
                self.backend.call_soon_threadsafe(self._deliver, slot, batch, rows)
            except RuntimeError:
                return False  # the loop is gone
            return any(r.state == RUNNING for r in batch.requests)  # read across threads: a hint only

        token = _BATCH_KEY.set(batch.key)
        try:
            outcome = self._executor.run_stream(slot.fn, batch.items, emit)
        finally:
            _BATCH_KEY.reset(token)
        posted = True
        try:
            self.backend.call_soon_threadsafe(self._finish_stream, slot, batch, outcome)
        except RuntimeError:
            posted = False
        if self._lease is not None:
            self._returned(slot, batch, posted)
        del outcome, emit  # see _run_sync

    async def _run_stream_async(self, slot: Slot, batch: Batch) -> None:
        run_timeout = self._scheduler.settings.run_timeout
        outcome: Outcome | None = None
        _BATCH_KEY.set(batch.key)  # this task's own context
        with anyio.CancelScope() as scope:

            def emit(rows: list[Any]) -> bool:
                if run_timeout is not None:  # each step gets run_timeout_ms
                    scope.deadline = anyio.current_time() + run_timeout
                self._deliver(slot, batch, rows)
                return slot.batch is batch and any(r.state == RUNNING for r in batch.requests)

            if run_timeout is not None:
                scope.deadline = anyio.current_time() + run_timeout
            outcome = await self._executor.run_stream_async(slot.fn, batch.items, emit, self.backend.cancel_requested)
        if outcome is None:  # a step ran past run_timeout_ms
            self._release(slot)
            self._scheduler.hung(batch, self._hung_error())
        else:
            self._finish_stream(slot, batch, outcome)
        del outcome, emit  # see _run_sync

    def _deliver(self, slot: Slot, batch: Batch, rows: list[Any]) -> None:
        if slot.batch is not batch:
            return  # a run given up on
        if not self._is_async:
            self._extend_deadline(slot)
        self._scheduler.deliver(batch.requests, rows, None)

    def _finish_stream(self, slot: Slot, batch: Batch, outcome: Outcome) -> None:
        if slot.batch is not batch or self._unblock(slot):
            return
        self._release(slot)
        self._scheduler.counters.ran(outcome.seconds, clock())
        self._scheduler.end_streams(batch, outcome.error)
        self._tune(batch)
        if not self.retired:
            self._dispatch(clock())

    def _finish(self, slot: Slot, batch: Batch, outcome: Outcome) -> None:
        """On the loop: a run is done. Learn from it, start the next batch, then answer its callers.

        In that order the model is never idle while the loop wakes a whole batch
        of callers (at saturation that gap was about a tenth of the model's time).
        """
        if slot.batch is not batch:
            return  # a run given up on: its callers were answered then
        if self._unblock(slot):
            return
        self._release(slot)
        scheduler = self._scheduler
        scheduler.learn(batch, outcome)  # a new memory cap applies to the very next batch
        self._tune(batch)
        if not self.retired:
            self._dispatch(clock())
        scheduler.answer(batch, outcome)

    def _tune(self, batch: Batch) -> None:
        """With ``"auto"``: tell the tuner a batch finished (saturated if requests are still queued)."""
        if self._tuner is not None:
            scheduler = self._scheduler
            self._tuner.observe(len(batch.requests), clock(), saturated=scheduler.pending > 0)
            scheduler.concurrency_limit = self._tuner.limit

    def _release(self, slot: Slot) -> None:
        slot.batch = slot.deadline = None
        if self._lease is not None:
            now = clock()
            self._give_turn_back(slot, now, None if self.retired else self._scheduler.due(now))
        self._idle.append(slot)
        self._scheduler.wake()

    # -- shared executor turns ------------------------------------------------------------

    def _give_turn_back(self, slot: Slot, now: float, wants: tuple[float, float] | None = None) -> None:
        """The run holding ``slot``'s turn is over (or given up on): the turn goes back, once."""
        assert self._lease is not None
        with self._turn_lock:
            batch, slot.turn = slot.turn, None
        if batch is not None:
            self._lease.release(now - batch.started_at, now, wants=wants)

    def _returned(self, slot: Slot, batch: Batch, posted: bool) -> None:
        """On the slot's thread, the call returned: give its turn back here if the loop will not.

        The loop will not when it is gone (``posted`` is False), when the worker
        has stopped, or when it is not running (stopped or paused: a callback
        may never run, and a paused loop must not hold the device).
        """
        with self._turn_lock:
            slot.returned = batch
            mine = slot.turn is batch and (not posted or self.retired or not self.backend.alive())
        if mine:
            self._give_turn_back(slot, clock())

    def _hand_over_turns(self) -> None:
        """The worker stops: give back the turns of runs that are over; a call still running on a
        thread keeps its turn, and its thread gives it back when the call returns."""
        assert self._lease is not None
        now = clock()
        for slot in self._slots:
            with self._turn_lock:
                over = slot.turn is not None and (self._is_async or slot.returned is slot.turn)
            if over:
                self._give_turn_back(slot, now)
        self._lease.leave(now)

    def _give_up_hung(self, now: float) -> None:
        """Synchronous runs past run_timeout_ms: fail their callers now.

        The call itself cannot be interrupted. By default its slot stays blocked
        until it returns, so the model is never called twice at once; with
        ``replace_hung`` the slot gets a fresh thread at once.
        """
        for slot in self._slots:
            batch = slot.batch
            if batch is None or slot.deadline is None or slot.deadline > now:
                continue
            logger.warning(
                "batcher %r: a batch of %d ran past run_timeout_ms; %s",
                self._scheduler.name,
                len(batch.requests),
                "replacing its thread" if self._scheduler.settings.replace_hung else "its slot waits for the call",
            )
            slot.deadline = None
            if not self._scheduler.settings.replace_hung:
                slot.hung = True
                self._scheduler.hung(batch, self._hung_error(), blocked=True)
                continue
            assert slot.runner is not None
            slot.runner.stop(join=False)  # it exits when the hung call returns
            slot.replacements += 1
            slot.runner = self._new_runner(slot.index, slot.replacements)
            self._release(slot)
            self._scheduler.hung(batch, self._hung_error())

    def _unblock(self, slot: Slot) -> bool:
        """A hung call finally returned: its callers were answered then; free its slot."""
        if not slot.hung:
            return False
        slot.hung = False
        self._scheduler.unblocked(slot.batch)
        self._release(slot)
        if not self.retired:
            self._dispatch(clock())
        return True

    def _hung_error(self, *, closing: bool = False) -> ModelTimeoutError:
        run_timeout = self._scheduler.settings.run_timeout
        assert run_timeout is not None
        if closing:
            return ModelTimeoutError(
                f"batcher {self._scheduler.name!r} closed while every slot waited for a call past "
                f"run_timeout_ms={run_timeout * 1000:g}; this request could never run"
            )
        return ModelTimeoutError(
            f"batcher {self._scheduler.name!r}: the model ran longer than run_timeout_ms={run_timeout * 1000:g}"
        )

    def _stop(self) -> None:
        """The worker is ending: answer whatever it still holds, stop its threads."""
        self.retired = True
        self._task_group = None
        scheduler = self._scheduler
        error = BatcherClosedError(f"batcher {scheduler.name!r} stopped before this request was answered")
        for slot in self._slots:
            batch, slot.batch = slot.batch, None
            if batch is not None:
                scheduler.fail_batch(batch, error)
                if slot.hung:
                    slot.hung = False
                    scheduler.unblocked(batch)  # its late return comes to no slot: stop counting it
            if slot.runner is not None:
                slot.runner.stop(join=batch is None)  # a busy thread exits when its run returns
                slot.runner = None
        failed = scheduler.fail_queued(error)
        if failed:
            logger.warning("batcher %r stopped with %d queued requests; failed them", scheduler.name, failed)
        if self._lease is not None:
            self._hand_over_turns()
        self.inbox.close()  # requests handed over from threads but not queued yet are refused
        self.done.set()
        logger.debug("batcher %r: worker stopped", scheduler.name)

    def abandon(self, error: BaseException) -> None:
        """Forget this worker without its loop (the loop is gone): fail what it holds, stop its threads.

        The scheduler must be detached first: the callers' futures belong to the dead loop.
        """
        self.retired = True
        for slot in self._slots:
            batch, slot.batch = slot.batch, None
            if batch is not None:
                self._scheduler.fail_batch(batch, error)
                if slot.hung:
                    slot.hung = False
                    self._scheduler.unblocked(batch)
            if slot.runner is not None:
                slot.runner.stop(join=False)
                slot.runner = None
        self._scheduler.fail_queued(error)
        if self._lease is not None:
            self._hand_over_turns()
        self.inbox.close()


def _turn_granted(worker_ref: weakref.ref[Worker]) -> bool:
    """From any thread: a shared executor promised a turn. Wake the worker to take it, if it can."""
    worker = worker_ref()
    if worker is None or worker.retired:
        return False
    backend = worker.backend
    try:
        backend.call_soon_threadsafe(worker._scheduler.wake)  # (a paused loop takes it up when it runs again)
    except RuntimeError:
        return False  # the loop is gone
    return backend.alive()  # a loop that is not running now cannot take it now: it goes to the next
