"""Auto-collate, list collate and custom collate, as seen by a caller."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import batchkit
from batchkit._collate import AutoCollate
from tests.conftest import RecordingModel
from tests.test_batching import gather

pytestmark = pytest.mark.anyio


async def test_numpy_arrays_are_stacked_on_a_new_first_axis_and_split_back() -> None:
    model = RecordingModel(lambda b: b.sum(axis=(1, 2)))
    seen_shapes = []

    def fn(batch: np.ndarray) -> np.ndarray:
        seen_shapes.append((batch.shape, batch.dtype))
        return model(batch)  # type: ignore[no-any-return]

    inputs = [np.full((2, 3), i, dtype=np.float32) for i in range(5)]
    async with batchkit.Batcher(fn, max_batch_size=8, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    assert seen_shapes == [((5, 2, 3), np.dtype(np.float32))]
    assert [float(r) for r in results] == [6.0 * i for i in range(5)]


async def test_numpy_outputs_are_rows_of_the_output() -> None:
    async with batchkit.Batcher(lambda b: np.stack([b, -b], axis=1), max_wait_ms=20) as batcher:
        results = await gather(batcher, [np.arange(3) + i for i in range(4)])
    for i, r in enumerate(results):
        assert r.shape == (2, 3)
        np.testing.assert_array_equal(r[1], -(np.arange(3) + i))


async def test_torch_tensors_are_stacked_and_split() -> None:
    seen = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape))
        return batch * 2

    inputs = [torch.full((3,), float(i)) for i in range(6)]
    async with batchkit.Batcher(fn, max_batch_size=16, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    assert seen == [(6, 3)]
    for i, r in enumerate(results):
        assert isinstance(r, torch.Tensor)
        assert torch.equal(r, torch.full((3,), 2.0 * i))


async def test_python_numbers_become_a_1d_array() -> None:
    seen = []

    def fn(batch: np.ndarray) -> np.ndarray:
        seen.append((batch.ndim, batch.dtype.kind))
        return batch * 2

    async with batchkit.Batcher(fn, max_batch_size=16, max_wait_ms=20) as batcher:
        results = await gather(batcher, [1.5, 2, 3.25, 4])
    assert sorted(seen) == [(1, "f"), (1, "i")]  # floats with floats, ints with ints
    assert results == [3.0, 4, 6.5, 8]


async def test_inputs_of_different_shapes_are_batched_separately_not_rejected() -> None:
    shapes = []

    def fn(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return batch.sum(axis=1)

    inputs = [np.ones(2), np.ones(3), np.ones(2), np.ones(3, dtype=np.int32), np.ones(3)]
    async with batchkit.Batcher(fn, max_batch_size=8, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    assert [float(r) for r in results] == [2.0, 3.0, 2.0, 3.0, 3.0]
    assert sorted(shapes) == [(1, 3), (2, 2), (2, 3)]  # int32 and float64 never mixed


def test_auto_key_separates_shape_dtype_and_kind() -> None:
    auto = AutoCollate()
    assert auto.key(np.zeros(3)) == auto.key(np.ones(3))
    assert auto.key(np.zeros(3)) != auto.key(np.zeros(4))
    assert auto.key(np.zeros(3)) != auto.key(np.zeros(3, dtype=np.float32))
    assert auto.key(torch.zeros(3)) != auto.key(np.zeros(3, dtype=np.float32))
    assert auto.key(1) == auto.key(2)
    assert auto.key(1.5) == auto.key(2.5)
    assert len({auto.key(1), auto.key(2.5), auto.key(np.float32(1)), auto.key(2**70)}) == 4
    for bad in ["s", None, [1, "x"], {"a": None}, object(), 1j]:
        with pytest.raises(TypeError, match="auto-collate cannot batch"):
            auto.key(bad)


async def test_collate_none_passes_a_list_and_takes_any_sequence_back() -> None:
    seen = []

    def fn(batch: list[Any]) -> Any:
        seen.append(batch)
        return (f"<{x}>" for x in batch)  # a generator is fine

    async with batchkit.Batcher(fn, max_batch_size=8, max_wait_ms=20, collate=None) as batcher:
        results = await gather(batcher, ["a", {"k": 1}, None])
    assert isinstance(seen[0], list)
    assert sorted(results) == sorted(["<a>", "<{'k': 1}>", "<None>"])


async def test_custom_collate_pair() -> None:
    def collate(items: list[str]) -> str:
        return "|".join(items)

    def split(output: str) -> list[str]:
        return output.split("|")

    async with batchkit.Batcher(str.upper, max_wait_ms=20, collate=(collate, split)) as batcher:
        results = await gather(batcher, ["ab", "cd", "ef"])
    assert results == ["AB", "CD", "EF"]


async def test_custom_collator_object_with_a_grouping_key() -> None:
    class ByLength:
        def key(self, item: str) -> int:
            return len(item)

        def collate(self, items: list[str]) -> list[str]:
            assert len({len(i) for i in items}) == 1  # only equal lengths together
            return items

        def split(self, output: list[str], n: int, batch: list[str]) -> list[str]:
            return output

    async with batchkit.Batcher(lambda b: [s[::-1] for s in b], max_wait_ms=20, collate=ByLength()) as batcher:
        results = await gather(batcher, ["ab", "abc", "cd", "xyz"])
    assert results == ["ba", "cba", "dc", "zyx"]


async def test_collate_failure_reaches_the_callers_of_that_batch() -> None:
    def collate(items: list[Any]) -> Any:
        raise ValueError("cannot collate these")

    async with batchkit.Batcher(lambda b: b, collate=(collate, list)) as batcher:
        with pytest.raises(ValueError, match="cannot collate these"):
            await batcher.predict(1)
        assert batcher.stats().failed == 1


def test_bad_collate_pair_is_rejected() -> None:
    with pytest.raises(TypeError, match="pair of callables"):
        batchkit.Batcher(lambda b: b, collate=(list, 3))  # type: ignore[arg-type]
