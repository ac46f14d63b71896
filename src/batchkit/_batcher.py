"""Batcher: gathers concurrent ``predict`` calls into batches for one model function.

The flow of one request:

```text
predict(x) ──key(x)──▶ RequestQueue ──flush policy──▶ worker task ──▶ runner thread
    ▲                  (group per key)  (full, or oldest       │      collate → fn → split
    │                                    waited max_wait)      │
    └──────────── future resolved on the event loop ◀──────────┘
```

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
import sys
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypedDict, TypeVar

import anyio
import anyio.abc

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

from ._backend import Backend, current_backend
from ._collate import CollateArg, make_collator
from ._errors import BatcherClosedError, ModelTimeoutError, QueueFullError, RequestTimeoutError
from ._execute import Executor, Failed, Outcome
from ._padding import PadSequences
from ._policy import AdaptiveWait, ArrivalRate, CostModel, FixedWait, FlushPolicy
from ._queue import CANCELLED, DONE, QUEUED, RUNNING, TIMED_OUT, Request, RequestQueue
from ._runner import Slot, ThreadRunner
from ._stats import BatcherStats, LatencyWindow

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "Batcher"]

logger = logging.getLogger("batchkit")

InT = TypeVar("InT")
OutT = TypeVar("OutT")

DEFAULT_MAX_QUEUE_SIZE = 10_000
"""Default bound on queued requests: enough for bursts, small enough to shed real overload."""


class ModuleBatcherOptions(TypedDict, total=False):
    """The ``Batcher`` options that ``Batcher.from_module`` passes on (it sets the slots itself)."""

    max_batch_size: int
    max_wait_ms: float | Literal["auto"]
    max_queue_size: int
    timeout_ms: float | None
    collate: CollateArg
    on_error: Literal["raise", "isolate"]
    run_timeout_ms: float | None
    allowed_batch_sizes: Sequence[int] | None
    max_latency_ms: float | None
    batch_cost: Callable[[Any], float] | None
    max_batch_cost: float | None
    priority_aging_ms: float
    name: str | None


class BatcherOptions(ModuleBatcherOptions, total=False):
    """The keyword options of ``Batcher`` (see its docstring), for APIs that pass them on."""

    replicas: int
    max_concurrent_batches: int


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


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _check_allowed_sizes(sizes: Sequence[int]) -> list[int]:
    checked = sorted({_check_positive_int("allowed_batch_sizes", size) for size in sizes})
    if not checked:
        raise ValueError("allowed_batch_sizes must name at least one size")
    return checked


def _check_priority(priority: object) -> float:
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        raise TypeError(f"priority must be a number, got {type(priority).__qualname__}")
    if not math.isfinite(priority):
        raise ValueError(f"priority must be finite, got {priority}")
    return float(priority)


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
    awaited on the loop). Callers send single samples:

    ```python
    batcher = Batcher(model_fn, max_batch_size=64, max_wait_ms=2)
    y = await batcher.predict(x)
    ```

    Args:
        fn: the model function, ``batch -> outputs``.
        max_batch_size: the largest batch ``fn`` is given.
        max_wait_ms: the longest the oldest queued request waits for batch-mates
            before its batch is sent anyway. ``0`` sends whatever is queued as
            soon as the worker is free. ``"auto"`` learns the model's cost per
            batch and the arrival rate, and waits only while that pays off.
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
        on_error: ``"isolate"`` bisects a batch whose model call raised, so that
            only the inputs that fail on their own get the error.
        run_timeout_ms: a batch running longer fails with ``ModelTimeoutError``
            (a synchronous model's thread is replaced, an async one cancelled).
        allowed_batch_sizes: pad every batch up to the next of these sizes
            (static shapes for compiled models); padded outputs are dropped.
        replicas: worker threads running a synchronous ``fn`` side by side.
        max_concurrent_batches: batches an async ``fn`` may run at once.
        max_latency_ms: with ``max_wait_ms="auto"``, a budget the adaptive wait
            keeps to (from a request's arrival to its batch's expected end).
        batch_cost: the cost of one input (say, its number of tokens); with
            ``max_batch_cost``, a batch stops growing before its cost would
            exceed it. With ``pad_sequences()`` a batch costs its size times its
            largest input's cost, as padding makes it.
        max_batch_cost: the cost budget of one batch.
        priority_aging_ms: how much waiting one level of ``priority`` is worth
            (see ``predict``).
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
        max_wait_ms: float | Literal["auto"] = 2.0,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        timeout_ms: float | None = None,
        collate: CollateArg = "auto",
        on_error: Literal["raise", "isolate"] = "raise",
        run_timeout_ms: float | None = None,
        allowed_batch_sizes: Sequence[int] | None = None,
        replicas: int = 1,
        max_concurrent_batches: int = 1,
        max_latency_ms: float | None = None,
        batch_cost: Callable[[Any], float] | None = None,
        max_batch_cost: float | None = None,
        priority_aging_ms: float = 1000.0,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__qualname__}")
        if batch_cost is not None and not callable(batch_cost):
            raise TypeError("batch_cost must be a callable: input -> cost")
        if (batch_cost is None) != (max_batch_cost is None):
            raise ValueError("batch_cost and max_batch_cost go together")
        self._batch_cost = batch_cost
        self._priority_aging = _check_ms("priority_aging_ms", priority_aging_ms, allow_zero=True) / 1000
        self._max_latency = (
            None if max_latency_ms is None else _check_ms("max_latency_ms", max_latency_ms, allow_zero=False) / 1000
        )
        self._run_timeout = (
            None if run_timeout_ms is None else _check_ms("run_timeout_ms", run_timeout_ms, allow_zero=False) / 1000
        )
        if on_error not in ("raise", "isolate"):
            raise ValueError(f"on_error must be 'raise' or 'isolate', got {on_error!r}")
        self._is_async = _is_async_callable(fn)
        _check_positive_int("replicas", replicas)
        _check_positive_int("max_concurrent_batches", max_concurrent_batches)
        if self._is_async and replicas != 1:
            raise ValueError("replicas is for synchronous models; an async model takes max_concurrent_batches")
        if not self._is_async and max_concurrent_batches != 1:
            raise ValueError("max_concurrent_batches is for async models; a synchronous model takes replicas")
        self._allowed = None if allowed_batch_sizes is None else _check_allowed_sizes(allowed_batch_sizes)
        self._collator = make_collator(collate)
        self._padded_cost = isinstance(self._collator, PadSequences)
        self._executor = Executor(self._collator, isolate=on_error == "isolate", allowed_sizes=self._allowed)
        self._options: dict[str, Any] = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue_size": max_queue_size,
            "timeout_ms": timeout_ms,
            "collate": collate,
            "on_error": on_error,
            "run_timeout_ms": run_timeout_ms,
            "allowed_batch_sizes": allowed_batch_sizes,
            "replicas": replicas,
            "max_concurrent_batches": max_concurrent_batches,
            "max_latency_ms": max_latency_ms,
            "batch_cost": batch_cost,
            "max_batch_cost": max_batch_cost,
            "priority_aging_ms": priority_aging_ms,
        }
        self._fn = fn
        self._replica_fns: list[Callable[[Any], Any]] = [fn] * (max_concurrent_batches if self._is_async else replicas)
        self._name = name or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self._attribute: str | None = None  # set by __set_name__ when used on a class
        functools.update_wrapper(self, fn, updated=())

        self._key = self._collator.key
        self._cost_model = CostModel()
        self._arrivals = ArrivalRate()
        self._oom_cap: int | None = None  # the largest size that fit after an out-of-memory error
        self._max_batch_size = 0
        self._max_wait_ms: float | Literal["auto"] = 0.0
        self._max_queue_size = 0
        self._timeout_ms: float | None = None
        self._max_batch_cost: float | None = None
        self._limit = 0  # the largest batch to form now
        self._slack = 0.0  # how soon a request without a deadline counts as due
        self._policy: FlushPolicy = FixedWait(0.0)
        self._apply_settings(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue_size=max_queue_size,
            timeout_ms=timeout_ms,
            max_batch_cost=max_batch_cost,
        )
        self._queue = RequestQueue()
        self._backend: Backend | None = None
        self._closing = False
        self._slots: list[Slot] = []
        self._idle: list[Slot] = []
        self._wakeup: anyio.Event | None = None  # set while the worker sleeps
        self._wake_threshold: float = 1  # a push wakes the worker when its group reaches this size
        self._task_group: anyio.abc.TaskGroup | None = None
        self._worker_done: anyio.Event | None = None

        self._n_requests = 0
        self._n_batches = 0
        self._n_completed = 0
        self._n_failed = 0
        self._n_rejected = 0
        self._n_timed_out = 0
        self._n_cancelled = 0
        self._n_oom_splits = 0
        self._n_hung = 0
        self._in_flight = 0
        self._batch_sizes: dict[int, int] = {}
        self._queue_wait = LatencyWindow()
        self._run_time = LatencyWindow()
        self._latency = LatencyWindow()

    @classmethod
    def from_module(
        cls,
        module: Any,
        *,
        device: Any = None,
        dtype: Any = None,
        outputs_on: Literal["cpu", "device"] = "cpu",
        replicas: int | Sequence[Any] = 1,
        pipeline_depth: int | None = None,
        **batcher_options: Unpack[ModuleBatcherOptions],
    ) -> Batcher[Any, Any]:
        """Serve a ``torch.nn.Module``: ``await batcher.predict(x)`` runs ``module(batch)``.

        ```python
        batcher = Batcher.from_module(model, max_batch_size=64)   # CUDA if present
        logits = await batcher.predict(torch.randn(3, 224, 224))
        ```

        The module runs in eval mode under ``torch.inference_mode()`` on its
        worker thread(s). Inputs (tensors, arrays, numbers, or dicts / tuples /
        dataclasses of them) are moved to the device, floating ones cast to the
        module's dtype; a dict batch is passed as keyword arguments, a tuple as
        positional arguments. On CUDA each worker has its own stream, inputs are
        staged in pinned memory and copied asynchronously, and two workers per
        replica overlap one batch's copies with the other's compute. A batch that
        runs out of GPU memory is halved and retried (see ``stats().oom_splits``).

        Args:
            module: the model. A module on the CPU is moved to ``device``.
            device: where to run; ``None`` keeps an accelerator-resident module
                where it is, else picks CUDA when available, else the CPU. A
                module already on another accelerator is an error, not a copy.
            dtype: the floating dtype inputs are cast to; must match the module's
                parameters (default: theirs).
            outputs_on: ``"cpu"`` (default) copies each result back to the host;
                ``"device"`` leaves it on the device.
            replicas: how many copies of the module to run side by side, or a
                list of devices, one copy on each.
            pipeline_depth: worker threads (and streams) per replica; default 2
                on CUDA, 1 on the CPU.
            **batcher_options: any ``Batcher`` option (``max_batch_size``, ...).

        Raises:
            ValueError: the module's device or dtype does not match the request.
        """
        from ._torch import from_module

        return from_module(
            module,
            device=device,
            dtype=dtype,
            outputs_on=outputs_on,
            replicas=replicas,
            pipeline_depth=pipeline_depth,
            **batcher_options,
        )

    # -- configuration, read-only -------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """The largest batch the model is given."""
        return self._max_batch_size

    @property
    def max_wait_ms(self) -> float | Literal["auto"]:
        """How long the oldest request may wait for batch-mates (or ``"auto"``)."""
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

    @property
    def name(self) -> str:
        """The name given, or the model function's qualified name (logs, thread names, metrics)."""
        return self._name

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("running" if self._backend else "idle")
        return (
            f"<Batcher {self._name} {state} max_batch_size={self._max_batch_size} "
            f"max_wait_ms={self._max_wait_ms} pending={self._queue.live}>"
        )

    # -- live reconfiguration -----------------------------------------------------

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | Literal["auto"] | None = None,
        max_queue_size: int | None = None,
        timeout_ms: float | Literal[False] | None = False,
        max_batch_cost: float | None = None,
    ) -> None:
        """Change settings while serving; options left out keep their value.

        Safe under load: it runs on the event loop like everything else, takes
        effect from the next batch on, and wakes the worker so that a batch that
        a smaller ``max_batch_size`` or wait now makes due goes at once. A lower
        ``max_queue_size`` does not drop requests already queued. Pass
        ``timeout_ms=None`` to remove the default deadline (it applies to new
        requests only).
        """
        self._apply_settings(
            max_batch_size=self._max_batch_size if max_batch_size is None else max_batch_size,
            max_wait_ms=self._max_wait_ms if max_wait_ms is None else max_wait_ms,
            max_queue_size=self._max_queue_size if max_queue_size is None else max_queue_size,
            timeout_ms=self._timeout_ms if timeout_ms is False else timeout_ms,
            max_batch_cost=self._max_batch_cost if max_batch_cost is None else max_batch_cost,
        )
        logger.info("batcher %r reconfigured: %r", self._name, self)
        self._wake()

    def _apply_settings(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float | Literal["auto"],
        max_queue_size: int,
        timeout_ms: float | None,
        max_batch_cost: float | None,
    ) -> None:
        max_batch_size = _check_positive_int("max_batch_size", max_batch_size)
        if max_wait_ms == "auto":
            policy: FlushPolicy = AdaptiveWait(self._cost_model, self._arrivals, self._max_latency)
        else:
            policy = FixedWait(_check_ms("max_wait_ms", max_wait_ms, allow_zero=True) / 1000)
        max_queue_size = _check_positive_int("max_queue_size", max_queue_size)
        if timeout_ms is not None:
            timeout_ms = _check_ms("timeout_ms", timeout_ms, allow_zero=False)
        if max_batch_cost is not None:
            if self._batch_cost is None:
                raise ValueError("max_batch_cost needs a batch_cost function")
            max_batch_cost = _check_ms("max_batch_cost", max_batch_cost, allow_zero=False)
        limit = self._limit_for(max_batch_size)  # may refuse, so before anything is applied
        self._max_batch_size = max_batch_size
        self._max_wait_ms = max_wait_ms if max_wait_ms == "auto" else float(max_wait_ms)
        self._policy = policy
        self._max_queue_size = max_queue_size
        self._timeout_ms = timeout_ms
        self._slack = 10.0 if timeout_ms is None else timeout_ms / 1000
        self._max_batch_cost = max_batch_cost
        self._limit = limit

    def _limit_for(self, max_batch_size: int) -> int:
        """The largest batch to form under ``max_batch_size``, allowed sizes and the OOM cap."""
        limit = max_batch_size
        if self._allowed:
            # Padding goes up to the next allowed size: form batches no larger than the
            # largest allowed size that still fits max_batch_size, padding included.
            fitting = [size for size in self._allowed if size <= limit]
            if not fitting:
                raise ValueError(f"allowed_batch_sizes {tuple(self._allowed)} has no size <= max_batch_size={limit}")
            limit = fitting[-1]
        if self._oom_cap is not None:
            limit = min(limit, self._oom_cap)
        return limit

    # -- the hot path -------------------------------------------------------------

    async def predict(self, x: InT, *, timeout_ms: float | None = None, priority: float = 0) -> OutT:
        """Send one input and wait for its own output.

        ``timeout_ms`` overrides the batcher's default deadline for this call.
        A higher ``priority`` goes into a batch ahead of lower ones; each level
        is worth ``priority_aging_ms`` of waiting, so a low-priority request
        that has waited long enough still goes first (nothing starves). Among
        equal priorities the earliest deadline goes first.

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
            try:
                backend = self._bind()
            except BaseException:
                self._n_rejected += 1
                raise
        queue = self._queue
        if queue.live >= self._max_queue_size:
            self._n_rejected += 1
            raise QueueFullError(
                f"batcher {self._name!r} has {queue.live} requests queued (max_queue_size={self._max_queue_size})"
            )
        now = backend.time()
        plain = timeout_ms is None and not priority
        try:
            key = self._key(x)
            if plain and self._batch_cost is None:  # the common case, kept short
                timeout = self._timeout_ms
                request = Request(x, key, now, None if timeout is None else now + timeout * 0.001, now + self._slack)
            else:
                request = self._special_request(x, key, now, timeout_ms, priority)
        except BaseException:
            self._n_failed += 1
            raise
        group = queue.push(request, plain)
        wakeup = self._wakeup
        if wakeup is not None and (
            group.live >= self._wake_threshold
            or (self._max_batch_cost is not None and group.cost >= self._max_batch_cost)
        ):
            self._wakeup = None
            wakeup.set()
        return await backend.wait(request, self)  # type: ignore[no-any-return]

    __call__ = predict

    def _special_request(self, x: Any, key: Any, now: float, timeout_ms: float | None, priority: float) -> Request:
        """A request with its own timeout or priority, or a cost."""
        cost = 1.0 if self._batch_cost is None else float(self._batch_cost(x))
        deadline = self._deadline(now, timeout_ms)
        due = now + self._slack if deadline is None else deadline
        return Request(x, key, now, deadline, due - _check_priority(priority) * self._priority_aging, cost)

    def _deadline(self, now: float, timeout_ms: float | None) -> float | None:
        if timeout_ms is None:
            timeout_ms = self._timeout_ms
            return None if timeout_ms is None else now + timeout_ms * 0.001
        return now + _check_ms("timeout_ms", timeout_ms, allow_zero=False) * 0.001

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
        self._slots = [self._new_slot(i, fn) for i, fn in enumerate(self._replica_fns)]
        self._idle = list(reversed(self._slots))  # pop() hands out slot 0 first
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

    # -- the worker task ----------------------------------------------------------

    def _new_slot(self, index: int, fn: Callable[[Any], Any]) -> Slot:
        runner = None if self._is_async else ThreadRunner(name=f"batchkit-{self._name}-{index}")
        return Slot(index, fn, runner)

    async def _worker(self) -> None:
        backend = self._backend
        assert backend is not None
        try:
            async with anyio.create_task_group() as task_group:  # runs async models' batches
                self._task_group = task_group
                await self._serve(backend)
        except Exception:  # a bug in batchkit: never take the event loop down with it
            logger.exception("batcher %r: worker crashed; failing its queued requests", self._name)
        finally:
            self._shutdown(backend)

    async def _serve(self, backend: Backend) -> None:
        while True:
            now = backend.time()
            self._arrivals.observe(self._n_requests, now)
            if self._run_timeout is not None:
                self._abandon_hung_slots(backend, now)
            wake_at: float | None = None
            threshold = math.inf  # all slots busy: only a finished batch wakes us
            if self._idle:
                key, ready, wake_at = self._next_flush(now)
                if ready:
                    batch = self._take(backend, key, now)
                    if batch:
                        self._start(backend, self._idle.pop(), batch)
                    continue
                if self._closing and len(self._idle) == len(self._slots):
                    return
                if not self._closing:
                    threshold = 1 if wake_at is None else self._limit
            if self._run_timeout is not None:
                wake_at = _earliest(wake_at, *(s.deadline for s in self._slots if s.batch is not None))
            await self._sleep(wake_at, threshold)

    def _next_flush(self, now: float) -> tuple[Any, bool, float | None]:
        """Pick the group to send now, or say when to look again (None: on a push)."""
        best_key: Any = None
        best_time = math.inf
        wake_at: float | None = None
        max_cost = self._max_batch_cost
        for key, head, group in self._queue.oldest():
            full = group.live >= self._limit or (max_cost is not None and group.cost >= max_cost)
            due = now if full or self._closing else self._policy.flush_at(head, group.live, self._limit)
            if due <= now:
                if head.enqueued_at < best_time:
                    best_key, best_time = key, head.enqueued_at
            elif wake_at is None or due < wake_at:
                wake_at = due
        return best_key, best_time != math.inf, wake_at

    async def _sleep(self, wake_at: float | None, threshold: float) -> None:
        wakeup = self._wakeup = anyio.Event()
        self._wake_threshold = threshold
        if wake_at is None:
            await wakeup.wait()
        else:
            with anyio.CancelScope(deadline=wake_at):
                await wakeup.wait()
        self._wakeup = None

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _take(self, backend: Backend, key: Any, now: float) -> list[Request]:
        batch = []
        waits = []
        # A request that cannot finish by its deadline (less time left than the
        # fastest recent batch took) fails now instead of wasting a batch slot.
        horizon = now + self._cost_model.fastest_recent()
        for request in self._queue.pop(key, self._limit, self._max_batch_cost, self._padded_cost):
            if request.deadline is not None and request.deadline <= horizon:
                request.state = TIMED_OUT
                self._n_timed_out += 1
                backend.set_error(request, self._timeout_error(request, early=request.deadline > now))
            else:
                request.state = RUNNING
                batch.append(request)
                waits.append(now - request.enqueued_at)
        self._queue_wait.extend(waits)
        self._in_flight += len(batch)
        return batch

    def _start(self, backend: Backend, slot: Slot, batch: list[Request]) -> None:
        size = len(batch)
        self._n_batches += 1
        self._batch_sizes[size] = self._batch_sizes.get(size, 0) + 1
        slot.batch = batch
        if self._is_async:
            assert self._task_group is not None
            self._task_group.start_soon(self._run_async, backend, slot, batch)
            return
        if self._run_timeout is not None:
            slot.deadline = backend.time() + self._run_timeout
        assert slot.runner is not None
        slot.runner.submit(functools.partial(self._run_sync, backend, slot, slot.generation, batch))

    def _run_sync(self, backend: Backend, slot: Slot, generation: int, batch: list[Request]) -> None:
        """Runs on the slot's thread; hands the outcome back to the event loop."""
        outcome = self._executor.run(slot.fn, [r.item for r in batch])
        with contextlib.suppress(RuntimeError):  # the event loop is gone; so are the callers
            backend.call_soon_threadsafe(self._finish, backend, slot, generation, batch, outcome)

    async def _run_async(self, backend: Backend, slot: Slot, batch: list[Request]) -> None:
        outcome: Outcome | None = None
        try:
            with anyio.move_on_after(self._run_timeout):
                outcome = await self._executor.run_async(slot.fn, [r.item for r in batch])
        except BaseException:  # the worker is cancelled: the event loop is shutting down
            closed = BatcherClosedError(f"batcher {self._name!r} was shut down")
            self._finish(backend, slot, slot.generation, batch, Outcome(closed))
            raise
        if outcome is None:
            self._n_hung += 1
            outcome = Outcome(self._hung_error())
        self._finish(backend, slot, slot.generation, batch, outcome)

    def _finish(self, backend: Backend, slot: Slot, generation: int, batch: list[Request], outcome: Outcome) -> None:
        """A batch is done (on the loop): free its slot, then answer its callers."""
        if slot.generation != generation:
            return  # a hung run we gave up on: its callers were answered then
        self._free(slot)
        self._run_time.add(outcome.seconds)
        if outcome.fit is not None:
            self._n_oom_splits += outcome.splits
            if outcome.fit < self._limit:
                logger.warning("batcher %r: out of memory; batches capped at %d", self._name, outcome.fit)
                self._oom_cap = max(1, outcome.fit)
                self._limit = self._limit_for(self._max_batch_size)
        elif outcome.error is None:
            self._cost_model.observe(len(batch), outcome.seconds)
        self._answer(backend, batch, outcome)

    def _free(self, slot: Slot) -> None:
        slot.batch = slot.deadline = None
        self._idle.append(slot)
        self._wake()

    def _answer(self, backend: Backend, batch: list[Request], outcome: Outcome) -> None:
        """Answer every caller of ``batch`` that still waits, exactly once."""
        waiting = [r for r in batch if r.state == RUNNING]
        if not waiting:
            return
        now = backend.time()
        self._latency.extend([now - r.enqueued_at for r in waiting])
        self._in_flight -= len(waiting)
        if outcome.outputs is None:
            assert outcome.error is not None
            for request, error in zip(waiting, _copies(outcome.error, len(waiting)), strict=True):
                request.state = DONE
                backend.set_error(request, error)
            self._n_failed += len(waiting)
            return
        answered: list[Request] = []
        values: list[Any] = []
        for request, output in zip(batch, outcome.outputs, strict=True):
            if request.state != RUNNING:
                continue
            request.state = DONE
            if type(output) is Failed:
                backend.set_error(request, output.error)
            else:
                answered.append(request)
                values.append(output)
        backend.set_results(answered, values)
        self._n_completed += len(answered)
        self._n_failed += len(waiting) - len(answered)

    def _abandon_hung_slots(self, backend: Backend, now: float) -> None:
        """Give up on synchronous runs past run_timeout_ms: fail them, replace their threads."""
        for slot in self._slots:
            batch = slot.batch
            if batch is None or slot.deadline is None or slot.deadline > now:
                continue
            self._n_hung += 1
            logger.warning(
                "batcher %r: a batch of %d ran past run_timeout_ms; abandoning its thread", self._name, len(batch)
            )
            assert slot.runner is not None
            slot.runner.stop(join=False)  # it exits when the hung call returns
            slot.runner = ThreadRunner(name=f"batchkit-{self._name}-{slot.index}")
            slot.generation += 1  # the hung run's late _finish is ignored
            self._free(slot)
            self._answer(backend, batch, Outcome(self._hung_error()))

    def _hung_error(self) -> ModelTimeoutError:
        assert self._run_timeout is not None
        return ModelTimeoutError(
            f"batcher {self._name!r}: the model ran longer than run_timeout_ms={self._run_timeout * 1000:g}"
        )

    def _shutdown(self, backend: Backend) -> None:
        self._task_group = None
        leftovers = self._queue.pop_all()
        if leftovers:
            logger.warning("batcher %r stopped with %d queued requests; failing them", self._name, len(leftovers))
            error = BatcherClosedError(f"batcher {self._name!r} stopped before this request was sent")
            for request in leftovers:
                request.state = DONE
                backend.set_error(request, error)
            self._n_failed += len(leftovers)
        for slot in self._slots:
            if slot.runner is not None:
                slot.runner.stop(join=slot.batch is None)
        self._slots, self._idle = [], []
        done = self._worker_done
        if not self._closing:
            # Killed with its event loop (no aclose): let a later loop start afresh.
            self._backend = None
            self._worker_done = None
        self._wakeup = None
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

    def _timeout_error(self, request: Request, *, early: bool = False) -> RequestTimeoutError:
        assert request.deadline is not None
        timeout = (request.deadline - request.enqueued_at) * 1000.0
        if early:
            return RequestTimeoutError(
                f"batcher {self._name!r}: request cannot finish within its {timeout:.6g} ms timeout "
                f"(recent batches took at least {self._cost_model.fastest_recent() * 1000:.3g} ms); not sent"
            )
        return RequestTimeoutError(f"batcher {self._name!r}: request timed out after {timeout:.6g} ms")

    # -- introspection ------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see ``BatcherStats``).

        Safe to call from any thread (a metrics scraper, say): it only copies.
        """
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
            batch_sizes=dict(sorted(self._batch_sizes.copy().items())),
            queue_wait_ms=self._queue_wait.summary(),
            run_time_ms=self._run_time.summary(),
            latency_ms=self._latency.summary(),
            oom_splits=self._n_oom_splits,
            batch_size_limit=self._limit,
            hung_batches=self._n_hung,
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
