"""Handing requests to the event loop from other threads, without a task per request.

``Inbox`` queues calls made from any thread and runs them on the loop in order,
with one ``call_soon_threadsafe`` per burst rather than per call: a thread that
posts while a drain is already scheduled only appends. ``ThreadFuture`` is the
waiter of such a request: a ``concurrent.futures.Future`` that the backend
answers like an asyncio future, and whose ``cancel()`` withdraws the request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Inbox", "ThreadFuture"]

T = TypeVar("T")


class Inbox:
    """Calls posted from any thread, run on the event loop in the order posted."""

    __slots__ = ("_calls", "_closed", "_lock", "_scheduled", "_wake")

    def __init__(self, call_soon_threadsafe: Callable[[Callable[[], None]], None]) -> None:
        self._calls: deque[tuple[Callable[[], None], Callable[[], None] | None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._wake = call_soon_threadsafe

    def post(self, call: Callable[[], None], refused: Callable[[], None] | None = None) -> None:
        """Run ``call()`` on the loop soon; ``RuntimeError`` if the inbox is closed or the loop gone.

        If the inbox closes before ``call`` runs, ``refused()`` runs instead (on the closing thread).
        """
        entry = (call, refused)
        self._calls.append(entry)
        if self._closed:  # closed meanwhile: take it back, unless close() has already handled it
            try:
                self._calls.remove(entry)
            except ValueError:
                return
            raise RuntimeError("the batcher's worker has stopped")
        if self._scheduled:  # a drain is scheduled and has not started: it will run this call
            return
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._wake(self._drain)
        except RuntimeError:
            self._scheduled = False
            raise

    def _drain(self) -> None:
        self._scheduled = False  # first: a call posted from now on schedules another drain
        calls = self._calls
        while calls:
            call, _ = calls.popleft()
            call()

    def close(self) -> None:
        """No more calls: the ones still waiting are refused (their ``refused()`` runs), later posts raise."""
        self._closed = True
        calls = self._calls
        while calls:
            _, refused = calls.popleft()
            if refused is not None:
                refused()


class ThreadFuture(concurrent.futures.Future[T]):
    """The waiter of a request sent from another thread; ``cancel()`` withdraws it."""

    def __init__(self, withdraw: Callable[[Any], None], inbox: Inbox) -> None:
        super().__init__()
        self.request: Any = None  # set on the loop once the request is queued
        self._withdraw = withdraw
        self._inbox = inbox

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        request = self.request
        if request is not None:  # queued already: take it out now rather than when its batch forms
            with contextlib.suppress(RuntimeError):  # the loop is gone, and the queue with it
                self._inbox.post(lambda: self._withdraw(request))
        return True
