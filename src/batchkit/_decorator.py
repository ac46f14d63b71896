"""``@batchkit.batch``: turn a model function (or method) into a Batcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from ._batcher import DEFAULT_MAX_QUEUE_SIZE, Batcher
from ._collate import CollateArg

__all__ = ["batch"]


@overload
def batch(fn: Callable[[Any], Any], /) -> Batcher[Any, Any]: ...


@overload
def batch(
    *,
    max_batch_size: int = ...,
    max_wait_ms: float = ...,
    max_queue_size: int = ...,
    timeout_ms: float | None = ...,
    collate: CollateArg = ...,
    name: str | None = ...,
) -> Callable[[Callable[[Any], Any]], Batcher[Any, Any]]: ...


def batch(
    fn: Callable[[Any], Any] | None = None,
    /,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 2.0,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    timeout_ms: float | None = None,
    collate: CollateArg = "auto",
    name: str | None = None,
) -> Batcher[Any, Any] | Callable[[Callable[[Any], Any]], Batcher[Any, Any]]:
    """Decorate a batch function so that callers can call it one sample at a time.

    ::

        @batchkit.batch(max_batch_size=64, max_wait_ms=2)
        def embed(batch: np.ndarray) -> np.ndarray:
            return model(batch)

        vector = await embed(text_ids)          # same as await embed.predict(text_ids)

    The result is a :class:`Batcher` with the given options (the same as the
    ``Batcher`` constructor's). On a method, every instance gets its own batcher
    with ``self`` bound, created on first access. ``@batchkit.batch`` without
    parentheses uses the defaults.
    """
    options: dict[str, Any] = {
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_queue_size": max_queue_size,
        "timeout_ms": timeout_ms,
        "collate": collate,
        "name": name,
    }

    def decorate(function: Callable[[Any], Any]) -> Batcher[Any, Any]:
        return Batcher(function, **options)

    if fn is not None:
        return decorate(fn)
    return decorate
