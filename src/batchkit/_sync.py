"""SyncBatcher: micro-batching for synchronous callers (threads), not coroutines.

A ``SyncBatcher`` owns one background thread that runs an asyncio event loop with
a ``Batcher`` on it. ``predict`` hands the input to that loop and
blocks the calling thread until its own result is back:

```text
calling threads              background thread (event loop)      model thread
───────────────              ──────────────────────────────      ────────────
predict(x) ──run_coroutine_threadsafe──▶ Batcher.predict(x) ──▶ fn(batch)
     ▲ blocks on a concurrent Future        (queue, flush policy)
     └──────────── result / exception ◀──────────┘
```

Many threads calling ``predict`` at the same time are batched together, exactly
as concurrent coroutines are with ``Batcher``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar, overload

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
    answers every accepted request, then stops that thread. Every method is
    thread-safe.

    Inside a coroutine, use ``await Batcher.predict`` instead: blocking the event
    loop on ``SyncBatcher.predict`` would stall every other task, so it raises
    ``RuntimeError`` there.
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
        self._name: str = str(getattr(self._batcher, "_name", None) or repr(self._batcher))
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
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

    # -- the hot path -------------------------------------------------------------

    def predict(self, x: InT, *, timeout_ms: float | None = None, priority: float = 0) -> OutT:
        """Send one input, block until its own output is ready, and return it.

        ``timeout_ms`` and ``priority`` are those of ``Batcher.predict``. Raises
        the same errors as ``Batcher.predict``: ``QueueFullError``,
        ``BatcherClosedError`` (after ``close()``), ``RequestTimeoutError``,
        ``TypeError`` for an input that cannot be collated, or whatever the model
        raised for this request's batch.

        Raises:
            RuntimeError: called from a coroutine (a running event loop in this
                thread); ``await Batcher.predict(x)`` is the way there.
        """
        library = _in_async_context()
        if library is not None:
            raise RuntimeError(
                f"SyncBatcher.predict() blocks its thread and was called inside a running {library} event loop, "
                "which would stall every other task; in async code use `await batcher.predict(x)` with a "
                "batchkit.Batcher (or run this call in a worker thread)"
            )
        future = self._submit(lambda: self._batcher.predict(x, timeout_ms=timeout_ms, priority=priority))
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt, say): withdraw the request.
            future.cancel()
            raise

    __call__ = predict

    def _submit(self, make: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        """Schedule ``make()`` on the loop. Under the lock, so that ``close()`` sees every
        request submitted before it and none is scheduled on a loop that is stopping."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self._name!r} is closed")
            loop = self._loop if self._loop is not None else self._start_locked()
            return asyncio.run_coroutine_threadsafe(make(), loop)

    # -- lifecycle ----------------------------------------------------------------

    def _start_locked(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(
            target=self._serve, args=(loop, ready), name=f"batchkit-sync-{self._name}", daemon=True
        )
        thread.start()
        ready.wait()
        self._thread = thread
        self._loop = loop
        return loop

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def close(self) -> None:
        """Stop accepting requests, answer every accepted one, stop the background thread.

        Blocks until the last batch is done and the thread has exited. Safe to
        call more than once, and from any thread but the batcher's own.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("SyncBatcher.close() cannot be called from the batcher's own thread")
        try:
            asyncio.run_coroutine_threadsafe(self._batcher.aclose(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()

    def __enter__(self) -> SyncBatcher[InT, OutT]:
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self._name!r} is closed")
            if self._loop is None:
                self._start_locked()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- introspection ------------------------------------------------------------

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see ``BatcherStats``), taken on the batcher's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            return self._batcher.stats()
        future: concurrent.futures.Future[BatcherStats] = concurrent.futures.Future()

        def snapshot() -> None:
            if future.set_running_or_notify_cancel():
                future.set_result(self._batcher.stats())

        try:
            loop.call_soon_threadsafe(snapshot)
        except RuntimeError:  # the loop is closed: the counters no longer move
            return self._batcher.stats()
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if not thread.is_alive():  # stopped before it ran the snapshot
                    return self._batcher.stats()
