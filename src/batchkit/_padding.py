"""Variable-length sequences: pad to the longest in the batch, strip the padding after.

Stacking needs equal shapes, and sequence models get inputs of every length.
Grouping by exact length would give tiny batches, so ``pad_sequences()`` keys
requests by everything *but* their length (trailing shape, dtype, device), pads
each batch to its longest sequence (rounded up to ``multiple_of``, which keeps the
number of distinct shapes a compiled model sees small), and hands the model a
`PaddedBatch` with the lengths and a mask. Outputs that keep the padded
time axis are cut back to each request's own length.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from ._collate import _rows, mismatch_error, not_a_batch_error
from ._errors import InvalidInputError

__all__ = ["PadSequences", "PaddedBatch", "pad_sequences"]


class PaddedBatch(NamedTuple):
    """What a model served with ``pad_sequences()`` receives.

    All three are numpy arrays when the inputs were arrays, torch tensors when
    they were tensors (on the inputs' device).
    """

    values: Any
    """``(batch, max_length, *features)``: the sequences, padded at the end."""
    lengths: Any
    """``(batch,)`` int64: each sequence's own length."""
    mask: Any
    """``(batch, max_length)`` bool: True on real positions, False on padding."""


class PadSequences:
    """A collator for sequences of different lengths (see `pad_sequences`)."""

    def __init__(self, *, pad_value: float = 0, multiple_of: int = 1, strip: Literal["auto"] | bool = "auto") -> None:
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
        if strip not in ("auto", True, False):
            raise ValueError(f"strip must be 'auto', True or False, got {strip!r}")
        self.pad_value = pad_value
        self.multiple_of = multiple_of
        self.strip = strip

    def key(self, item: Any) -> Hashable:
        if isinstance(item, np.ndarray) and item.ndim >= 1:
            return ("numpy", item.shape[1:], item.dtype)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(item, torch.Tensor) and item.dim() >= 1:
            return ("torch", tuple(item.shape[1:]), item.dtype, item.device)
        raise InvalidInputError(
            f"pad_sequences() batches numpy arrays or torch tensors of shape (length, ...), "
            f"got {type(item).__qualname__} {getattr(item, 'shape', '')}".rstrip()
        )

    def _padded_length(self, longest: int) -> int:
        m = self.multiple_of
        return max(m, -(-longest // m) * m)

    def collate(self, items: list[Any]) -> PaddedBatch:
        lengths = [len(item) for item in items]
        width = self._padded_length(max(lengths))
        first = items[0]
        if isinstance(first, np.ndarray):
            values = np.full((len(items), width, *first.shape[1:]), self.pad_value, dtype=first.dtype)
            for row, item in zip(values, items, strict=True):
                row[: len(item)] = item
            lengths_array = np.asarray(lengths, dtype=np.int64)
            mask = np.arange(width)[None, :] < lengths_array[:, None]
            return PaddedBatch(values, lengths_array, mask)
        torch = sys.modules["torch"]
        device = first.device  # built where the inputs are: no round trip through the host for CUDA inputs
        values = torch.full((len(items), width, *first.shape[1:]), self.pad_value, dtype=first.dtype, device=device)
        for row, item in zip(values, items, strict=True):
            row[: len(item)] = item
        lengths_tensor = torch.tensor(lengths, dtype=torch.int64, device=device)
        mask = torch.arange(width, device=device)[None, :] < lengths_tensor[:, None]
        return PaddedBatch(values, lengths_tensor, mask)

    def split(self, output: Any, n: int, batch: PaddedBatch) -> Sequence[Any]:
        shape = getattr(output, "shape", None)
        if shape is None:
            raise not_a_batch_error(output, n)
        if len(shape) == 0:
            raise not_a_batch_error(output, n)
        if shape[0] != n:
            raise mismatch_error(shape[0], n)
        width = batch.values.shape[1]
        keeps_time_axis = len(shape) >= 2 and shape[1] == width
        if self.strip is True and not keeps_time_axis:
            raise ValueError(
                f"pad_sequences(strip=True): the output's second axis has {shape[1] if len(shape) > 1 else 'no'} "
                f"positions, expected the padded length {width}"
            )
        if self.strip is False or not keeps_time_axis:
            rows = _rows(output, n)
            return list(output) if rows is None else rows
        # Each result is a copy: a kept result must not keep the whole padded output alive.
        lengths = batch.lengths.tolist()  # one read of the lengths, not one per row (a sync each on CUDA)
        if isinstance(output, np.ndarray):
            return [output[i, :length].copy() for i, length in enumerate(lengths)]
        if hasattr(output, "clone"):
            return [output[i, :length].clone() for i, length in enumerate(lengths)]
        return [output[i, :length] for i, length in enumerate(lengths)]


def pad_sequences(
    *, pad_value: float = 0, multiple_of: int = 1, strip: Literal["auto"] | bool = "auto"
) -> PadSequences:
    """A collator that batches sequences of different lengths by padding them.

    ```python
    batcher = Batcher(model, collate=batchkit.pad_sequences(multiple_of=8))
    await batcher.predict(np.array([3, 1, 4]))        # token ids of any length
    ```

    Each input is an array or tensor of shape ``(length, *features)``; inputs
    with equal features and dtype share batches whatever their lengths. The model
    receives a `PaddedBatch` ``(values, lengths, mask)``.

    Args:
        pad_value: what padded positions hold.
        multiple_of: pad the time axis up to a multiple of this (fewer distinct
            shapes for ``torch.compile`` or CUDA graphs).
        strip: whether each request's output is cut back to its own length.
            ``"auto"`` strips outputs whose second axis is the padded length
            (per-position outputs, such as token logits) and leaves others (one
            vector per sequence) as they are.
    """
    return PadSequences(pad_value=pad_value, multiple_of=multiple_of, strip=strip)
