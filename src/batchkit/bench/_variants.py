"""The ways of serving one request that the benchmark compares.

A variant turns the model into ``predict(x) -> awaitable output`` for the
length of one measurement (``async with variant.serve(model) as predict``).
``offline-ideal`` is not one of them: it has no callers, only a loop over full
batches, and is measured by ``_loads.run_offline``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import batchkit

from ._floor import FloorBatcher
from ._model import Model

__all__ = ["Predict", "Setting", "Variant", "batchkit_variant", "core_variants", "floor_variant"]

Predict = Callable[[Any], Awaitable[Any]]
Serve = Callable[[Model], AbstractAsyncContextManager[Predict]]


@dataclass(frozen=True)
class Setting:
    """Batching knobs: ``max_wait_ms`` (a number, or batchkit's ``"auto"``) and ``max_batch_size``."""

    wait_ms: float | Literal["auto"]
    batch_size: int

    @property
    def label(self) -> str:
        wait = self.wait_ms if self.wait_ms == "auto" else f"{self.wait_ms:g}"
        return f"w={wait},b={self.batch_size}"

    @property
    def fixed_wait_ms(self) -> float:
        """The wait for batchers that only take a number (the floor and the peers)."""
        if self.wait_ms == "auto":
            raise ValueError("only batchkit takes max_wait_ms='auto'")
        return self.wait_ms

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"2:64"`` is ``max_wait_ms=2, max_batch_size=64``; ``"auto:64"`` uses batchkit's adaptive wait."""
        wait, _, size = text.partition(":")
        return cls("auto" if wait == "auto" else float(wait), int(size))


@dataclass(frozen=True)
class Variant:
    """A named way to serve requests; ``family`` groups the curves of a plot."""

    name: str
    family: str
    serve: Serve
    setting: Setting | None = None


@asynccontextmanager
async def _naive_inline(model: Model) -> AsyncIterator[Predict]:
    async def predict(x: Any) -> Any:
        return model.run_one(x)  # blocks the event loop for the whole model call

    yield predict


@asynccontextmanager
async def _naive_thread(model: Model) -> AsyncIterator[Predict]:
    async def predict(x: Any) -> Any:
        return await asyncio.to_thread(model.run_one, x)

    yield predict


def batchkit_variant(setting: Setting) -> Variant:
    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Predict]:
        batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(
            model, max_batch_size=setting.batch_size, max_wait_ms=setting.wait_ms, name="bench"
        )
        async with batcher:
            yield batcher.predict

    return Variant(f"batchkit[{setting.label}]", "batchkit", serve, setting)


def floor_variant(setting: Setting) -> Variant:
    @asynccontextmanager
    async def serve(model: Model) -> AsyncIterator[Predict]:
        floor = FloorBatcher(model.run_list, max_batch_size=setting.batch_size, max_wait_ms=setting.fixed_wait_ms)
        try:
            yield floor.predict
        finally:
            await floor.aclose()

    return Variant(f"floor[{setting.label}]", "floor", serve, setting)


def core_variants(settings: list[Setting], reference: Setting) -> list[Variant]:
    """Naive baselines, batchkit at each setting, and the floor batcher at the reference one."""
    return [
        Variant("naive-inline", "naive-inline", _naive_inline),
        Variant("naive-thread", "naive-thread", _naive_thread),
        *(batchkit_variant(setting) for setting in settings),
        floor_variant(reference),
    ]
