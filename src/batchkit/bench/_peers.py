"""Other batchers driven the same way: Ray Serve's ``@serve.batch`` and ``batched``.

Both are optional (the ``peers`` extra); a peer that cannot be
imported is reported as skipped, never an error.

``@serve.batch`` is used outside a Serve replica, in this process's event loop:
its constructor calls ``serve.get_replica_context()`` only to log a configuration
warning, and that call raises outside a replica, so the benchmark replaces that
one check (``_BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests``)
with a no-op. Nothing else is patched, and ``ray.init`` is never called. Its
batch function runs on the event loop: ``ray-serve-inline`` calls the model
there (as its docs show), ``ray-serve-thread`` offloads it with ``asyncio.to_thread``.

``batched.aio.dynamically`` runs a synchronous batch function through
``asyncio.to_thread`` itself.
"""

from __future__ import annotations

import asyncio
import importlib
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from .._extras import install_hint
from ._model import Model
from ._variants import Predict, Setting, Variant

__all__ = ["PEERS", "ListFn", "batched_batcher", "peer_variants", "ray_serve_batcher", "stop_ray_serve_batcher"]

ListFn = Callable[[list[Any]], Any]
"""A batch function over a list of inputs (sync returns a list, async an awaitable list)."""


def _import(name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ray and its dependencies warn on import
        return importlib.import_module(name)


def ray_serve_batcher(fn: ListFn, setting: Setting) -> Predict:
    """``@serve.batch`` around an ``async`` list function, outside any replica."""
    batching = _import("ray.serve.batching")
    serve = _import("ray.serve")
    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    decorate = serve.batch(max_batch_size=setting.batch_size, batch_wait_timeout_s=setting.fixed_wait_ms / 1000.0)
    predict: Predict = decorate(fn)
    return predict


async def stop_ray_serve_batcher(predict: Predict, *, timeout_s: float = 5.0) -> None:
    """Stop forming batches, let running ones finish (up to ``timeout_s``), silence the rest.

    ``@serve.batch`` has no close: its queue task lives until the loop dies, and
    its done-callback re-raises the ``CancelledError`` of every batch task
    cancelled then. The loop's exception handler drops exactly those.
    """
    queue = predict._get_max_batch_size.__self__._queue  # type: ignore[attr-defined]
    if queue is None:
        return
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_ignore_cancelled)
    queue._handle_batch_task.cancel()
    await asyncio.sleep(0)  # let the cancellation land: no batch is formed after this
    if queue.tasks:
        await asyncio.wait(set(queue.tasks), timeout=timeout_s)


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def batched_batcher(fn: ListFn, setting: Setting) -> tuple[Predict, Callable[[], None]]:
    """``batched.aio.dynamically`` around a list function, and a function that stops it."""
    aio = _import("batched.aio")
    processor = aio.AsyncBatchProcessor(fn, batch_size=setting.batch_size, timeout_ms=setting.fixed_wait_ms)

    def stop() -> None:
        if processor._task is not None:
            processor._task.cancel()

    predict: Predict = processor.__call__
    return predict, stop


def _ray_variant(setting: Setting, *, offload: bool) -> Variant:
    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Predict]:
        async def inline(items: list[Any]) -> list[Any]:
            return model.run_list(items)

        async def in_thread(items: list[Any]) -> list[Any]:
            return await asyncio.to_thread(model.run_list, items)

        predict = ray_serve_batcher(in_thread if offload else inline, setting)
        try:
            yield predict
        finally:
            await stop_ray_serve_batcher(predict)

    name = "ray-serve-thread" if offload else "ray-serve-inline"
    return Variant(f"{name}[{setting.label}]", name, serve, setting)


def _batched_variant(setting: Setting) -> Variant:
    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Predict]:
        predict, stop = batched_batcher(model.run_list, setting)
        try:
            yield predict
        finally:
            stop()

    return Variant(f"batched[{setting.label}]", "batched", serve, setting)


def _missing(module: str) -> str | None:
    """Why ``module`` cannot be used, or None when it imports."""
    try:
        _import(module)
    except Exception as exc:  # an ImportError, or a broken install raising anything
        return f"{module} is not importable ({type(exc).__name__}: {exc}); {install_hint('peers')}"
    return None


def peer_variants(setting: Setting, wanted: set[str]) -> tuple[list[Variant], dict[str, str]]:
    """The peers in ``wanted`` that can run here, and a reason for each one skipped."""
    builders: dict[str, tuple[str, Callable[[], Variant]]] = {
        "ray-serve-inline": ("ray.serve", lambda: _ray_variant(setting, offload=False)),
        "ray-serve-thread": ("ray.serve", lambda: _ray_variant(setting, offload=True)),
        "batched": ("batched.aio", lambda: _batched_variant(setting)),
    }
    variants: list[Variant] = []
    skipped: dict[str, str] = {}
    for family, (module, build) in builders.items():
        if family not in wanted:
            continue
        reason = _missing(module)
        if reason is None:
            variants.append(build())
        else:
            skipped[family] = reason
    return variants, skipped


PEERS = ("ray-serve-inline", "ray-serve-thread", "batched")
