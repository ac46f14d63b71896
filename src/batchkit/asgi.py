"""Serving a batcher over HTTP from an ASGI app (needs the ``asgi`` extra: ``starlette``).

Three small pieces for a FastAPI or Starlette handler:

```python
from batchkit.asgi import error_response, predict_or_disconnect, readiness

@app.post("/predict")
async def predict(body: Body, request: Request) -> Response:
    try:
        y = await predict_or_disconnect(request, batcher, x)  # cancelled if the client leaves
    except Exception as exc:
        response = error_response(exc)  # 503 / 504 / 422 / 499 for batchkit's errors
        if response is None:
            raise  # the model's own error: a 500, as before
        return response
    ...

@app.get("/ready")
async def ready() -> Response:
    ok, reason = readiness(batcher.stats(), max_queue_age_ms=1000, max_run_ms=5000)
    return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)
```

* ``predict_or_disconnect``: ASGI servers (uvicorn, hypercorn) do not cancel a
  handler whose client went away; this watches the request's ``receive``
  channel for ``http.disconnect`` and cancels the ``predict``, so a request
  still queued leaves the queue and is never computed.
* ``error_response``: the HTTP answer for each of batchkit's errors.
* ``readiness``: whether a batcher's ``stats()`` look able to serve: not when
  every slot is blocked by a hung call, a batch has run too long, or the oldest
  queued request has waited too long.

``import batchkit`` never imports this module or starlette.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import anyio

from ._errors import (
    BatcherClosedError,
    InvalidInputError,
    ModelTimeoutError,
    QueueFullError,
    RequestTimeoutError,
)
from ._extras import require
from ._stats import BatcherStats

require("starlette", "asgi", "batchkit.asgi")

from starlette.requests import ClientDisconnect, HTTPConnection, Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "ClientDisconnect",
    "Predictor",
    "error_handler",
    "error_response",
    "error_status",
    "predict_or_disconnect",
    "readiness",
]

T = TypeVar("T")
OutT = TypeVar("OutT", covariant=True)

CLIENT_CLOSED_REQUEST = 499
"""The status answered for a client that left (nginx's convention; nobody reads it)."""


class Predictor(Protocol[OutT]):
    """Anything with an async ``predict(x, *, timeout_ms=...)``: a ``Batcher``, a ``StepBatcher``."""

    def predict(self, x: Any, *, timeout_ms: float | None = None) -> Awaitable[OutT]: ...


async def predict_or_disconnect(request: Request, batcher: Predictor[T], x: Any, **predict_kwargs: Any) -> T:
    """``await batcher.predict(x, **predict_kwargs)``, cancelled if the client disconnects first.

    A task watches the request's ASGI ``receive`` channel (``request.receive``)
    for ``http.disconnect`` while the prediction is awaited. When the client
    leaves, the ``predict`` is cancelled: a request still queued leaves the
    queue and is never sent to the model (``stats().cancelled`` counts it), and
    this raises ``starlette.requests.ClientDisconnect`` (``error_response``
    answers it with 499, which nobody receives).

    Call it after the request's body has been read (as FastAPI does before the
    handler runs, for a body parameter): the watcher takes any further
    ``http.request`` messages off the channel and drops them. A result that is
    ready when the disconnect is seen is returned. Errors from ``predict`` are
    raised as they are (not in an exception group). Works on asyncio and trio.
    """
    receive = request.receive
    result: list[T] = []
    failure: list[Exception] = []
    disconnected = False

    watching = anyio.CancelScope()
    predicting = anyio.CancelScope()

    async def watch() -> None:
        nonlocal disconnected
        with watching:  # cancelled here, so the task itself ends normally (a cancelled task leaves a cycle)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    predicting.cancel()
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with predicting:
            try:
                result.append(await batcher.predict(x, **predict_kwargs))
            except Exception as exc:  # raised below, outside the task group (so never wrapped in a group)
                failure.append(exc)
        watching.cancel()

    if failure:
        try:
            raise failure.pop()
        finally:
            del failure  # this frame holds no reference to the exception: no cycle through its traceback
    if result:
        return result[0]
    assert disconnected
    raise ClientDisconnect("the client disconnected before its prediction was ready")


_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (QueueFullError, 503),  # shed load: retry later, or elsewhere
    (BatcherClosedError, 503),  # shutting down: another replica will answer
    (RequestTimeoutError, 504),
    (ModelTimeoutError, 504),
    (InvalidInputError, 422),
    (ClientDisconnect, CLIENT_CLOSED_REQUEST),
)


def error_status(exc: BaseException) -> int | None:
    """The HTTP status for one of batchkit's errors (or ``ClientDisconnect``); ``None`` for any other."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return None


def error_response(exc: BaseException, *, retry_after_s: int = 1) -> Response | None:
    """The HTTP response for one of batchkit's errors; ``None`` for any other (let it be a 500).

    | error | status |
    | --- | --- |
    | ``QueueFullError``, ``BatcherClosedError`` | 503, with ``Retry-After: retry_after_s`` |
    | ``RequestTimeoutError``, ``ModelTimeoutError`` | 504 |
    | ``InvalidInputError`` | 422 |
    | ``ClientDisconnect`` (from ``predict_or_disconnect``) | 499 |

    The body is FastAPI's error shape, ``{"detail": str(exc)}``. No traceback is
    logged: these are answers, not bugs.
    """
    status = error_status(exc)
    if status is None:
        return None
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


async def error_handler(request: HTTPConnection, exc: Exception) -> Response:
    """A Starlette/FastAPI exception handler: ``app.add_exception_handler(batchkit.BatchkitError, error_handler)``.

    Answers batchkit's errors as ``error_response`` does; any other exception
    (``BatchSizeMismatchError``, ``StreamBufferFullError``) is re-raised, a 500.
    """
    response = error_response(exc)
    if response is None:
        raise exc
    return response


def readiness(
    stats: BatcherStats,
    *,
    slots: int = 1,
    max_run_ms: float | None = None,
    max_queue_age_ms: float | None = None,
) -> tuple[bool, str]:
    """Whether a batcher whose ``stats()`` are ``stats`` can serve now, and why not.

    Not ready when:

    * every slot is blocked by a call past ``run_timeout_ms`` that has not
      returned (``stats.blocked_slots >= slots``; ``slots`` is the batcher's
      ``replicas * max_concurrent_batches``, 1 by default): nothing can run;
    * the oldest running batch has run longer than ``max_run_ms`` (hung, with
      or without ``run_timeout_ms``; pick several times the slowest batch);
    * the oldest queued request has waited longer than ``max_queue_age_ms``
      (hopelessly backed up; pick the latency budget, such as ``timeout_ms``).

    Ready again as soon as the cause clears. Returns ``(ready, reason)``, the
    reason a line for the probe's body.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if stats.blocked_slots >= slots:
        return False, f"every slot ({stats.blocked_slots} of {slots}) is blocked by a model call past run_timeout_ms"
    if max_run_ms is not None and stats.oldest_running_ms > max_run_ms:
        return False, f"a batch has been running for {stats.oldest_running_ms:.0f} ms (limit {max_run_ms:g} ms)"
    if max_queue_age_ms is not None and stats.oldest_queued_ms > max_queue_age_ms:
        return False, (
            f"the oldest queued request has waited {stats.oldest_queued_ms:.0f} ms "
            f"(limit {max_queue_age_ms:g} ms; {stats.pending} queued)"
        )
    return True, f"ready ({stats.pending} queued, {stats.in_flight} running)"
