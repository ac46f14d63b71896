"""Batcher: the facade over settings, scheduler, worker and backend.

```text
predict(x) ─▶ Scheduler.submit ─▶ RequestQueue ─▶ Scheduler.take ─▶ Worker ─▶ slot thread
    ▲            (settings,         (groups by      (flush policy,    │      collate → fn → split
    │             key, bound)        key, urgency)   deadlines)       │        (Executor)
    └──── Backend.wait ◀──── Scheduler.finish (answers) ◀─────────────┘
```

``Batcher`` itself holds no request state: it validates options into
``Settings``, binds a ``Worker`` to the running event loop (lazily, or inside
``async with``), and passes calls on. See docs/design.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import logging
import sys
import weakref
from collections.abc import AsyncGenerator, Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.abc

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

from ._backend import Backend, current_backend
from ._collate import CollateArg, make_collator
from ._dedup_scheduler import DedupScheduler
from ._errors import BatcherClosedError
from ._execute import Executor
from ._extras import require
from ._padding import PadSequences
from ._runner import Replicas
from ._scheduler import Scheduler
from ._settings import DEFAULT_MAX_QUEUE_SIZE, BatcherOptions, ModuleBatcherOptions, Settings
from ._shared import SharedExecutor
from ._stats import BatcherStats
from ._stream import Channel
from ._threads import ThreadFuture
from ._worker import BoundWorker, Worker

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "Batcher", "BatcherOptions", "ModuleBatcherOptions"]

logger = logging.getLogger("batchkit")

InT = TypeVar("InT")
OutT = TypeVar("OutT")


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _unwrap_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004


def _is_generator_callable(fn: Callable[..., Any]) -> bool:
    call = _unwrap_call(fn)
    return inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)


def _is_async_generator_callable(fn: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(_unwrap_call(fn))


def _weak_method(function: Callable[..., Any], instance: object, is_async: bool) -> Callable[[Any], Any]:
    """``function`` bound to ``instance`` without keeping it alive (its batcher must not)."""
    ref = weakref.ref(instance)
    name = getattr(function, "__qualname__", "method")

    def target() -> object:
        obj = ref()
        if obj is None:
            raise ReferenceError(f"the instance whose {name} this batcher served has been collected")
        return obj

    if inspect.isasyncgenfunction(function):

        async def bound_async_steps(batch: Any) -> Any:
            async for items in function(target(), batch):
                yield items

        return bound_async_steps
    if inspect.isgeneratorfunction(function):

        def bound_steps(batch: Any) -> Any:
            yield from function(target(), batch)

        return bound_steps
    if is_async:

        async def bound_async(batch: Any) -> Any:
            return await function(target(), batch)

        return bound_async

    def bound(batch: Any) -> Any:
        return function(target(), batch)

    return bound


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
            soon as the worker is free. ``"auto"`` sends a batch as soon as a
            slot is free, and with several slots spaces batches by the learned
            run time over the slots (see docs/scheduling.md).
        max_queue_size: queued requests beyond this are refused at once with
            ``QueueFullError``, bounding memory under overload.
        timeout_ms: default deadline of each ``predict`` call (``None``: none).
            A request that cannot make its deadline fails with
            ``RequestTimeoutError`` as early as that is known: at once when the
            work queued ahead of it says so, or when its batch forms.
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
            (an async model is cancelled). A synchronous call cannot be
            interrupted: its slot stays blocked until the call returns, so the
            model is never called twice at once (``stats().blocked_slots``; the
            batcher serves on with its other slots, if any).
        replace_hung: with ``run_timeout_ms``, give a slot whose synchronous
            run was given up on a fresh thread at once instead (only for models
            that are safe to call while a previous call still runs).
        allowed_batch_sizes: pad every batch up to the next of these sizes
            (static shapes for compiled models); padded outputs are dropped.
        replicas: worker threads running a synchronous ``fn`` side by side.
            ``"auto"``: up to 8, as many as raise throughput (for a model that
            releases the GIL or waits on I/O); ``stats().concurrency_limit``
            shows the number in use.
        max_concurrent_batches: batches an async ``fn`` may run at once;
            ``"auto"``: up to 16, as many as raise throughput (a model that
            awaits a remote call).
        max_latency_ms: with ``max_wait_ms="auto"``, a budget the adaptive wait
            keeps to (from a request's arrival to its batch's expected end).
        batch_cost: the cost of one input (say, its number of tokens); with
            ``max_batch_cost``, a batch stops growing before its cost would
            exceed it. With ``pad_sequences()`` a batch costs its size times its
            largest input's cost, as padding makes it.
        max_batch_cost: the cost budget of one batch.
        priority_aging_ms: how much waiting one level of ``priority`` is worth
            (see ``predict``).
        batch_key: ``input -> hashable key``: requests with different keys
            never share a batch (an adapter, a tenant, generation parameters),
            and ``fn`` reads its batch's key with ``batchkit.current_batch_key()``.
            Groups take turns: the due group whose oldest request is oldest goes
            first, so no key starves another.
        executor: a ``SharedExecutor`` shared with the other batchers of one
            device: at most its ``max_concurrent_batches`` batches of all of
            them run at once, taken in fair turns (see ``SharedExecutor``).
        weight: this batcher's share of the shared executor's time, relative
            to the other batchers' (2: twice the device time when both are
            saturated).
        dedup_key: ``input -> hashable key``: requests with equal keys that
            are queued or running at the same time are computed once, and each
            caller gets its own copy of the result (or of the error). A caller
            that joins another's computation is never queued; it keeps its own
            deadline and may cancel without affecting the others.
        cache_size: with ``dedup_key``, keep the results of this many keys
            (least recently used out first): a request whose key is cached is
            answered at once, with its own copy (``stats().cache_hits``).
            ``clear_cache()`` empties it (after the model changed, say).
        stream_buffer: for a generator ``fn``, the items buffered for one
            ``stream()`` reader; one that falls that far behind is cut off with
            ``StreamBufferFullError`` (the other rows never wait for it).
        name: shown in the worker thread's name and in logs.

    ``async with batcher:`` runs its worker inside the caller's task group and
    closes it on exit; a first ``predict`` outside one starts the worker as a
    system task instead (a convenience for scripts and module-level batchers).
    Either way the batcher is bound to that event loop; if the loop ends without
    ``aclose()``, the batcher starts afresh on the next one. ``aclose()`` stops
    it: new calls are refused, every accepted request is still answered, then
    the worker and its threads stop.

    Used as a class attribute (for example through ``@batchkit.batch`` on a
    method, ``__call__`` included), each instance gets its own batcher with
    ``self`` bound, created on first use and closed when the instance is
    collected; ``configure()`` on the class attribute applies to all of them.
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
        replicas: int | Literal["auto"] = 1,
        max_concurrent_batches: int | Literal["auto"] = 1,
        max_latency_ms: float | None = None,
        batch_cost: Callable[[Any], float] | None = None,
        max_batch_cost: float | None = None,
        priority_aging_ms: float = 1000.0,
        stream_buffer: int = 1024,
        replace_hung: bool = False,
        batch_key: Callable[[Any], Hashable] | None = None,
        executor: SharedExecutor | None = None,
        weight: float = 1.0,
        dedup_key: Callable[[Any], Hashable] | None = None,
        cache_size: int = 0,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__qualname__}")
        if isinstance(fn, Replicas):
            replicas = len(fn.fns)
        first = fn.fns[0] if isinstance(fn, Replicas) else fn
        self._streams = _is_generator_callable(first)  # each yield: one item per request
        self._is_async = _is_async_callable(first) or _is_async_generator_callable(first)
        options: dict[str, Any] = {
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue_size": max_queue_size,
            "timeout_ms": timeout_ms,
            "on_error": on_error,
            "run_timeout_ms": run_timeout_ms,
            "allowed_batch_sizes": allowed_batch_sizes,
            "replicas": replicas,
            "max_concurrent_batches": max_concurrent_batches,
            "max_latency_ms": max_latency_ms,
            "batch_cost": batch_cost,
            "max_batch_cost": max_batch_cost,
            "priority_aging_ms": priority_aging_ms,
            "stream_buffer": stream_buffer,
            "replace_hung": replace_hung,
            "batch_key": batch_key,
            "executor": executor,
            "weight": weight,
            "dedup_key": dedup_key,
            "cache_size": cache_size,
        }
        settings = Settings.build(is_async=self._is_async, streams=self._streams, **options)
        collator = make_collator(collate)
        self._options: dict[str, Any] = {**options, "collate": collate}  # for the batchers of instances
        self._fn = fn
        if isinstance(fn, Replicas):
            self._slot_fns = list(fn.fns)
        else:
            self._slot_fns = [fn] * settings.slots
        self._name = name or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self._executor = Executor(collator, isolate=on_error == "isolate", allowed_sizes=settings.allowed_batch_sizes)
        scheduler_type = Scheduler if dedup_key is None else DedupScheduler
        self._scheduler = scheduler_type(
            settings, collator.key, padded_cost=isinstance(collator, PadSequences), name=self._name
        )
        self._dedup = self._scheduler if isinstance(self._scheduler, DedupScheduler) else None
        self._worker: BoundWorker | None = None
        self._entries: list[tuple[int, anyio.abc.TaskGroup | None]] = []  # `async with` blocks: (task, group)
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._instance: object = None  # an instance's batcher holds it (see __get__)
        self._instance_key = f"__batchkit_{id(self):x}"  # where an instance keeps its own batcher
        self._instances: weakref.WeakSet[Batcher[InT, OutT]] = weakref.WeakSet()
        functools.update_wrapper(self, fn, updated=())

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
        positional arguments. On CUDA each copy of the module has its own thread
        and stream: the batch is built on, or awaited by, that stream, and read
        back only once its work is done. Results are ordinary tensors that own
        their memory (numpy in, numpy out). A batch that runs out of GPU memory
        is halved and retried (see ``stats().oom_splits``).

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
            pipeline_depth: copies of the module per device, each with its own
                thread and stream, so that one copy's transfers overlap another's
                compute (default 1: one copy, never run from two threads).
            **batcher_options: any ``Batcher`` option (``max_batch_size``, ...).

        Raises:
            ValueError: the module's device or dtype does not match the request.
        """
        require("torch", "torch", "Batcher.from_module")
        from ._torch import module_replicas

        fns = module_replicas(
            module,
            device=device,
            dtype=dtype,
            outputs_on=outputs_on,
            replicas=replicas,
            pipeline_depth=pipeline_depth,
        )
        batcher_options.setdefault("name", type(module).__qualname__)
        return cls(fns, **batcher_options)

    # -- configuration, read-only -------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """The largest batch the model is given."""
        return self._scheduler.settings.max_batch_size

    @property
    def max_wait_ms(self) -> float | Literal["auto"]:
        """How long the oldest request may wait for batch-mates (or ``"auto"``)."""
        return self._scheduler.settings.max_wait_ms

    @property
    def max_queue_size(self) -> int:
        """How many requests may be queued before new ones are refused."""
        return self._scheduler.settings.max_queue_size

    @property
    def timeout_ms(self) -> float | None:
        """The default deadline of a ``predict`` call, if any."""
        return self._scheduler.settings.timeout_ms

    @property
    def fn(self) -> Callable[[Any], Any]:
        """The model function."""
        return self._fn

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` has been called."""
        return self._scheduler.closing

    @property
    def name(self) -> str:
        """The name given, or the model function's qualified name (logs, thread names, metrics)."""
        return self._name

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("running" if self._worker else "idle")
        return (
            f"<Batcher {self._name} {state} max_batch_size={self.max_batch_size} "
            f"max_wait_ms={self.max_wait_ms} pending={self._scheduler.pending}>"
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
        a smaller ``max_batch_size`` or wait now makes due goes at once. A new
        ``max_batch_size`` also lifts a cap set after an out-of-memory error. A
        lower ``max_queue_size`` does not drop requests already queued. Pass
        ``timeout_ms=None`` to remove the default deadline (it applies to new
        requests only). On a method's batcher (the class attribute), it applies
        to every instance's batcher, present and future. Either every option is
        applied or, if one is invalid, none (the error is raised here). The
        result cache (``cache_size``) is kept: none of these options changes
        what the model returns. Safe
        from any thread: from outside the batcher's loop, the options are
        checked at once and applied on the loop.
        """
        settings = self._scheduler.settings.replace(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue_size=max_queue_size,
            timeout_ms=timeout_ms,
            max_batch_cost=max_batch_cost,
        )
        instances = list(self._instances)
        for instance in instances:  # check first: all or nothing
            instance._scheduler.settings.replace(max_batch_size=settings.max_batch_size)
        apply = functools.partial(self._scheduler.reconfigure, settings, reset_oom=max_batch_size is not None)
        worker = self._worker
        if worker is not None and not worker.backend.is_current():
            try:
                worker.backend.call_soon_threadsafe(apply)  # from another thread: on the loop, soon
            except RuntimeError:  # the loop is gone
                apply()
        else:
            apply()
        self._options.update(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_size=settings.max_queue_size,
            timeout_ms=settings.timeout_ms,
            max_batch_cost=settings.max_batch_cost,
        )
        for instance in instances:
            instance.configure(
                max_batch_size=max_batch_size,
                max_wait_ms=max_wait_ms,
                max_queue_size=max_queue_size,
                timeout_ms=timeout_ms,
                max_batch_cost=max_batch_cost,
            )
        logger.info("batcher %r reconfigured: %r", self._name, self)

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
                default) passed first, or the request could not make it: refused
                at once when the work queued ahead of it is predicted to take
                longer, or failed when its batch formed. If the request was
                still queued, it is never sent to the model.
            InvalidInputError: the collator cannot batch ``x`` (only this call
                fails; it is also a ``TypeError``).
            ValueError: a bad ``timeout_ms`` or ``priority``, or ``batch_cost(x)``
                was NaN, infinite or negative.
            Exception: whatever ``fn`` raised for this request's batch.

        Cancelling the caller withdraws a queued request (the model never sees
        it, even if its batch was being formed in the same loop tick); once its
        batch is running, the batch completes for the others and this caller's
        output is dropped.
        """
        if self._streams:  # all of its items: nothing to bound, the list holds them anyway
            return [item async for item in self._items(x, timeout_ms, priority, None)]  # type: ignore[return-value]
        worker = self._worker
        if worker is None or not worker.backend.is_current():
            worker = self._start_for_call()
        scheduler = self._scheduler
        if self._dedup is None:
            request = scheduler.submit(x, timeout_ms, priority)
        else:  # an identical request's computation, or the cache, may answer this one
            shared, value = self._dedup.submit_shared(x, timeout_ms, priority)
            if shared is None:
                return value  # type: ignore[no-any-return]
            request = shared
        try:
            return await worker.backend.wait(request)  # type: ignore[no-any-return]
        except BaseException:
            scheduler.abandon(request)  # nothing unless the caller was cancelled
            request.waiter = None  # no cycle: error -> traceback -> this frame -> request -> waiter -> error
            raise

    __call__ = predict

    async def stream(
        self, x: InT, *, timeout_ms: float | None = None, priority: float = 0
    ) -> AsyncGenerator[OutT, None]:
        """Send one input and iterate over its own items as the generator model yields them.

        ```python
        async for token in batcher.stream(prompt):
            ...
        ```

        For a batcher whose ``fn`` is a generator function (sync or async): each
        ``yield`` gives one item per request of the batch, and a request's stream
        ends when the generator ends or yields ``batchkit.END`` in its position.
        Stopping early (``break``, cancellation) withdraws the request: queued,
        it never runs; running, its items are dropped and the others' are not
        affected (use ``contextlib.aclosing`` to withdraw at once rather than
        when the iterator is collected). ``timeout_ms`` bounds the whole stream.
        Errors are those of ``predict``, raised after the items already
        delivered, plus ``StreamBufferFullError`` for a reader that fell
        ``stream_buffer`` items behind.

        Raises:
            TypeError: ``fn`` is not a generator function (use ``predict``).
        """
        if not self._streams:
            raise TypeError(
                f"batcher {self._name!r}: stream() needs a generator function as fn (each yield: one item "
                "per request); this fn returns one batch of outputs: use predict()"
            )
        async for item in self._items(x, timeout_ms, priority, self._scheduler.settings.stream_buffer):
            yield item

    async def _items(
        self, x: InT, timeout_ms: float | None, priority: float, buffer: int | None
    ) -> AsyncGenerator[OutT, None]:
        worker = self._worker
        if worker is None or not worker.backend.is_current():
            worker = self._start_for_call()
        scheduler = self._scheduler
        request = scheduler.submit(x, timeout_ms, priority)
        channel = request.channel = Channel(buffer)
        try:
            while True:
                try:
                    item = await channel.get()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            scheduler.abandon(request)  # nothing if the stream ended; else never run, or its items dropped

    async def predict_many(
        self, xs: Iterable[InT], *, timeout_ms: float | None = None, priority: float = 0
    ) -> list[OutT]:
        """Send several inputs from one caller; their outputs, in order.

        Each input is a request of its own (counted in ``stats()``, batched with
        everyone else's). If one fails, the others still queued are withdrawn
        and that error is raised (the first, if several fail).
        """
        items = list(xs)
        results: list[Any] = [None] * len(items)
        failures: list[BaseException] = []

        async def one(index: int, x: InT) -> None:
            try:
                results[index] = await self.predict(x, timeout_ms=timeout_ms, priority=priority)
            except Exception as error:
                failures.append(error)
                task_group.cancel_scope.cancel()

        async with anyio.create_task_group() as task_group:
            for index, x in enumerate(items):
                task_group.start_soon(one, index, x)
        if failures:
            raise failures[0]
        return results

    def submit_threadsafe(
        self, x: InT, *, timeout_ms: float | None = None, priority: float = 0
    ) -> concurrent.futures.Future[OutT]:
        """Send one input from any thread; returns a ``concurrent.futures.Future`` of its output.

        The batcher must already run on an event loop (in another thread, say:
        this is what ``SyncBatcher`` is built on). The request is handed to that
        loop without a task per request; errors (``QueueFullError``,
        ``InvalidInputError``, the model's) are set on the future. Cancelling
        the future withdraws a request that is still queued.

        Raises:
            RuntimeError: the batcher is not running on an event loop.
        """
        if self._streams:
            raise TypeError(f"batcher {self._name!r} streams its outputs: submit_threadsafe() takes one-output models")
        worker = self._worker
        if worker is None:
            raise RuntimeError(f"batcher {self._name!r} is not running on an event loop")
        future: ThreadFuture[OutT] = ThreadFuture(self._scheduler.abandon, worker.inbox)
        stopped = BatcherClosedError(f"batcher {self._name!r} stopped before this request was queued")
        try:
            worker.inbox.post(
                functools.partial(self._scheduler.submit_to, future, x, timeout_ms, priority),
                refused=functools.partial(future.set_exception, stopped),
            )
        except RuntimeError:
            raise BatcherClosedError(f"batcher {self._name!r}: its worker or event loop is gone") from None
        return future

    # -- lifecycle ----------------------------------------------------------------

    def _start_for_call(self) -> BoundWorker:
        """Bind to the running loop and start the worker as a system task (lazy start)."""
        scheduler = self._scheduler
        if scheduler.closing:
            raise scheduler.refuse(scheduler.closed_error())
        try:
            worker = self._bind()
        except BaseException as error:
            raise scheduler.refuse(error) from None
        worker.backend.spawn_system_task(functools.partial(_run_worker, weakref.ref(self), worker))
        logger.debug("batcher %r started on %s", self._name, worker.backend.name)
        return worker

    def _bind(self) -> BoundWorker:
        worker = self._worker
        if worker is not None:
            if worker.backend.alive():
                raise RuntimeError(
                    f"batcher {self._name!r} runs on the {worker.backend.name} event loop it was started on; "
                    "use one Batcher per event loop (or close it before using it on another)"
                )
            self._forget(worker)  # its loop ended without cleanup: start afresh on this one
        scheduler = self._scheduler
        backend = current_backend(scheduler.abandon)
        worker = self._new_worker(scheduler, backend)
        scheduler.attach(backend)
        self._worker = worker
        # Dropped without aclose(), the batcher still stops its worker: the worker's task and
        # threads hold the scheduler and the worker, never this object.
        self._finalizer = weakref.finalize(self, _release_worker, scheduler, worker)
        return worker

    def _new_worker(self, scheduler: Scheduler, backend: Backend) -> BoundWorker:
        settings = scheduler.settings
        return Worker(
            scheduler,
            backend,
            self._executor,
            self._slot_fns,
            is_async=self._is_async,
            streams=self._streams,
            shared=settings.executor,
            weight=settings.weight,
        )

    def _forget(self, worker: BoundWorker) -> None:
        """Drop a worker whose event loop is gone; its callers went with the loop."""
        logger.warning("batcher %r: its event loop ended without aclose(); starting afresh", self._name)
        self._scheduler.detach()  # the callers' futures belong to the dead loop: count them, answer none
        worker.abandon(BatcherClosedError(f"batcher {self._name!r}: its event loop ended without aclose()"))
        self._worker_ended(worker)

    def _worker_ended(self, worker: BoundWorker) -> None:
        if self._worker is worker:
            self._worker = None
            self._scheduler.detach()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    async def __aenter__(self) -> Batcher[InT, OutT]:
        scheduler = self._scheduler
        if scheduler.closing:
            raise scheduler.closed_error()
        task = anyio.get_current_task().id
        worker = self._worker
        if worker is not None and worker.backend.is_current():
            self._entries.append((task, None))  # already running: this block neither starts nor owns it
            return self
        worker = self._bind()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._entries.append((task, task_group))
        task_group.start_soon(_run_worker, weakref.ref(self), worker)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task = anyio.get_current_task().id
        task_group = None
        for index in range(len(self._entries) - 1, -1, -1):  # this task's innermost block
            if self._entries[index][0] == task:
                task_group = self._entries.pop(index)[1]
                break
        try:
            if not self._entries:  # the last block out closes the batcher
                await self.aclose()
        finally:
            if task_group is not None:
                # The body's own exception is not the task group's: it propagates as it is,
                # never wrapped in an exception group.
                await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop accepting requests, answer every accepted one, stop the worker.

        Requests already queued are flushed at once (without waiting out
        ``max_wait_ms``). Returns when the last batch is done and the worker's
        threads have exited. Safe to call more than once. If the call itself is
        cancelled, a worker started lazily still finishes draining in the
        background; one started by ``async with`` is cancelled with its task
        group, and the requests it still held fail with ``BatcherClosedError``.

        Raises:
            RuntimeError: called from an event loop other than the running one
                the batcher is bound to (the batcher stays open).
        """
        worker = self._worker
        if worker is not None and not worker.backend.is_current() and worker.backend.alive():
            raise RuntimeError(f"batcher {self._name!r} must be closed from the event loop it runs on")
        scheduler = self._scheduler
        scheduler.closing = True
        if worker is None:
            return
        if not worker.backend.is_current():
            self._forget(worker)
            return
        scheduler.wake()
        await worker.done.wait()

    # -- introspection ------------------------------------------------------------

    def clear_cache(self) -> None:
        """Forget every cached result (see ``cache_size``); nothing to do without a cache.

        Results of computations already queued or running when it applies are
        not cached either (they may come from the model as it was); callers
        that joined them still get them. Safe from any thread: from outside
        the batcher's loop it applies on the loop, before any request sent
        after it from that thread.
        """
        dedup = self._dedup
        if dedup is not None:
            worker = self._worker
            if worker is not None and not worker.backend.is_current():
                try:
                    worker.inbox.post(dedup.clear_cache)  # in order with this thread's requests
                except RuntimeError:  # the worker or its loop is gone
                    dedup.clear_cache()
            else:
                dedup.clear_cache()
        for instance in list(self._instances):
            instance.clear_cache()

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see ``BatcherStats``).

        Safe to call from any thread (a metrics scraper, say): it copies
        counters and histogram buckets, and never sorts.
        """
        return self._scheduler.stats()

    # -- copies and pickles ----------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """An instance's batcher is not copied with its instance (the copy makes its own); a batcher
        that has not started is rebuilt from its function and options; a running one refuses."""
        if self._instance is not None:
            return (_vacant, ())
        if self._worker is not None:
            raise TypeError(
                f"a running Batcher ({self._name!r}) cannot be pickled or copied: it is bound to an event loop"
            )
        return (_rebuild, (self._fn, {**self._options, "name": self._name}))

    # -- use as a method decorator ------------------------------------------------

    def __get__(self, instance: object, owner: type | None = None) -> Batcher[InT, OutT]:
        if instance is None:
            return self
        try:
            bound: Batcher[InT, OutT] | None = instance.__dict__[self._instance_key]
        except KeyError:
            return self._for_instance(instance)
        except AttributeError:
            raise TypeError(
                f"{type(instance).__qualname__} has no __dict__ to keep its batcher in; remove __slots__"
            ) from None
        if bound is None or bound._instance is not instance:  # a copy or an unpickled instance
            return self._for_instance(instance)
        return bound

    def _for_instance(self, instance: object) -> Batcher[InT, OutT]:
        # The model function holds the instance weakly (the worker's threads and task must not
        # keep it alive); the instance's batcher holds it strongly, so a call in progress keeps
        # its instance alive as a bound method would. Instance and batcher form a cycle that
        # the garbage collector frees once both are unreachable; the batcher's finalizer then
        # stops its worker and threads.
        fn = _weak_method(self._fn, instance, self._is_async)
        options: dict[str, Any] = {**self._options, "name": f"{self._name}@{id(instance):x}"}
        bound: Batcher[InT, OutT] = Batcher(fn, **options)
        bound._instance = instance
        instance.__dict__[self._instance_key] = bound
        self._instances.add(bound)
        return bound


async def _run_worker(batcher: weakref.ref[Batcher[Any, Any]], worker: BoundWorker) -> None:
    """The worker's task: it refers to its batcher weakly, so a dropped batcher can be collected."""
    try:
        await worker.run()
    finally:
        owner = batcher()
        if owner is not None:
            owner._worker_ended(worker)


def _release_worker(scheduler: Scheduler, worker: BoundWorker) -> None:
    """Stop the worker of a batcher that was collected without aclose(); from any thread.

    No caller can be waiting (each would hold the batcher). On a running loop the
    worker is woken to stop by itself; on a loop that is not running (stopped,
    closed, or a trio run that ended) nothing would ever run a callback, so its
    threads are stopped here.
    """
    scheduler.closing = True
    if worker.retired:
        return
    backend = worker.backend
    if backend.alive():
        with contextlib.suppress(RuntimeError):
            backend.call_soon_threadsafe(scheduler.wake)  # it drains, then stops its threads
            return
    scheduler.detach()
    worker.abandon(BatcherClosedError(f"batcher {scheduler.name!r} was dropped"))


def _vacant() -> None:
    """What a copied or unpickled instance finds where its original kept its batcher."""
    return None


def _rebuild(fn: Callable[[Any], Any], options: dict[str, Any]) -> Batcher[Any, Any]:
    return Batcher(fn, **options)
