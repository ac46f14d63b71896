"""StepBatcher: step-level (continuous) batching for models that answer in many steps.

A generator model (``Batcher`` with ``fn`` a generator) runs a batch until its
longest member is done: short requests wait for long ones, new ones for the
whole batch. A step model hands batchkit the steps themselves, so requests join
and leave between any two of them:

```text
 event loop (StepWorker.run)                      step thread (StepWorker._steps)
 ───────────────────────────                      ───────────────────────────────
 take up to max_batch_size - running  ──admitted──▶ start(new inputs), join into the state
   (idle: after max_wait_ms; busy: at once)          drop rows cancelled or past their deadline (select)
 deliver items, end finished streams  ◀──per step── step(state) → items, finished
                                                     drop finished rows (select)
```

The scheduler keeps its usual meaning: the queue, ``max_queue_size``,
deadlines (a row past its deadline fails and is dropped at the next step),
cancellation, ``stats()`` and ``aclose()`` (every admitted row runs to its end).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import anyio

from ._backend import Backend
from ._batcher import Batcher
from ._errors import BatcherClosedError, BatchSizeMismatchError
from ._execute import answerable
from ._queue import RUNNING, Request
from ._runner import ThreadRunner
from ._scheduler import Batch, Scheduler, clock
from ._settings import DEFAULT_MAX_QUEUE_SIZE
from ._threads import Inbox
from ._worker import BoundWorker

__all__ = ["StepBatcher", "StepModel"]

logger = logging.getLogger("batchkit")

InT = TypeVar("InT")
OutT = TypeVar("OutT")
StateT = TypeVar("StateT")


class StepModel(Protocol[StateT]):
    """What ``StepBatcher`` drives; all four run on its step thread."""

    def start(self, inputs: list[Any]) -> StateT:
        """Prepare one row per input (a prefill, say)."""
        ...

    def step(self, state: StateT) -> tuple[Sequence[Any], Sequence[bool]]:
        """One step for every row: an item per row, and whether that row is finished."""
        ...

    def join(self, a: StateT, b: StateT) -> StateT:
        """The rows of ``a``, then those of ``b``."""
        ...

    def select(self, state: StateT, rows: list[int]) -> StateT:
        """Only these rows, in this order."""
        ...


class _NotABatchFunction:
    def __init__(self, model: object) -> None:
        self.model = model

    def __call__(self, batch: Any) -> Any:
        raise TypeError("a StepBatcher's model is driven step by step, never called on a batch")


class StepBatcher(Batcher[InT, OutT], Generic[InT, OutT]):
    """Step-level batching: rows join and leave a running model between any two steps.

    ```python
    batcher = batchkit.StepBatcher(generator_model, max_batch_size=32)
    async for token in batcher.stream(prompt):
        ...
    ```

    ``model`` has ``start(inputs) -> state``, ``step(state) -> (items,
    finished)``, ``join(a, b) -> state`` and ``select(state, rows) -> state``
    (see `StepModel`). They run on the batcher's own thread, one step at a
    time; between two steps newly arrived requests are started and joined (up
    to ``max_batch_size`` rows; when no row runs, after at most ``max_wait_ms``
    for batch-mates), and rows that finished, were cancelled or passed their
    deadline are selected away. The item of the step that finishes a row is
    delivered, then its stream ends.

    ``stream(x)`` yields one caller's items as they are produced; ``predict(x)``
    returns the list of them. An exception in ``start`` fails only the new rows;
    in ``step``, ``join`` or ``select``, every row of that state; the batcher
    keeps serving. A reader that falls ``stream_buffer`` items behind is cut off
    (``StreamBufferFullError``) so that the other rows never wait for it.
    """

    def __init__(
        self,
        model: StepModel[Any],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float | Literal["auto"] = 2.0,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        timeout_ms: float | None = None,
        priority_aging_ms: float = 1000.0,
        stream_buffer: int = 1024,
        name: str | None = None,
    ) -> None:
        missing = [m for m in ("start", "step", "join", "select") if not callable(getattr(model, m, None))]
        if missing:
            raise TypeError(
                f"a StepBatcher's model needs start, step, join and select methods; "
                f"{type(model).__qualname__} has no {', '.join(missing)}"
            )
        super().__init__(
            _NotABatchFunction(model),
            collate=None,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue_size=max_queue_size,
            timeout_ms=timeout_ms,
            priority_aging_ms=priority_aging_ms,
            stream_buffer=stream_buffer,
            name=name or type(model).__qualname__,
        )
        self._model = model
        self._streams = True

    @property
    def model(self) -> StepModel[Any]:
        """The step model."""
        return self._model

    def _new_worker(self, scheduler: Scheduler, backend: Backend) -> BoundWorker:
        return StepWorker(scheduler, backend, self._model)


class StepWorker:
    """Admits requests on the loop; runs the step loop on its own thread."""

    def __init__(self, scheduler: Scheduler, backend: Backend, model: StepModel[Any]) -> None:
        self.backend = backend
        self.inbox = Inbox(backend.call_soon_threadsafe)
        self.done = anyio.Event()
        self.retired = False
        self._scheduler = scheduler
        self._model = model
        self._admitted: deque[Batch] = deque()  # handed to the step thread
        self._signal = threading.Event()  # wakes the idle step thread
        self._stopping = False
        self._orphaned = False  # the loop is gone: the step thread drops everything and exits
        self._drained = False
        self._runner = ThreadRunner(name=f"batchkit-{scheduler.name}-steps")
        self._runner.submit(self._steps)

    # -- on the event loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._serve()
        except Exception:  # a bug in batchkit: never take the event loop down with it
            logger.exception("batcher %r: step worker crashed; failing its requests", self._scheduler.name)
        finally:
            self._stop(BatcherClosedError(f"batcher {self._scheduler.name!r} stopped before this stream ended"))

    async def _serve(self) -> None:
        scheduler = self._scheduler
        counters = scheduler.counters
        while not self.retired:
            now = clock()
            scheduler.expire(now)
            room = scheduler.limit - counters.in_flight
            if room > 0:
                # Rows running: newcomers join at the next step. None: wait for batch-mates as usual.
                batch = scheduler.take(now, limit=room, due=counters.in_flight > 0)
                if batch is not None:
                    self._admitted.append(batch)
                    self._signal.set()
                    continue
            if scheduler.closing and not scheduler.pending and not counters.in_flight:
                self._drained = True
                return  # drained: every admitted row has run to its end
            await scheduler.sleep(can_start=room > 0)

    def _on_step(self, rows: list[Request], items: list[Any], finished: list[bool], seconds: float) -> None:
        scheduler = self._scheduler
        scheduler.counters.ran(seconds, clock(), batch=False)  # the step thread's busy time
        scheduler.deliver(rows, items, finished)
        scheduler.prune_running()
        scheduler.wake()  # rows may have ended: room for newcomers

    def _on_failure(self, rows: list[Request], error: BaseException) -> None:
        scheduler = self._scheduler
        scheduler.fail_requests(rows, error)
        scheduler.prune_running()
        scheduler.wake()

    def _stop(self, error: BaseException) -> None:
        self.retired = True
        scheduler = self._scheduler
        scheduler.fail_running(error)
        scheduler.fail_queued(error)
        self.inbox.close()
        self._stopping = True
        self._signal.set()
        # Drained, the thread is idle and exits at once: join it. Otherwise it may be in a long
        # step: it exits after that step, with its rows dropped.
        self._runner.stop(join=self._drained)
        self.done.set()

    def abandon(self, error: BaseException) -> None:
        """The loop is gone (the scheduler is detached): fail what is held, stop the thread."""
        self._orphaned = True
        self._stop(error)

    # -- on the step thread ------------------------------------------------------------

    def _post(self, call: Any, *args: Any) -> None:
        try:
            self.backend.call_soon_threadsafe(call, *args)
        except RuntimeError:  # the loop is gone: nobody to deliver to, stop stepping
            self._orphaned = True

    def _steps(self) -> None:
        model = self._model
        rows: list[Request] = []
        state: Any = None
        while not self._orphaned:
            began = clock()
            # Rows that left (cancelled, past their deadline) go before newcomers join, so the
            # state never holds more than max_batch_size rows.
            rows, state = self._keep(rows, state, [i for i, r in enumerate(rows) if r.state == RUNNING])
            while self._admitted:
                batch = self._admitted.popleft()
                try:
                    fresh = model.start(batch.items)
                except BaseException as error:  # only the new rows fail
                    self._post(self._on_failure, batch.requests, answerable(error))
                    continue
                try:
                    state = fresh if state is None else model.join(state, fresh)
                except BaseException as error:  # the joined state is lost: every row fails
                    self._post(self._on_failure, rows + batch.requests, answerable(error))
                    rows, state = [], None
                    continue
                rows.extend(batch.requests)
            try:
                if not rows:
                    self._signal.clear()
                    if self._admitted:
                        continue
                    if self._stopping:
                        return
                    self._signal.wait()
                    continue
                items, finished = model.step(state)
                if len(items) != len(rows) or len(finished) != len(rows):
                    raise BatchSizeMismatchError(
                        f"step() returned {len(items)} items and {len(finished)} finished flags "
                        f"for {len(rows)} rows; it must return one of each per row"
                    )
                self._post(self._on_step, list(rows), list(items), [bool(f) for f in finished], clock() - began)
                rows, state = self._keep(rows, state, [i for i, f in enumerate(finished) if not f])
            except BaseException as error:
                self._post(self._on_failure, rows, answerable(error))
                rows, state = [], None

        self._runner.stop(join=False)  # orphaned: nobody else will tell this thread to end

    def _keep(self, rows: list[Request], state: Any, keep: list[int]) -> tuple[list[Request], Any]:
        if len(keep) == len(rows):
            return rows, state
        if not keep:
            return [], None
        return [rows[i] for i in keep], self._model.select(state, keep)
