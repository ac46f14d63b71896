"""Collate and split: many inputs into one batch, one batch of outputs back into many.

A collator has three jobs:

``key(item)``
    Runs in ``predict``, on the caller's side. It returns a hashable key; only
    requests with equal keys are batched together (same shape, same dtype...).
    It raises ``TypeError`` for an input it cannot batch, so a bad input fails
    for its own caller only and never reaches a batch.
``collate(items)``
    Builds the model's input from the items of one group. Runs on the worker
    thread for synchronous models.
``split(output, n)``
    Cuts the model's output into ``n`` per-request results, checking its length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, Union

import numpy as np

from ._errors import BatchSizeMismatchError

__all__ = ["AutoCollate", "CollateArg", "Collator", "CustomCollate", "ListCollate", "make_collator"]


class Collator(Protocol):
    """What a batcher needs to turn items into a batch and back."""

    def key(self, item: Any) -> Hashable: ...

    def collate(self, items: list[Any]) -> Any: ...

    def split(self, output: Any, n: int) -> Sequence[Any]: ...


CollateArg = Union[
    str,
    None,
    Collator,
    "tuple[Callable[[list[Any]], Any], Callable[[Any], Sequence[Any]]]",
]


def _mismatch(got: int, want: int) -> BatchSizeMismatchError:
    return BatchSizeMismatchError(
        f"the model returned a batch of {got} outputs for a batch of {want} inputs; "
        f"it must return exactly one output per input"
    )


def _torch() -> Any:
    """The torch module if the user's program has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


_NUMBER_TYPES = (int, float, bool, np.integer, np.floating, np.bool_)
_NUMBER_KEY = ("number",)


class AutoCollate:
    """Stack numpy arrays, torch tensors or Python numbers on a new first axis.

    Arrays are grouped by ``(shape, dtype)`` and tensors by
    ``(shape, dtype, device)``; numbers of any kind form one group and become a
    1-D numpy array. The output is split along its first axis: row ``i`` goes to
    request ``i`` (a view for arrays, ``tensor.unbind(0)`` for tensors); a list
    or tuple of outputs is accepted as well.
    """

    def key(self, item: Any) -> Hashable:
        if type(item) is np.ndarray:
            return ("numpy", item.shape, item.dtype)
        if isinstance(item, _NUMBER_TYPES):
            return _NUMBER_KEY
        torch = _torch()
        if torch is not None and isinstance(item, torch.Tensor):
            return ("torch", tuple(item.shape), item.dtype, item.device)
        if isinstance(item, np.ndarray):
            return ("numpy", item.shape, item.dtype)
        raise TypeError(
            f"auto-collate cannot batch an input of type {type(item).__qualname__}; "
            "pass a numpy array, a torch tensor or a number, or give the Batcher "
            "collate=None (the model gets a list) or a custom (collate, split) pair"
        )

    def collate(self, items: list[Any]) -> Any:
        first = items[0]
        if isinstance(first, np.ndarray):
            return np.stack(items)
        if isinstance(first, _NUMBER_TYPES):
            return np.asarray(items)
        torch = _torch()
        assert torch is not None
        return torch.stack(items)

    def split(self, output: Any, n: int) -> Sequence[Any]:
        if isinstance(output, np.ndarray):
            if output.ndim == 0:
                raise _not_a_batch(output, n)
            if output.shape[0] != n:
                raise _mismatch(output.shape[0], n)
            return list(output)
        torch = _torch()
        if torch is not None and isinstance(output, torch.Tensor):
            if output.dim() == 0:
                raise _not_a_batch(output, n)
            if output.shape[0] != n:
                raise _mismatch(output.shape[0], n)
            rows: Sequence[Any] = output.unbind(0)
            return rows
        return _split_sequence(output, n)


def _not_a_batch(output: Any, n: int) -> BatchSizeMismatchError:
    return BatchSizeMismatchError(
        f"the model returned {type(output).__qualname__} {output!r:.60}, "
        f"expected a batch of {n} outputs (an array, tensor or sequence)"
    )


def _split_sequence(output: Any, n: int) -> Sequence[Any]:
    if isinstance(output, (list, tuple)):
        results: Sequence[Any] = output
    elif isinstance(output, (str, bytes, dict)) or not hasattr(output, "__iter__"):
        raise _not_a_batch(output, n)
    else:
        results = list(output)
    if len(results) != n:
        raise _mismatch(len(results), n)
    return results


class ListCollate:
    """``collate=None``: the model receives a list of inputs and returns a sequence."""

    def key(self, item: Any) -> Hashable:
        return None

    def collate(self, items: list[Any]) -> Any:
        return items

    def split(self, output: Any, n: int) -> Sequence[Any]:
        return _split_sequence(output, n)


class CustomCollate:
    """A user's ``(collate, split)`` pair; every input goes into one group."""

    def __init__(
        self,
        collate: Callable[[list[Any]], Any],
        split: Callable[[Any], Sequence[Any]],
    ) -> None:
        self._collate = collate
        self._split = split

    def key(self, item: Any) -> Hashable:
        return None

    def collate(self, items: list[Any]) -> Any:
        return self._collate(items)

    def split(self, output: Any, n: int) -> Sequence[Any]:
        return _split_sequence(self._split(output), n)


def make_collator(collate: CollateArg) -> Collator:
    """Turn the ``collate=`` argument of ``Batcher`` into a collator."""
    if collate == "auto":
        return AutoCollate()
    if collate is None:
        return ListCollate()
    if isinstance(collate, tuple):
        if len(collate) != 2 or not all(callable(f) for f in collate):
            raise TypeError("collate must be a (collate, split) pair of callables")
        return CustomCollate(collate[0], collate[1])
    if isinstance(collate, str):
        raise ValueError(f"collate={collate!r} is not known; use 'auto', None, or a (collate, split) pair")
    if all(callable(getattr(collate, name, None)) for name in ("key", "collate", "split")):
        return collate
    raise TypeError(
        "collate must be 'auto', None, a (collate, split) pair of callables, "
        "or an object with key(), collate() and split() methods"
    )
