"""``@batchkit.batch``: turn a model function (or method) into a Batcher."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, overload

from ._batcher import Batcher, BatcherOptions

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

__all__ = ["batch"]


@overload
def batch(fn: Callable[..., Any], /) -> Batcher[Any, Any]: ...


@overload
def batch(**options: Unpack[BatcherOptions]) -> Callable[[Callable[..., Any]], Batcher[Any, Any]]: ...


def batch(
    fn: Callable[..., Any] | None = None, /, **options: Unpack[BatcherOptions]
) -> Batcher[Any, Any] | Callable[[Callable[..., Any]], Batcher[Any, Any]]:
    """Decorate a batch function so that callers can call it one sample at a time.

    ```python
    @batchkit.batch(max_batch_size=64, max_wait_ms=2)
    def embed(batch: np.ndarray) -> np.ndarray:
        return model(batch)

    vector = await embed(text_ids)          # same as await embed.predict(text_ids)
    ```

    The result is a `Batcher` with the given options (any of the `Batcher`
    constructor's). On a method, every instance gets its own batcher with
    `self` bound, created on first access. `@batchkit.batch` without
    parentheses uses the defaults.
    """

    def decorate(function: Callable[..., Any]) -> Batcher[Any, Any]:
        return Batcher(function, **options)

    if fn is not None:
        return decorate(fn)
    return decorate
