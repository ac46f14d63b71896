"""SyncBatcher: micro-batching for synchronous callers (threads), not coroutines.

A ``SyncBatcher`` owns one background thread that runs an asyncio event loop with
a ``Batcher`` on it. ``predict`` hands the input to that loop
(``Batcher.submit_threadsafe``: no task per request, one loop wake-up per burst)
and blocks the calling thread until its own result is back:

```text
calling threads              background thread (event loop)      model thread
───────────────              ──────────────────────────────      ────────────
predict(x) ──Inbox.post──▶ Scheduler.submit ──────────────────▶ fn(batch)
     ▲ blocks on a concurrent Future   (queue, flush policy)
     └──────────── result / exception ◀──────────┘
```

Many threads calling ``predict`` at the same time are batched together, exactly
as concurrent coroutines are with ``Batcher``; coroutines on any other event
loop share the same batches through ``apredict``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, overload

import sniffio

from ._batcher import Batcher
from ._errors import BatcherClosedError
from ._stats import BatcherStats

__all__ = ["SyncBatcher"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")
T = TypeVar("T")


def _in_async_context() -> str | None:
    """The name of the async library running in this thread, if any."""
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


class _Loop:
    """The background thread and its event loop, running one batcher until ``stop()``."""

    def __init__(self, batcher: Batcher[Any, Any], name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(batcher,), name=f"batchkit-sync-{name}", daemon=True)
        self.thread.start()
        self._started.wait()
        if self.error is not None:
            self.thread.join()
            raise self.error

    def _run(self, batcher: Batcher[Any, Any]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve(batcher))
        finally:
            self._started.set()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _serve(self, batcher: Batcher[Any, Any]) -> None:
        self._stop = asyncio.Event()
        try:
            async with batcher:
                self._started.set()
                await self._stop.wait()
        except BaseException as error:  # refused at start (a closed batcher, say)
            self.error = error

    def stop(self) -> None:
        """Ask the loop to close the batcher (draining it) and end; from any thread, without waiting."""
        stop = self._stop
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self.loop.call_soon_threadsafe(stop.set)


class SyncBatcher(Generic[InT, OutT]):
    """A ``Batcher`` for synchronous code: threads call ``predict`` and block.

    Use it where callers are threads rather than coroutines: a Flask or Django
    view, a thread pool, a gRPC sync server, a script. The options are the same
    as ``Batcher``'s, passed through to it:

    ```python
    with batchkit.SyncBatcher(model_fn, max_batch_size=64, max_wait_ms=2) as batcher:
        y = batcher.predict(x)          # from any number of threads at once
    ```

    ``fn`` may also be a ``Batcher`` that has not started yet (for example one
    made by ``Batcher.from_module``); the ``SyncBatcher`` then runs that one.

    The first ``predict`` starts a background thread running an asyncio event
    loop with the batcher on it; ``close()`` (or leaving the ``with`` block)
    answers every accepted request, then stops that thread. A ``SyncBatcher``
    collected without ``close()`` stops its thread too. Every method is
    thread-safe; ``apredict`` lets coroutines (on asyncio or trio, in any
    thread) share the batches of the threads.

    Inside a coroutine, ``predict`` would block the event loop and stall every
    other task, so it raises ``RuntimeError`` there: use ``await apredict(x)``.
    """

    @overload
    def __init__(self, fn: Batcher[InT, OutT], /) -> None: ...

    @overload
    def __init__(self: SyncBatcher[Any, Any], fn: Callable[[Any], Any], /, **options: Any) -> None: ...

    def __init__(self, fn: Callable[[Any], Any] | Batcher[InT, OutT], /, **options: Any) -> None:
        if isinstance(fn, Batcher):
            if options:
                raise TypeError("SyncBatcher(batcher) takes no options: give them to the Batcher")
            if fn.closed:
                raise BatcherClosedError("the Batcher given to SyncBatcher is closed")
            self._batcher: Batcher[InT, OutT] = fn
        else:
            # Built here so that bad options fail at construction, as with Batcher.
            self._batcher = Batcher(fn, **options)
        self._name = self._batcher.name
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._closed = False

    # -- configuration, read-only -------------------------------------------------

    @property
    def name(self) -> str:
        """The batcher's name (as given, or the model function's qualified name)."""
        return self._name

    @property
    def batcher(self) -> Batcher[InT, OutT]:
        """The ``Batcher`` that runs on the background thread's event loop."""
        return self._batcher

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._loop is not None else "idle")
        return f"<SyncBatcher {self._name} {state}>"

    def configure(self, **options: Any) -> None:
        """``Batcher.configure``, from any thread: checked here, applied on the batcher's loop."""
        self._batcher.configure(**options)

    def clear_cache(self) -> None:
        """``Batcher.clear_cache``: forget every cached result; from any thread."""
        self._batcher.clear_cache()

    # -- the hot path -------------------------------------------------------------

    def predict(self, x: InT, *, timeout_ms: float | None = None, priority: float = 0) -> OutT:
        """Send one input, block until its own output is ready, and return it.

        ``timeout_ms`` and ``priority`` are those of ``Batcher.predict``. Raises
        the same errors as ``Batcher.predict``: ``QueueFullError``,
        ``BatcherClosedError`` (after ``close()``), ``RequestTimeoutError``,
        ``InvalidInputError`` for an input that cannot be batched, or whatever
        the model raised for this request's batch.

        Raises:
            RuntimeError: called from a coroutine (a running event loop in this
                thread); ``await apredict(x)`` is the way there.
        """
        library = _in_async_context()
        if library is not None:
            raise RuntimeError(
                f"SyncBatcher.predict() blocks its thread and was called inside a running {library} event loop, "
                "which would stall every other task; in async code use `await batcher.apredict(x)` "
                "(or run this call in a worker thread)"
            )
        future = self._submit(x, timeout_ms, priority)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted while waiting (KeyboardInterrupt, say): withdraw the request
            del future  # it holds the error, whose traceback holds this frame: no cycle
            raise

    __call__ = predict

    async def apredict(self, x: InT, *, timeout_ms: float | None = None, priority: float = 0) -> OutT:
        """``predict`` for coroutines, on asyncio or trio: batched with the threads' requests.

        Cancelling the caller withdraws a request that is still queued.
        """
        future = self._submit(x, timeout_ms, priority)
        try:
            return await _wait(future)
        except BaseException:
            future.cancel()
            del future  # see predict
            raise

    def _submit(self, x: InT, timeout_ms: float | None, priority: float) -> concurrent.futures.Future[OutT]:
        loop = self._loop
        if loop is None or self._closed:
            with self._lock:  # start once; never on a batcher that close() has begun to stop
                if self._closed:
                    raise BatcherClosedError(f"batcher {self._name!r} is closed")
                if self._loop is None:
                    self._start_locked()
        return self._batcher.submit_threadsafe(x, timeout_ms=timeout_ms, priority=priority)

    # -- lifecycle ----------------------------------------------------------------

    def _start_locked(self) -> None:
        loop = self._loop = _Loop(self._batcher, self._name)
        weakref.finalize(self, loop.stop)  # collected without close(): the thread still ends

    def close(self) -> None:
        """Stop accepting requests, answer every accepted one, stop the background thread.

        Blocks until the last batch is done and the thread has exited. Safe to
        call more than once, and from any thread but the batcher's own.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop = self._loop
        if loop is None:
            return
        if threading.current_thread() is loop.thread:
            raise RuntimeError("SyncBatcher.close() cannot be called from the batcher's own thread")
        loop.stop()
        loop.thread.join()

    def __enter__(self) -> SyncBatcher[InT, OutT]:
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self._name!r} is closed")
            if self._loop is None:
                self._start_locked()
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        self.close()
        return False

    # -- introspection ------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see ``BatcherStats``); safe from any thread."""
        return self._batcher.stats()


async def _wait(future: concurrent.futures.Future[T]) -> T:
    """Await a ``concurrent.futures.Future`` on asyncio or trio without a thread."""
    if sniffio.current_async_library() == "asyncio":
        return await asyncio.wrap_future(future)
    import outcome
    import trio

    lowlevel = trio.lowlevel
    token = lowlevel.current_trio_token()
    task = lowlevel.current_task()
    aborted = False

    def wake() -> None:
        if not aborted:
            lowlevel.reschedule(task, outcome.capture(future.result))

    def done(_: concurrent.futures.Future[T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake)

    def abort(_: object) -> Any:
        nonlocal aborted
        aborted = True
        future.cancel()
        return lowlevel.Abort.SUCCEEDED

    future.add_done_callback(done)
    return await lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
