"""Batcher: gathers concurrent ``predict`` calls into batches for one model function.

The flow of one request::

    predict(x) ──key(x)──▶ RequestQueue ──flush policy──▶ worker task ──▶ runner thread
        ▲                  (group per key)  (full, or oldest       │      collate → fn → split
        │                                    waited max_wait)      │
        └──────────── future resolved on the event loop ◀──────────┘

Everything but the model call happens on the event loop thread, so the queue
needs no locks. A synchronous ``fn`` runs on the batcher's own worker thread;
an async ``fn`` is awaited by the worker task on the loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio

from ._backend import Backend, current_backend
from ._collate import CollateArg, make_collator
from ._errors import BatcherClosedError, QueueFullError, RequestTimeoutError
from ._policy import FixedWait
from ._queue import CANCELLED, DONE, QUEUED, RUNNING, TIMED_OUT, Request, RequestQueue
from ._runner import ThreadRunner
from ._stats import BatcherStats

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "Batcher"]

logger = logging.getLogger("batchkit")

InT = TypeVar("InT")
OutT = TypeVar("OutT")

DEFAULT_MAX_QUEUE_SIZE = 10_000
"""Default bound on queued requests: enough for bursts, small enough to shed real overload."""


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _copies(error: BaseException, n: int) -> list[BaseException]:
    """One exception object per caller, so that tracebacks do not pile up on one."""
    errors = [error]
    for _ in range(n - 1):
        try:
            twin = copy.copy(error)
        except Exception:
            twin = error
        if twin is not error:
            twin.__cause__ = error.__cause__
            twin.__context__ = error.__context__
            twin.__suppress_context__ = error.__suppress_context__
            twin.__traceback__ = error.__traceback__
        errors.append(twin)
    return errors


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__qualname__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _check_ms(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of milliseconds, got {type(value).__qualname__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "greater than 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return float(value)


class Batcher(Generic[InT, OutT]):
    """Micro-batches concurrent calls to a model function.

    ``fn`` takes a batch and returns a batch of outputs of the same length, one
    per input, in order. It may be synchronous (it then always runs on a worker
    thread owned by this batcher, never on the event loop) or ``async`` (it is
    awaited on the loop). Callers send single samples::

        batcher = Batcher(model_fn, max_batch_size=64, max_wait_ms=2)
        y = await batcher.predict(x)

    Args:
        fn: the model function, ``batch -> outputs``.
        max_batch_size: the largest batch ``fn`` is given.
        max_wait_ms: the longest the oldest queued request waits for batch-mates
            before its batch is sent anyway. ``0`` sends whatever is queued as
            soon as the worker is free.
        max_queue_size: queued requests beyond this are refused at once with
            ``QueueFullError``, bounding memory under overload.
        timeout_ms: default deadline of each ``predict`` call (``None``: none).
        collate: how inputs become a batch. ``"auto"`` stacks numpy arrays or
            torch tensors of equal shape and dtype on a new first axis (numbers
            become a 1-D array) and splits outputs along that axis; inputs of
            different shapes are batched separately. ``None`` gives ``fn`` a list
            and expects a sequence back. A ``(collate, split)`` pair of callables,
            or an object with ``key``, ``collate`` and ``split`` methods, is used
            as given.
        name: shown in the worker thread's name and in logs.

    The batcher starts on its first ``predict`` (or ``async with``) and is bound
    to that event loop. ``aclose()`` stops it: new calls are refused, every
    accepted request is still answered, then the worker stops.

    Used as a class attribute (for example through ``@batchkit.batch`` on a
    method), each instance gets its own batcher with ``self`` bound.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        timeout_ms: float | None = None,
        collate: CollateArg = "auto",
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__qualname__}")
        self._max_batch_size = _check_positive_int("max_batch_size", max_batch_size)
        self._max_wait_ms = _check_ms("max_wait_ms", max_wait_ms, allow_zero=True)
        self._max_queue_size = _check_positive_int("max_queue_size", max_queue_size)
        self._timeout_ms = None if timeout_ms is None else _check_ms("timeout_ms", timeout_ms, allow_zero=False)
        self._collator = make_collator(collate)
        self._options: dict[str, Any] = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue_size": max_queue_size,
            "timeout_ms": timeout_ms,
            "collate": collate,
        }
        self._fn = fn
        self._is_async = _is_async_callable(fn)
        self._name = name or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self._attribute: str | None = None  # set by __set_name__ when used on a class
        functools.update_wrapper(self, fn, updated=())

        self._key = self._collator.key
        self._policy = FixedWait(self._max_wait_ms / 1000.0)
        self._queue = RequestQueue()
        self._backend: Backend | None = None
        self._closing = False
        self._runner: ThreadRunner | None = None
        self._wakeup: anyio.Event | None = None  # set while the worker sleeps
        self._wake_on_full = False  # True: only a full group should wake it early
        self._runner_idle: anyio.Event | None = None
        self._worker_done: anyio.Event | None = None

        self._n_requests = 0
        self._n_batches = 0
        self._n_completed = 0
        self._n_failed = 0
        self._n_rejected = 0
        self._n_timed_out = 0
        self._n_cancelled = 0
        self._in_flight = 0
        self._batch_sizes: dict[int, int] = {}

    # -- configuration, read-only -------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """The largest batch the model is given."""
        return self._max_batch_size

    @property
    def max_wait_ms(self) -> float:
        """How long the oldest request may wait for batch-mates."""
        return self._max_wait_ms

    @property
    def max_queue_size(self) -> int:
        """How many requests may be queued before new ones are refused."""
        return self._max_queue_size

    @property
    def timeout_ms(self) -> float | None:
        """The default deadline of a ``predict`` call, if any."""
        return self._timeout_ms

    @property
    def fn(self) -> Callable[[Any], Any]:
        """The model function."""
        return self._fn

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` has been called."""
        return self._closing

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("running" if self._backend else "idle")
        return (
            f"<Batcher {self._name} {state} max_batch_size={self._max_batch_size} "
            f"max_wait_ms={self._max_wait_ms:g} pending={self._queue.live}>"
        )

    # -- the hot path -------------------------------------------------------------

    async def predict(self, x: InT, *, timeout_ms: float | None = None) -> OutT:
        """Send one input and wait for its own output.

        Raises:
            QueueFullError: ``max_queue_size`` requests are already queued.
            BatcherClosedError: ``aclose()`` was called.
            RequestTimeoutError: the deadline (``timeout_ms``, or the batcher's
                default) passed first. If the request was still queued, it is
                never sent to the model.
            TypeError: the collator cannot batch ``x`` (only this call fails).
            Exception: whatever ``fn`` raised for this request's batch.

        Cancelling the caller withdraws a queued request (the model never sees
        it); once its batch is running, the batch completes for the others and
        this caller's output is dropped.
        """
        self._n_requests += 1
        if self._closing:
            self._n_rejected += 1
            raise BatcherClosedError(f"batcher {self._name!r} is closed")
        backend = self._backend
        if backend is None or not backend.is_current():
            backend = self._bind()
        queue = self._queue
        if queue.live >= self._max_queue_size:
            self._n_rejected += 1
            raise QueueFullError(
                f"batcher {self._name!r} has {queue.live} requests queued (max_queue_size={self._max_queue_size})"
            )
        try:
            key = self._key(x)
        except BaseException:
            self._n_failed += 1
            raise
        now = backend.time()
        if timeout_ms is None:
            timeout_ms = self._timeout_ms
            deadline = None if timeout_ms is None else now + timeout_ms * 0.001
        else:
            try:
                deadline = now + _check_ms("timeout_ms", timeout_ms, allow_zero=False) * 0.001
            except (TypeError, ValueError):
                self._n_failed += 1
                raise
        request = Request(x, key, now, deadline)
        size = queue.push(request)
        wakeup = self._wakeup
        if wakeup is not None and (size >= self._max_batch_size or not self._wake_on_full):
            self._wakeup = None
            wakeup.set()
        return await backend.wait(request, self)  # type: ignore[no-any-return]

    __call__ = predict

    # -- lifecycle ----------------------------------------------------------------

    def _bind(self) -> Backend:
        if self._backend is not None:
            raise RuntimeError(
                f"batcher {self._name!r} runs on the {self._backend.name} event loop it was started on; "
                "use one Batcher per event loop (or close it before using it on another)"
            )
        backend = current_backend()
        self._backend = backend
        self._worker_done = anyio.Event()
        if not self._is_async:
            self._runner = ThreadRunner(name=f"batchkit-{self._name}")
        backend.spawn_system_task(self._worker)
        logger.debug("batcher %r started on %s", self._name, backend.name)
        return backend

    async def __aenter__(self) -> Batcher[InT, OutT]:
        if self._closing:
            raise BatcherClosedError(f"batcher {self._name!r} is closed")
        if self._backend is None or not self._backend.is_current():
            self._bind()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting requests, answer every accepted one, stop the worker.

        Requests already queued are flushed at once (without waiting out
        ``max_wait_ms``). Returns when the last batch is done and the worker
        thread has exited. Safe to call more than once. If the call itself is
        cancelled, the batcher still finishes draining in the background.
        """
        self._closing = True
        done = self._worker_done
        if self._backend is None or done is None:
            return
        self._wake()
        await done.wait()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    # -- the worker task ----------------------------------------------------------

    async def _worker(self) -> None:
        backend = self._backend
        assert backend is not None
        try:
            while True:
                key, ready, wake_at = self._next_flush(backend.time())
                if ready:
                    batch = self._take(backend, key)
                    if batch:
                        await self._dispatch(backend, batch)
                elif self._closing:
                    break
                else:
                    await self._sleep(wake_at)
        except Exception:  # a bug in batchkit: never take the event loop down with it
            logger.exception("batcher %r: worker crashed; failing its queued requests", self._name)
        finally:
            self._shutdown(backend)

    def _next_flush(self, now: float) -> tuple[Any, bool, float | None]:
        """Pick the group to send now, or say when to look again (None: on a push)."""
        best_key: Any = None
        best_time = math.inf
        wake_at: float | None = None
        for key, head, size in self._queue.oldest():
            due = now if size >= self._max_batch_size or self._closing else self._policy.flush_at(head, size)
            if due <= now:
                if head.enqueued_at < best_time:
                    best_key, best_time = key, head.enqueued_at
            elif wake_at is None or due < wake_at:
                wake_at = due
        return best_key, best_time != math.inf, wake_at

    async def _sleep(self, wake_at: float | None) -> None:
        wakeup = self._wakeup = anyio.Event()
        self._wake_on_full = wake_at is not None
        if wake_at is None:
            await wakeup.wait()
        else:
            with anyio.CancelScope(deadline=wake_at):
                await wakeup.wait()
        self._wakeup = None

    def _take(self, backend: Backend, key: Any) -> list[Request]:
        now = backend.time()
        batch = []
        for request in self._queue.pop(key, self._max_batch_size):
            if request.deadline is not None and request.deadline <= now:
                request.state = TIMED_OUT
                self._n_timed_out += 1
                backend.set_error(request, self._timeout_error(request))
            else:
                request.state = RUNNING
                batch.append(request)
        self._in_flight += len(batch)
        return batch

    async def _dispatch(self, backend: Backend, batch: list[Request]) -> None:
        size = len(batch)
        self._n_batches += 1
        self._batch_sizes[size] = self._batch_sizes.get(size, 0) + 1
        if self._is_async:
            await self._run_batch_async(backend, batch)
            return
        assert self._runner is not None
        idle = self._runner_idle = anyio.Event()
        self._runner.submit(functools.partial(self._run_batch_sync, backend, batch))
        await idle.wait()

    def _run_batch_sync(self, backend: Backend, batch: list[Request]) -> None:
        """Runs on the worker thread; hands the outcome back to the event loop."""
        collator = self._collator
        outputs: Sequence[Any] | None = None
        error: BaseException | None = None
        try:
            outputs = collator.split(self._fn(collator.collate([r.item for r in batch])), len(batch))
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the event loop is gone; so are the callers
            backend.call_soon_threadsafe(self._finish, backend, batch, outputs, error)

    async def _run_batch_async(self, backend: Backend, batch: list[Request]) -> None:
        collator = self._collator
        try:
            output = await self._fn(collator.collate([r.item for r in batch]))
            outputs = collator.split(output, len(batch))
        except Exception as exc:
            self._finish(backend, batch, None, exc)
        except BaseException:  # the worker is cancelled: the event loop is shutting down
            self._finish(backend, batch, None, BatcherClosedError(f"batcher {self._name!r} was shut down"))
            raise
        else:
            self._finish(backend, batch, outputs, None)

    def _finish(
        self,
        backend: Backend,
        batch: list[Request],
        outputs: Sequence[Any] | None,
        error: BaseException | None,
    ) -> None:
        """Answer every caller of a finished batch that still waits (on the loop)."""
        answered = 0
        if outputs is not None:
            set_result = backend.set_result
            for request, output in zip(batch, outputs, strict=False):
                if request.state == RUNNING:
                    request.state = DONE
                    set_result(request, output)
                    answered += 1
            self._n_completed += answered
        else:
            assert error is not None
            waiting = [r for r in batch if r.state == RUNNING]
            for request, err in zip(waiting, _copies(error, len(waiting)), strict=False):
                request.state = DONE
                backend.set_error(request, err)
            answered = len(waiting)
            self._n_failed += answered
        self._in_flight -= answered
        idle = self._runner_idle
        if idle is not None:
            self._runner_idle = None
            idle.set()

    def _shutdown(self, backend: Backend) -> None:
        leftovers = self._queue.pop_all()
        if leftovers:
            logger.warning("batcher %r stopped with %d queued requests; failing them", self._name, len(leftovers))
            error = BatcherClosedError(f"batcher {self._name!r} stopped before this request was sent")
            for request in leftovers:
                request.state = DONE
                backend.set_error(request, error)
            self._n_failed += len(leftovers)
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop(join=self._in_flight == 0)
        done = self._worker_done
        if not self._closing:
            # Killed with its event loop (no aclose): let a later loop start afresh.
            self._backend = None
            self._worker_done = None
        self._wakeup = self._runner_idle = None
        logger.debug("batcher %r stopped", self._name)
        if done is not None:
            done.set()

    # -- callbacks from the backend (on the loop) ---------------------------------

    def _abandon(self, request: Request, state: int) -> None:
        """The caller stopped waiting (cancelled or timed out); never answer it."""
        if request.state == QUEUED:
            self._queue.discard(request)
        elif request.state == RUNNING:
            self._in_flight -= 1
        else:
            return
        request.state = state
        if state == CANCELLED:
            self._n_cancelled += 1
        else:
            self._n_timed_out += 1
        if request.timer is not None:
            request.timer.cancel()

    def _expire(self, request: Request) -> None:
        if request.state <= RUNNING and self._backend is not None:
            self._abandon(request, TIMED_OUT)
            self._backend.set_error(request, self._timeout_error(request))

    def _timeout_error(self, request: Request) -> RequestTimeoutError:
        assert request.deadline is not None
        waited = (request.deadline - request.enqueued_at) * 1000.0
        return RequestTimeoutError(f"batcher {self._name!r}: request timed out after {waited:.6g} ms")

    # -- introspection ------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see ``BatcherStats``)."""
        return BatcherStats(
            requests=self._n_requests,
            batches=self._n_batches,
            completed=self._n_completed,
            failed=self._n_failed,
            rejected=self._n_rejected,
            timed_out=self._n_timed_out,
            cancelled=self._n_cancelled,
            pending=self._queue.live,
            in_flight=self._in_flight,
            batch_sizes=dict(sorted(self._batch_sizes.items())),
        )

    # -- use as a method decorator ------------------------------------------------

    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = name

    def __get__(self, instance: object, owner: type | None = None) -> Batcher[InT, OutT]:
        if instance is None:
            return self
        if self._attribute is None:
            raise TypeError("a Batcher used as a method must be defined in the class body")
        get = getattr(self._fn, "__get__", None)
        fn = get(instance, owner) if get is not None else functools.partial(self._fn, instance)
        bound: Batcher[InT, OutT] = Batcher(fn, name=f"{self._name}@{id(instance):x}", **self._options)
        try:
            vars(instance)[self._attribute] = bound  # later lookups find it without calling __get__
        except TypeError:
            raise TypeError(
                f"{type(instance).__qualname__} has no __dict__ to keep its batcher in; remove __slots__"
            ) from None
        return bound
