"""Per-request cost of batching machinery: an identity model and 20,000 concurrent requests.

Shared by ``test_machinery.py`` (pytest-benchmark) and ``profile_machinery.py``.
Every batcher gets the same settings and a batch function that returns its list
of inputs unchanged, so all that is measured is queueing, waking and answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import batchkit
from batchkit.bench._floor import FloorBatcher
from batchkit.bench._peers import batched_batcher, ray_serve_batcher
from batchkit.bench._variants import Setting

REQUESTS = 20_000
SETTING = Setting(wait_ms=1.0, batch_size=256)

Round = Callable[[], Awaitable[None]]
"""Sends REQUESTS concurrent requests through a fresh batcher and checks the answers."""


def identity(items: list[Any]) -> list[Any]:
    return items


async def async_identity(items: list[Any]) -> list[Any]:
    return items


async def _send_all(predict: Callable[[int], Awaitable[Any]]) -> None:
    results = await asyncio.gather(*(predict(i) for i in range(REQUESTS)))
    assert results[-1] == REQUESTS - 1


async def client_only() -> None:
    """No batcher at all: what the client side (one task per request, gather) costs by itself."""

    async def echo(x: int) -> int:
        return x

    await _send_all(echo)


async def batchkit_sync() -> None:
    """batchkit as it runs a synchronous model: on its worker thread."""
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        identity, collate=None, max_batch_size=SETTING.batch_size, max_wait_ms=SETTING.wait_ms, max_queue_size=REQUESTS
    )
    async with batcher:
        await _send_all(batcher.predict)


async def batchkit_timeout() -> None:
    """batchkit with a per-call ``timeout_ms`` on every request (deadlines kept by the scheduler)."""
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        identity, collate=None, max_batch_size=SETTING.batch_size, max_wait_ms=SETTING.wait_ms, max_queue_size=REQUESTS
    )
    async with batcher:
        await _send_all(lambda i: batcher.predict(i, timeout_ms=60_000))


async def batchkit_async() -> None:
    """batchkit with an ``async`` batch function, awaited on the event loop (no thread hop)."""
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        async_identity,
        collate=None,
        max_batch_size=SETTING.batch_size,
        max_wait_ms=SETTING.wait_ms,
        max_queue_size=REQUESTS,
    )
    async with batcher:
        await _send_all(batcher.predict)


async def batchkit_dedup() -> None:
    """batchkit with ``dedup_key`` and every input distinct: what sharing costs when nothing repeats."""
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        identity,
        collate=None,
        max_batch_size=SETTING.batch_size,
        max_wait_ms=SETTING.wait_ms,
        max_queue_size=REQUESTS,
        dedup_key=int,
    )
    async with batcher:
        await _send_all(batcher.predict)


async def floor() -> None:
    """The minimal queue-and-futures batcher, batch function in an executor thread."""
    batcher = FloorBatcher(identity, max_batch_size=SETTING.batch_size, max_wait_ms=SETTING.fixed_wait_ms)
    try:
        await _send_all(batcher.predict)
    finally:
        await batcher.aclose()


async def ray_serve() -> None:
    """``@serve.batch`` on an ``async`` identity, on the event loop (how it is meant to be used)."""
    await _send_all(ray_serve_batcher(async_identity, SETTING))


async def batched() -> None:
    """``batched.aio`` with a synchronous identity, which it runs through ``asyncio.to_thread``."""
    predict, stop = batched_batcher(identity, SETTING)
    try:
        await _send_all(predict)
    finally:
        stop()


ROUNDS: dict[str, Round] = {
    "client-only": client_only,
    "batchkit": batchkit_sync,
    "batchkit-timeout": batchkit_timeout,
    "batchkit-async-fn": batchkit_async,
    "batchkit-dedup": batchkit_dedup,
    "floor": floor,
    "ray-serve": ray_serve,
    "batched": batched,
}
PEERS = {"ray-serve": "ray.serve", "batched": "batched.aio"}
