"""Streams: a request answered by many items, in order, as they are produced.

``Channel`` is the waiter of a streaming request: the scheduler pushes items
into it on the event loop, and the caller's ``async for`` takes them out. What
is buffered for one caller is bounded (``stream_buffer``): a caller that falls
that far behind is cut off with ``StreamBufferFullError``, and the rows of the
others never wait for it.

``END`` in a request's position of a generator's output ends that request's
stream (later items in that position are ignored).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import anyio

__all__ = ["END", "Channel"]


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "batchkit.END"

    def __reduce__(self) -> str:
        return "END"


END: Final = _End()
"""Yielded in a request's position by a generator model: that request's stream ends here."""


class Channel:
    """One request's items: filled on the loop, read by its caller (``limit=None``: unbounded)."""

    __slots__ = ("_done", "_error", "_items", "_limit", "_wakeup")

    def __init__(self, limit: int | None) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._done = False
        self._error: BaseException | None = None
        self._wakeup: anyio.Event | None = None

    def push(self, item: Any) -> bool:
        """Buffer ``item``; False (and nothing buffered) if the caller is ``limit`` items behind."""
        if self._limit is not None and len(self._items) >= self._limit:
            return False
        self._items.append(item)
        self._wake()
        return True

    def close(self, error: BaseException | None = None) -> None:
        """No more items; the caller gets ``error`` (if any) after the items already buffered."""
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    async def get(self) -> Any:
        """The next item; ``StopAsyncIteration`` at the end, or the stream's error."""
        while not self._items:
            if self._done:
                error, self._error = self._error, None  # raised once; no cycle through this channel
                if error is not None:
                    try:
                        raise error
                    finally:
                        del error  # this frame is in the error's traceback: hold nothing of it
                raise StopAsyncIteration
            wakeup = self._wakeup = anyio.Event()
            await wakeup.wait()
        return self._items.popleft()
