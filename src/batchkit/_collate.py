"""Collate and split: many inputs into one batch, one batch of outputs back into many.

A collator has three jobs:

``key(item)``
    Runs in ``predict``, on the caller's side. It returns a hashable key; only
    requests with equal keys are batched together (same structure, shapes and
    dtypes). It raises ``TypeError`` for an input it cannot batch, so a bad input
    fails for its own caller only and never reaches a batch.
``collate(items)``
    Builds the model's input from the items of one group. Runs on the worker
    thread for synchronous models.
``split(output, n, batch)``
    Cuts the model's output into ``n`` per-request results, checking its length.
    ``batch`` is what ``collate`` returned (padding collators need it).

Auto-collate works on *pytrees*: arrays, tensors and numbers (the leaves), nested
in dicts, tuples, lists, namedtuples and dataclasses. Leaves are stacked on a new
first axis, containers are rebuilt around them; outputs of the same kinds are
split back leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, Union

import numpy as np

from ._errors import BatchSizeMismatchError, InvalidInputError

__all__ = [
    "AutoCollate",
    "CollateArg",
    "Collator",
    "CustomCollate",
    "ListCollate",
    "make_collator",
    "mismatch_error",
    "not_a_batch_error",
]


class Collator(Protocol):
    """What a batcher needs to turn items into a batch and back.

    Pass an object with these three methods as ``Batcher(collate=...)`` to take
    full control; ``key`` decides which requests may share a batch.
    """

    def key(self, item: Any) -> Hashable:
        """A hashable grouping key for ``item``; raise ``TypeError`` to refuse it.

        A ``TypeError`` reaches the caller as ``batchkit.InvalidInputError``.
        """
        ...

    def collate(self, items: list[Any]) -> Any:
        """The model's input for ``items`` (all with equal keys)."""
        ...

    def split(self, output: Any, n: int, batch: Any) -> Sequence[Any]:
        """``n`` per-request results from the model's ``output`` for ``batch``."""
        ...


CollateArg = Union[
    str,
    None,
    Collator,
    "tuple[Callable[[list[Any]], Any], Callable[[Any], Sequence[Any]]]",
]


def mismatch_error(got: int, want: int) -> BatchSizeMismatchError:
    return BatchSizeMismatchError(
        f"the model returned a batch of {got} outputs for a batch of {want} inputs; "
        f"it must return exactly one output per input"
    )


def not_a_batch_error(output: Any, n: int) -> BatchSizeMismatchError:
    return BatchSizeMismatchError(
        f"the model returned {type(output).__qualname__} {output!r:.60}, "
        f"expected a batch of {n} outputs (an array, tensor or sequence)"
    )


def _torch() -> Any:
    """The torch module if the user's program has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


_NUMBER_TYPES = (int, float, bool, np.integer, np.floating, np.bool_)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_BIG_INT_KEY = ("number", "object")


def _leaf_key(item: Any) -> Hashable | None:
    """The key of an array, tensor or number; None if ``item`` is not a leaf."""
    if isinstance(item, np.ndarray):
        return ("numpy", item.shape, item.dtype)
    if isinstance(item, _NUMBER_TYPES):
        if type(item) is int and not _INT64_MIN <= item <= _INT64_MAX:
            return _BIG_INT_KEY  # batched apart, as an object array: never turns its batch-mates into objects
        return ("number", type(item))  # ints with ints, floats with floats: a batch has one dtype
    torch = _torch()
    if torch is not None and isinstance(item, torch.Tensor):
        return ("torch", tuple(item.shape), item.dtype, item.device, item.layout)
    return None


def _is_namedtuple(item: Any) -> bool:
    return isinstance(item, tuple) and hasattr(type(item), "_fields")


def _is_dataclass_instance(item: Any) -> bool:
    return dataclasses.is_dataclass(item) and not isinstance(item, type)


def _numbers_key(item: list[Any]) -> Hashable:
    """A flat list of numbers (a JSON payload) is keyed as the 1-D array it becomes (object
    dtype for integers beyond int64: batched apart from the others)."""
    return ("numbers", len(item), np.asarray(item).dtype)


def _tree_key(item: Any, path: str) -> Hashable:
    leaf = _leaf_key(item)
    if leaf is not None:
        return leaf
    kind = type(item)
    if kind is list and item and all(isinstance(v, _NUMBER_TYPES) for v in item):
        return _numbers_key(item)
    if kind in (list, tuple, dict) and not item:
        where = f" at {path}" if path != "input" else ""
        raise InvalidInputError(f"an empty {kind.__qualname__}{where} has nothing to batch")
    if kind is dict:
        return ("dict", tuple((k, _tree_key(v, f"{path}[{k!r}]")) for k, v in item.items()))
    if _is_namedtuple(item):
        return (kind, tuple(_tree_key(v, f"{path}.{f}") for f, v in zip(kind._fields, item, strict=True)))
    if kind is tuple or kind is list:
        return (kind, tuple(_tree_key(v, f"{path}[{i}]") for i, v in enumerate(item)))
    if _is_dataclass_instance(item):
        return (kind, tuple(_tree_key(getattr(item, f.name), f"{path}.{f.name}") for f in dataclasses.fields(item)))
    where = f" at {path}" if path != "input" else ""
    raise InvalidInputError(
        f"auto-collate cannot batch an input of type {kind.__qualname__}{where}; it batches numpy arrays, "
        "torch tensors and numbers, alone or nested in dicts, tuples, lists, namedtuples and dataclasses. "
        "Give the Batcher collate=None (the model gets a list) or your own collate"
    )


def _stack(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, np.ndarray):
        return np.stack(items)
    if isinstance(first, _NUMBER_TYPES):
        return np.asarray(items)
    torch = _torch()
    if torch is not None and isinstance(first, torch.Tensor):
        return torch.stack(items)
    kind = type(first)
    if kind is list and first and all(isinstance(v, _NUMBER_TYPES) for v in first):
        return np.asarray(items)
    if kind is dict:
        return {k: _stack([item[k] for item in items]) for k in first}
    if _is_namedtuple(first):
        return kind(*(_stack(list(column)) for column in zip(*items, strict=True)))
    if kind is tuple or kind is list:
        return kind(_stack(list(column)) for column in zip(*items, strict=True))
    return dataclasses.replace(
        first, **{f.name: _stack([getattr(item, f.name) for item in items]) for f in dataclasses.fields(first)}
    )


def _rows(output: Any, n: int, views: bool = False) -> Sequence[Any] | None:
    """Split an array or tensor along its first axis; None if ``output`` is neither.

    Each row is a copy that owns its memory (a numpy ``copy()``, a tensor
    ``clone()``), so a result a caller keeps does not keep the rest of its
    batch alive; ``views=True`` returns views into ``output`` instead.
    """
    if isinstance(output, np.ndarray):
        if output.ndim == 0:
            raise not_a_batch_error(output, n)
        if output.shape[0] != n:
            raise mismatch_error(output.shape[0], n)
        if views or output.ndim == 1:
            return list(output)  # the rows of a 1-D array are scalars (or, for dtype=object, the objects)
        return [row.copy() for row in output]
    torch = _torch()
    if torch is not None and isinstance(output, torch.Tensor):
        if output.dim() == 0:
            raise not_a_batch_error(output, n)
        if output.shape[0] != n:
            raise mismatch_error(output.shape[0], n)
        rows: Sequence[Any] = output.unbind(0)
        if views:
            return rows
        return [row.clone() for row in rows]
    return None


def _has_batched_leaves(output: Any) -> bool:
    if _leaf_key(output) is not None:
        return not isinstance(output, _NUMBER_TYPES)
    if isinstance(output, dict):
        return bool(output) and all(_has_batched_leaves(v) for v in output.values())
    if isinstance(output, (tuple, list)):
        return bool(output) and all(v is None or _has_batched_leaves(v) for v in output)
    if _is_dataclass_instance(output):
        return all(_has_batched_leaves(getattr(output, f.name)) for f in dataclasses.fields(output))
    return False


def _unstack(output: Any, n: int, views: bool) -> list[Any]:
    """Per-request structures from a structure of batched leaves."""
    rows = _rows(output, n, views)
    if rows is not None:
        return list(rows)
    if output is None:
        return [None] * n
    kind = type(output)
    if isinstance(output, dict):
        by_key = {k: _unstack(v, n, views) for k, v in output.items()}
        return [kind({k: column[i] for k, column in by_key.items()}) for i in range(n)]
    if _is_namedtuple(output):
        return [kind(*row) for row in zip(*(_unstack(v, n, views) for v in output), strict=True)]
    if isinstance(output, (tuple, list)):
        return [kind(row) for row in zip(*(_unstack(v, n, views) for v in output), strict=True)]
    if _is_dataclass_instance(output):
        names = [f.name for f in dataclasses.fields(output)]
        columns = [_unstack(getattr(output, name), n, views) for name in names]
        return [dataclasses.replace(output, **dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
    raise not_a_batch_error(output, n)


def split_sequence(output: Any, n: int) -> Sequence[Any]:
    """Check that ``output`` is a sequence of ``n`` per-request results."""
    if isinstance(output, (list, tuple)):
        results: Sequence[Any] = output
    elif isinstance(output, (str, bytes, dict)) or not hasattr(output, "__iter__"):
        raise not_a_batch_error(output, n)
    else:
        results = list(output)
    if len(results) != n:
        raise mismatch_error(len(results), n)
    return results


class AutoCollate:
    """Stack arrays, tensors and numbers, alone or nested, on a new first axis.

    Inputs are keyed by structure and by each leaf's shape and dtype (and device,
    for tensors), so only inputs that can be stacked share a batch. Numbers
    become 1-D numpy arrays, and flat lists of numbers (JSON payloads) rows of a
    2-D array; both are keyed by the dtype they become (ints apart from floats,
    integers beyond int64 in object arrays of their own), so one caller's input
    never changes the dtype its batch-mates' model sees. An empty list, tuple
    or dict has nothing to stack and is refused. The output is split along its
    first axis: an array or tensor row by row, a dict, tuple, namedtuple or
    dataclass of batched arrays/tensors leaf by leaf (rebuilding the container
    for each request). A *list* output is taken as the per-request results
    themselves, as is a tuple whose items are not all batched arrays.

    Each row is copied (numpy ``copy()``, tensor ``clone()``) so that a result
    owns its memory: a caller that keeps its result does not keep its batch's
    whole output alive. ``views=True`` returns views into the output instead
    (cheaper, for callers that drop results at once).
    """

    def __init__(self, *, views: bool = False) -> None:
        self.views = views

    def key(self, item: Any) -> Hashable:
        kind = type(item)
        if kind is np.ndarray:  # the hot paths, first
            return ("numpy", item.shape, item.dtype)
        torch = _torch()
        if torch is not None and kind is torch.Tensor:  # torch.Size hashes and compares as the tuple
            return ("torch", item.shape, item.dtype, item.device, item.layout)
        return _tree_key(item, "input")

    def collate(self, items: list[Any]) -> Any:
        return _stack(items)

    def split(self, output: Any, n: int, batch: Any) -> Sequence[Any]:
        rows = _rows(output, n, self.views)
        if rows is not None:
            return rows
        if isinstance(output, list) or not _has_batched_leaves(output):
            return split_sequence(output, n)
        return _unstack(output, n, self.views)


class ListCollate:
    """``collate=None``: the model receives a list of inputs and returns a sequence."""

    def key(self, item: Any) -> Hashable:
        return None

    def collate(self, items: list[Any]) -> Any:
        return items

    def split(self, output: Any, n: int, batch: Any) -> Sequence[Any]:
        return split_sequence(output, n)


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

    def split(self, output: Any, n: int, batch: Any) -> Sequence[Any]:
        return split_sequence(self._split(output), n)


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
