"""The few event-loop operations on the hot path, native to asyncio and trio.

Everything that happens once per *batch* (sleeping until a flush, waiting for
the worker) uses anyio and is backend-neutral. What happens once per *request*
is done here with each backend's cheapest primitive: an asyncio future or a
parked trio task. A generic ``anyio.Event`` per request would cost several times
more allocations and wake-ups, and per-request cost is what a batcher is about.

Cancellation semantics are the backend's own: a cancelled ``predict`` raises
``asyncio.CancelledError`` or ``trio.Cancelled`` as usual, and the batcher is told
so that a request cancelled while still queued is never sent to the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import sniffio

from ._queue import CANCELLED, RUNNING, TIMED_OUT, Request

__all__ = ["Backend", "Owner", "current_backend"]


class Owner(Protocol):
    """The part of the batcher a backend calls back into."""

    def _abandon(self, request: Request, state: int) -> None: ...

    def _expire(self, request: Request) -> None: ...

    def _timeout_error(self, request: Request) -> BaseException: ...


class Backend(Protocol):
    name: str

    def time(self) -> float: ...

    def is_current(self) -> bool: ...

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None: ...

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None: ...

    async def wait(self, request: Request, owner: Owner) -> Any: ...

    def set_results(self, requests: list[Request], values: list[Any]) -> None: ...

    def set_error(self, request: Request, error: BaseException) -> None: ...


class AsyncioBackend:
    name = "asyncio"

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self.time: Callable[[], float] = self._loop.time

    def is_current(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            await fn()

        task = self._loop.create_task(main(), name="batchkit-worker")
        self._tasks.add(task)  # keep a strong reference while it runs
        task.add_done_callback(self._tasks.discard)

    async def wait(self, request: Request, owner: Owner) -> Any:
        future = self._loop.create_future()
        request.waiter = future
        if request.deadline is not None:
            request.timer = self._loop.call_at(request.deadline, owner._expire, request)
        try:
            return await future
        except asyncio.CancelledError:
            if request.state <= RUNNING:
                owner._abandon(request, CANCELLED)
            raise

    def set_results(self, requests: list[Request], values: list[Any]) -> None:
        for request, value in zip(requests, values, strict=True):
            if request.timer is not None:
                request.timer.cancel()
            future = request.waiter
            if not future.done():
                future.set_result(value)

    def set_error(self, request: Request, error: BaseException) -> None:
        if request.timer is not None:
            request.timer.cancel()
        future = request.waiter
        if not future.done():
            future.set_exception(error)


class TrioBackend:
    name = "trio"

    def __init__(self) -> None:
        import outcome
        import trio

        self._trio = trio
        self._lowlevel = trio.lowlevel
        self._token = trio.lowlevel.current_trio_token()
        self.time: Callable[[], float] = trio.current_time
        self._value = outcome.Value
        self._error = outcome.Error

    def is_current(self) -> bool:
        try:
            return self._lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        self._token.run_sync_soon(fn, *args)

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._lowlevel.spawn_system_task(fn, name="batchkit-worker")

    async def wait(self, request: Request, owner: Owner) -> Any:
        lowlevel = self._lowlevel
        request.waiter = lowlevel.current_task()
        current_time = self._trio.current_time

        def abort(_: object) -> Any:
            if request.state <= RUNNING:
                expired = request.deadline is not None and current_time() >= request.deadline
                owner._abandon(request, TIMED_OUT if expired else CANCELLED)
            return lowlevel.Abort.SUCCEEDED

        if request.deadline is None:
            return await lowlevel.wait_task_rescheduled(abort)
        with self._trio.CancelScope(deadline=request.deadline):
            return await lowlevel.wait_task_rescheduled(abort)
        raise owner._timeout_error(request)  # our own deadline cancelled the wait

    def set_results(self, requests: list[Request], values: list[Any]) -> None:
        reschedule, wrap = self._lowlevel.reschedule, self._value
        for request, value in zip(requests, values, strict=True):
            reschedule(request.waiter, wrap(value))

    def set_error(self, request: Request, error: BaseException) -> None:
        self._lowlevel.reschedule(request.waiter, self._error(error))


def current_backend() -> Backend:
    """The backend of the running event loop (raises RuntimeError outside one)."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError("batchkit must be used from a running asyncio or trio event loop") from None
    if library == "asyncio":
        return AsyncioBackend()
    if library == "trio":
        return TrioBackend()
    raise RuntimeError(f"batchkit supports asyncio and trio, not {library}")


if TYPE_CHECKING:
    _a: Backend = AsyncioBackend()
    _t: Backend = TrioBackend()
