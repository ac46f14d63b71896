"""Structured inputs and outputs (pytrees) and variable-length sequences."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import batchkit
from batchkit._collate import AutoCollate
from tests.test_batching import gather, gather_settled

pytestmark = pytest.mark.anyio


class Pair(NamedTuple):
    left: Any
    right: Any


@dataclasses.dataclass
class Features:
    image: Any
    scale: float


async def test_nested_dict_inputs_are_stacked_leaf_by_leaf_and_outputs_split_back() -> None:
    seen = []

    def model(batch: dict[str, Any]) -> dict[str, Any]:
        seen.append({k: (type(v).__name__, tuple(v.shape)) for k, v in batch["x"].items()} | {"n": batch["n"].shape})
        return {"sum": batch["x"]["a"].sum(axis=1) + batch["n"], "echo": batch["x"]["b"]}

    inputs = [{"x": {"a": np.full(3, i), "b": torch.full((2,), float(i))}, "n": i} for i in range(5)]
    async with batchkit.Batcher(model, max_batch_size=8, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    assert seen == [{"a": ("ndarray", (5, 3)), "b": ("Tensor", (5, 2)), "n": (5,)}]
    for i, r in enumerate(results):
        assert set(r) == {"sum", "echo"}
        assert r["sum"] == 4 * i
        assert torch.equal(r["echo"], torch.full((2,), float(i)))


async def test_namedtuple_dataclass_and_tuple_round_trip() -> None:
    def model(batch: tuple[Pair, Features]) -> tuple[Pair, Features]:
        pair, feats = batch
        assert isinstance(pair, Pair)
        assert isinstance(feats, Features)
        return Pair(pair.left * 2, pair.right), Features(feats.image + 1, feats.scale * 10)

    inputs = [(Pair(np.array([i]), np.array([-i])), Features(np.zeros(2) + i, float(i))) for i in range(4)]
    async with batchkit.Batcher(model, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    for i, (pair, feats) in enumerate(results):
        assert isinstance(pair, Pair)
        assert isinstance(feats, Features)
        assert pair.left.tolist() == [2 * i]
        assert pair.right.tolist() == [-i]
        assert feats.image.tolist() == [i + 1, i + 1]
        assert feats.scale == 10.0 * i


async def test_structures_that_differ_are_batched_apart() -> None:
    sizes = []

    def model(batch: dict[str, Any]) -> list[int]:
        sizes.append(sorted(batch))
        return [len(batch)] * len(next(iter(batch.values())))

    inputs = [{"a": 1}, {"b": 1}, {"a": 2}, {"a": np.zeros(2)}]
    async with batchkit.Batcher(model, max_wait_ms=20) as batcher:
        await gather(batcher, inputs)
    assert sorted(sizes) == [["a"], ["a"], ["b"]]  # {"a": number} x2, {"a": array}, {"b": ...}


def test_unbatchable_leaf_names_its_path() -> None:
    auto = AutoCollate()
    with pytest.raises(TypeError, match=r"type str at input\['x'\]\[1\]"):
        auto.key({"x": (np.zeros(1), "oops")})
    with pytest.raises(TypeError, match=r"type NoneType at input.scale"):
        auto.key(Features(np.zeros(1), None))


async def test_a_list_output_is_taken_as_per_request_results() -> None:
    async with batchkit.Batcher(lambda b: [f"r{x}" for x in b.tolist()], max_wait_ms=20) as batcher:
        assert sorted(await gather(batcher, [1, 2, 3])) == ["r1", "r2", "r3"]


async def test_a_structured_output_with_a_wrong_batch_axis_is_a_mismatch() -> None:
    async with batchkit.Batcher(lambda b: {"y": b[:-1]}, max_wait_ms=20) as batcher:
        outcomes = await gather_settled(batcher, [np.zeros(1), np.ones(1)])
    for outcome in outcomes:
        assert isinstance(outcome, batchkit.BatchSizeMismatchError)
        assert "1 outputs for a batch of 2 inputs" in str(outcome)


async def test_pad_sequences_pads_passes_lengths_and_mask_and_strips() -> None:
    seen: list[batchkit.PaddedBatch] = []

    def model(batch: batchkit.PaddedBatch) -> np.ndarray:
        seen.append(batch)
        return batch.values * 10  # per-position output: keeps the padded time axis

    inputs = [np.arange(1, n + 1) for n in (3, 1, 5, 2)]
    async with batchkit.Batcher(model, max_wait_ms=30, collate=batchkit.pad_sequences(multiple_of=4)) as batcher:
        results = await gather(batcher, inputs)
    assert len(seen) == 1
    batch = seen[0]
    assert sorted(batch.lengths.tolist()) == [1, 2, 3, 5]
    assert batch.values.shape == (4, 8)  # longest 5, rounded up to a multiple of 4
    assert batch.mask.sum() == 11
    assert (batch.values[~batch.mask] == 0).all()
    for x, r in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(r, x * 10)  # padding stripped


async def test_pad_sequences_keeps_per_sequence_outputs_whole() -> None:
    def model(batch: batchkit.PaddedBatch) -> torch.Tensor:
        summed = (batch.values * batch.mask.unsqueeze(-1)).sum(dim=1)
        return summed / batch.lengths.unsqueeze(-1)  # mean over real positions: (batch, features)

    inputs = [torch.ones(n, 3) * n for n in (2, 7, 4)]
    async with batchkit.Batcher(model, max_wait_ms=30, collate=batchkit.pad_sequences(pad_value=-99)) as batcher:
        results = await gather(batcher, inputs)
    for n, r in zip((2, 7, 4), results, strict=True):
        assert torch.allclose(r, torch.full((3,), float(n)))


async def test_pad_sequences_groups_by_features_not_length() -> None:
    widths = []

    def model(batch: batchkit.PaddedBatch) -> np.ndarray:
        widths.append(batch.values.shape[2:])
        return batch.lengths

    inputs = [np.zeros((3, 2)), np.zeros((5, 2)), np.zeros((4, 6))]
    async with batchkit.Batcher(model, max_wait_ms=30, collate=batchkit.pad_sequences()) as batcher:
        results = await gather(batcher, inputs)
    assert [int(r) for r in results] == [3, 5, 4]
    assert sorted(widths) == [(2,), (6,)]


async def test_pad_sequences_refuses_non_sequences_for_that_caller() -> None:
    async with batchkit.Batcher(lambda b: b.lengths, collate=batchkit.pad_sequences()) as batcher:
        with pytest.raises(TypeError, match="pad_sequences"):
            await batcher.predict(3.0)
        assert await batcher.predict(np.zeros(4)) == 4


def test_pad_sequences_options_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple_of"):
        batchkit.pad_sequences(multiple_of=0)
    with pytest.raises(ValueError, match="strip"):
        batchkit.pad_sequences(strip="yes")  # type: ignore[arg-type]


# -- results own their memory: no caller's result keeps its batch alive -----------------


def _batch_free(refs: list[Any]) -> bool:
    gc.collect()
    return all(ref() is None for ref in refs)


async def test_numpy_results_own_their_memory_and_release_the_batch() -> None:
    outputs: list[Any] = []

    def model(batch: np.ndarray) -> np.ndarray:
        out = np.repeat(batch[:, None], 1000, axis=1)  # (n, 1000): the batch's whole output
        outputs.append(weakref.ref(out))
        return out

    async with batchkit.Batcher(model, max_wait_ms=20) as batcher:
        results = await gather(batcher, [float(i) for i in range(8)])
    for i, r in enumerate(results):
        assert r.flags.owndata
        assert r.base is None
        assert r.shape == (1000,)
        assert (r == i).all()
    assert _batch_free(outputs), "a caller's row keeps the whole batch's output alive"


async def test_tensor_results_own_their_memory_and_release_the_batch() -> None:
    outputs: list[Any] = []

    def model(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = batch[:, None].repeat(1, 1000)
        outputs.append(weakref.ref(out))
        return {"y": out, "first": out[:, 0]}

    async with batchkit.Batcher(model, max_wait_ms=20) as batcher:
        results = await gather(batcher, [torch.tensor(float(i)) for i in range(8)])
    for i, r in enumerate(results):
        y = r["y"]
        assert y.untyped_storage().nbytes() == y.numel() * y.element_size()
        assert r["first"].untyped_storage().nbytes() == r["first"].element_size()
        assert bool((y == i).all())
    assert _batch_free(outputs), "a caller's row keeps the whole batch's output alive"


async def test_stripped_and_whole_padded_results_own_their_memory() -> None:
    outputs: list[Any] = []

    def model(batch: batchkit.PaddedBatch) -> np.ndarray:
        out = batch.values * 10
        outputs.append(weakref.ref(out))
        return out

    async with batchkit.Batcher(model, max_wait_ms=30, collate=batchkit.pad_sequences()) as batcher:
        results = await gather(batcher, [np.arange(n, dtype=np.float32) for n in (3, 9, 1)])
    assert [r.tolist() for r in results] == [[0, 10, 20], [10.0 * i for i in range(9)], [0]]
    assert all(r.flags.owndata for r in results)
    assert _batch_free(outputs)

    def per_sequence(batch: batchkit.PaddedBatch) -> torch.Tensor:
        out = batch.values.sum(dim=1, keepdim=True).repeat(1, 100)
        outputs.append(weakref.ref(out))
        return out

    async with batchkit.Batcher(per_sequence, max_wait_ms=30, collate=batchkit.pad_sequences()) as batcher:
        whole = await gather(batcher, [torch.ones(n) for n in (2, 5)])
    assert [r[0].item() for r in whole] == [2.0, 5.0]
    assert all(r.untyped_storage().nbytes() == 100 * 4 for r in whole)
    assert _batch_free(outputs)


def test_views_are_an_opt_in() -> None:
    output = np.arange(12.0).reshape(4, 3)
    assert not any(np.shares_memory(r, output) for r in AutoCollate().split(output, 4, None))
    assert all(np.shares_memory(r, output) for r in AutoCollate(views=True).split(output, 4, None))
    tensor = torch.arange(12.0).reshape(4, 3)
    assert all(r.data_ptr() != tensor[i].data_ptr() for i, r in enumerate(AutoCollate().split(tensor, 4, None)))
    assert all(
        r.data_ptr() == tensor[i].data_ptr() for i, r in enumerate(AutoCollate(views=True).split(tensor, 4, None))
    )


def test_pad_sequences_builds_the_batch_on_the_inputs_device() -> None:
    # the meta device stands in for an accelerator here; see test_torch.py for CUDA
    items = [torch.ones(n, 2, device="meta") for n in (3, 5)]
    batch = batchkit.pad_sequences(multiple_of=4).collate(items)
    assert batch.values.shape == (2, 8, 2)
    assert {batch.values.device.type, batch.lengths.device.type, batch.mask.device.type} == {"meta"}
