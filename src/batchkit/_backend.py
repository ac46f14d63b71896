"""The event-loop operations batchkit needs, native to asyncio and to trio.

A leaf module: it knows requests only as objects with a ``waiter`` slot, and
calls nothing of batchkit's but the ``on_abort`` callable it was built with.

What happens once per *request* (parking the caller, waking it with its answer)
uses each backend's cheapest primitive: an asyncio future, or a trio task parked
with ``wait_task_rescheduled``. A generic ``anyio.Event`` per request would cost
several times more, and per-request cost is what a batcher is about. What
happens once per *batch* (the worker's sleep) uses anyio and is backend-neutral.

Cancellation is the backend's own: a cancelled ``predict`` raises
``asyncio.CancelledError`` or ``trio.Cancelled``. trio tells ``on_abort`` at the
moment of cancellation; asyncio cancels the future at once (``withdrawn``), and
the caller's task tells the scheduler when it next runs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import sniffio

__all__ = ["Backend", "Waitable", "current_backend"]


class Waitable(Protocol):
    waiter: Any


class Backend(Protocol):
    """One running event loop, as the scheduler and the worker use it."""

    name: str

    def is_current(self) -> bool:
        """Whether the calling code runs on this event loop."""
        ...

    def alive(self) -> bool:
        """Whether the event loop can still run callbacks (False once it is closed or finished)."""
        ...

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop, from any thread (``RuntimeError`` when the loop is gone)."""
        ...

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` as a task that lives as long as the loop."""
        ...

    def wait(self, request: Waitable) -> Awaitable[Any]:
        """Park the caller until ``resolve`` or ``fail`` answers ``request``."""
        ...

    def withdrawn(self, request: Waitable) -> bool:
        """Whether the caller gave up in a way ``on_abort`` has not been told of yet."""
        ...

    def resolve(self, requests: Iterable[Waitable], values: Iterable[Any]) -> None:
        """Wake each caller with its value."""
        ...

    def fail(self, request: Waitable, error: BaseException) -> None:
        """Wake the caller with ``error``."""
        ...

    def cancel_requested(self) -> bool:
        """Whether the current task is really being cancelled (not merely handed a stray ``CancelledError``)."""
        ...


class AsyncioBackend:
    name = "asyncio"

    def __init__(self, on_abort: Callable[[Any], None]) -> None:
        del on_abort  # the caller's task reports its own cancellation
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._tasks: set[asyncio.Task[None]] = set()

    def is_current(self) -> bool:
        # A thread runs one loop at a time: if ours is running in this thread, this is it.
        # (Several times cheaper than asyncio.get_running_loop(), which is on the hot path.)
        return self._loop.is_running() and threading.get_ident() == self._thread

    def alive(self) -> bool:
        return self._loop.is_running() and not self._loop.is_closed()

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            await fn()

        task = self._loop.create_task(main(), name="batchkit-worker")
        self._tasks.add(task)  # keep a strong reference while it runs
        task.add_done_callback(self._tasks.discard)

    def wait(self, request: Waitable) -> Awaitable[Any]:
        future = request.waiter = self._loop.create_future()
        return future

    def withdrawn(self, request: Waitable) -> bool:
        waiter = request.waiter
        return waiter is not None and bool(waiter.cancelled())

    def resolve(self, requests: Iterable[Waitable], values: Iterable[Any]) -> None:
        for request, value in zip(requests, values, strict=True):
            future = request.waiter
            request.waiter = None  # the answer is the caller's alone: nothing of batchkit's keeps it
            if not future.done():
                future.set_result(value)

    def fail(self, request: Waitable, error: BaseException) -> None:
        future = request.waiter
        request.waiter = None
        if future is not None and not future.done():
            future.set_exception(error)

    def cancel_requested(self) -> bool:
        task = asyncio.current_task()
        if task is None or sys.version_info < (3, 11):
            return True  # no way to tell on 3.10: assume a real cancellation
        return task.cancelling() > 0


class TrioBackend:
    name = "trio"

    def __init__(self, on_abort: Callable[[Any], None]) -> None:
        import outcome
        import trio

        self._trio = trio
        self._lowlevel = trio.lowlevel
        self._token = trio.lowlevel.current_trio_token()
        self._value = outcome.Value
        self._error = outcome.Error
        self._on_abort = on_abort

    def is_current(self) -> bool:
        try:
            return self._lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def alive(self) -> bool:
        try:
            self._token.run_sync_soon(_nothing)
        except self._trio.RunFinishedError:
            return False
        return True

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except self._trio.RunFinishedError:
            raise RuntimeError("the trio run has finished") from None

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._lowlevel.spawn_system_task(fn, name="batchkit-worker")

    def wait(self, request: Waitable) -> Awaitable[Any]:
        lowlevel = self._lowlevel
        request.waiter = lowlevel.current_task()  # wait() runs in the caller's task, right before its await
        on_abort = self._on_abort

        def abort(_: object) -> Any:
            on_abort(request)
            return lowlevel.Abort.SUCCEEDED

        return lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def withdrawn(self, request: Waitable) -> bool:
        # trio calls abort() at the moment of cancellation; a thread's future does not.
        waiter = request.waiter
        return type(waiter) is not self._lowlevel.Task and waiter is not None and bool(waiter.cancelled())

    def resolve(self, requests: Iterable[Waitable], values: Iterable[Any]) -> None:
        reschedule, wrap, task_type = self._lowlevel.reschedule, self._value, self._lowlevel.Task
        for request, value in zip(requests, values, strict=True):
            waiter, request.waiter = request.waiter, None  # the answer is the caller's alone
            if type(waiter) is task_type:
                reschedule(waiter, wrap(value))
            elif not waiter.done():  # a request sent from another thread (submit_threadsafe)
                waiter.set_result(value)

    def fail(self, request: Waitable, error: BaseException) -> None:
        waiter, request.waiter = request.waiter, None
        if type(waiter) is self._lowlevel.Task:
            self._lowlevel.reschedule(waiter, self._error(error))
        elif waiter is not None and not waiter.done():  # from another thread
            waiter.set_exception(error)

    def cancel_requested(self) -> bool:
        return True  # trio.Cancelled cannot come from anywhere but a cancel scope


def _nothing() -> None:
    pass


def current_backend(on_abort: Callable[[Any], None]) -> Backend:
    """The backend of the running event loop (raises RuntimeError outside one)."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError("batchkit must be used from a running asyncio or trio event loop") from None
    if library == "asyncio":
        return AsyncioBackend(on_abort)
    if library == "trio":
        return TrioBackend(on_abort)
    raise RuntimeError(f"batchkit supports asyncio and trio, not {library}")


if TYPE_CHECKING:
    _a: Backend = AsyncioBackend(print)
    _t: Backend = TrioBackend(print)
