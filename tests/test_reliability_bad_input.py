"""Bad input: a caller's odd input is that caller's problem, never its batch-mates'.

Un-batchable inputs fail in ``predict`` itself with ``TypeError`` before they
are queued; inputs of different shapes or dtypes are batched apart; NaN, empty
arrays and huge arrays are data like any other and pass through untouched.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchkit
from tests._reliability import BACKENDS, Outcome, call, check_invariant, check_settled, wait_until

EXAMPLES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class ShapeExplodes:
    """Looks like an array until you ask for its shape."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise RuntimeError("shape exploded")

    dtype = np.dtype("float64")


class ArrayLike:
    """Convertible with np.asarray, but not an array: auto-collate does not guess."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.zeros(2)


UNBATCHABLE: dict[str, Any] = {
    "str": "not an array",
    "bytes": b"\x00\x01",
    "none": None,
    "object": object(),
    "complex": 1j,
    "numpy-complex": np.complex128(1 + 2j),
    "set": {1, 2},
    "function": len,
    "shape-explodes": ShapeExplodes(),
    "array-like": ArrayLike(),
    "str-in-a-list": [np.zeros(2), "x"],
}


class Recorder:
    """``x * 2`` on whatever batch it gets, remembering the batches' shapes and dtypes."""

    def __init__(self) -> None:
        self.batches: list[tuple[tuple[int, ...], Any]] = []

    def __call__(self, batch: Any) -> Any:
        self.batches.append((tuple(batch.shape), batch.dtype))
        return batch * 2


async def gather(batcher: batchkit.Batcher[Any, Any], inputs: list[Any], **kwargs: Any) -> list[Outcome]:
    outcomes: list[Outcome] = [("missing", None)] * len(inputs)

    async def one(i: int) -> None:
        outcomes[i] = await call(batcher, inputs[i], **kwargs)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(one, i)
    return outcomes


# -- un-batchable inputs ----------------------------------------------------------


@dataclass(frozen=True)
class Mixed:
    items: tuple[str | int, ...]  # a name from UNBATCHABLE, or a good input's value


mixed_inputs = st.builds(
    Mixed, items=st.lists(st.one_of(st.sampled_from(sorted(UNBATCHABLE)), st.integers(0, 99)), max_size=20).map(tuple)
)


async def run_mixed(case: Mixed) -> None:
    model = Recorder()
    inputs = [UNBATCHABLE[x] if isinstance(x, str) else np.full(3, float(x)) for x in case.items]
    async with batchkit.Batcher[Any, Any](model, max_batch_size=8, max_wait_ms=5) as batcher:
        outcomes = await gather(batcher, inputs)
    bad = 0
    for x, (kind, value) in zip(case.items, outcomes, strict=True):
        if isinstance(x, str):
            bad += 1
            assert type(value) is batchkit.InvalidInputError, (x, kind, value)
        else:
            assert kind == "value", (x, value)
            np.testing.assert_array_equal(value, np.full(3, 2.0 * x))
    assert all(shape[1:] == (3,) for shape, _ in model.batches)  # no bad input reached the model
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.failed) == (len(inputs) - bad, bad)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(case=mixed_inputs)
def test_unbatchable_inputs_fail_alone_wherever_they_are(backend: str, case: Mixed) -> None:
    """Strings, None, objects, complex numbers, sets, array-likes, containers with a bad
    leaf, objects whose ``shape`` raises, hidden at random among good arrays: each
    fails in its own ``predict`` with ``TypeError``, never reaches the model, and
    every good input gets its own value."""
    anyio.run(run_mixed, case, backend=backend)


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(UNBATCHABLE))
async def test_each_unbatchable_input_gets_a_clear_type_error(name: str) -> None:
    """The ``TypeError`` names the type it cannot batch and what to do instead."""
    async with batchkit.Batcher[Any, Any](lambda b: b, max_wait_ms=1) as batcher:
        outcome = await call(batcher, UNBATCHABLE[name])
        assert await batcher.predict(np.ones(2)) is not None  # still serving
    assert type(outcome[1]) is batchkit.InvalidInputError
    assert "auto-collate cannot batch" in str(outcome[1])
    assert "collate=None" in str(outcome[1])
    check_settled(batcher.stats())


class ExplodingArray(np.ndarray):
    """A real ndarray subclass whose ``shape`` raises."""

    @property  # type: ignore[misc]
    def shape(self) -> tuple[int, ...]:
        raise RuntimeError("shape exploded")


@pytest.mark.anyio
async def test_an_array_whose_shape_raises_fails_only_its_own_call() -> None:
    """An ndarray subclass that raises when its shape is read fails its own ``predict``
    with that error; concurrent good inputs are answered."""
    bad = np.zeros(3).view(ExplodingArray)
    async with batchkit.Batcher[Any, Any](Recorder(), max_batch_size=8, max_wait_ms=10) as batcher:
        outcomes = await gather(batcher, [np.ones(3), bad, np.full(3, 2.0)])
    assert type(outcomes[1][1]) is RuntimeError
    np.testing.assert_array_equal(outcomes[0][1], np.full(3, 2.0))
    np.testing.assert_array_equal(outcomes[2][1], np.full(3, 4.0))
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.failed) == (2, 1)


# -- NaN, empty and huge ------------------------------------------------------------


@pytest.mark.anyio
async def test_nan_and_inf_pass_through_as_data() -> None:
    """batchkit does not judge values: NaN and infinities come back as NaN and infinities,
    for arrays, Python floats and tensors alike, and do not disturb batch-mates."""
    async with batchkit.Batcher[Any, Any](lambda b: b * 2, max_batch_size=8, max_wait_ms=10) as batcher:
        arrays = await gather(batcher, [np.array([np.nan, 1.0, np.inf]), np.array([1.0, 2.0, 3.0])])
        numbers = await gather(batcher, [float("nan"), 1.5, -math.inf])
        tensors = await gather(batcher, [torch.tensor([float("nan"), 1.0]), torch.tensor([2.0, 3.0])])
    nan_row = arrays[0][1]
    assert np.isnan(nan_row[0])
    assert nan_row[1] == 2.0
    assert nan_row[2] == np.inf
    np.testing.assert_array_equal(arrays[1][1], [2.0, 4.0, 6.0])
    assert math.isnan(numbers[0][1])
    assert numbers[1][1] == 3.0
    assert numbers[2][1] == -math.inf
    assert torch.isnan(tensors[0][1][0])
    assert tensors[0][1][1] == 2.0
    assert torch.equal(tensors[1][1], torch.tensor([4.0, 6.0]))
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_empty_arrays_are_batched_and_returned_empty() -> None:
    """Inputs of shape (0,) and (3, 0) form their own batches and come back with their
    own (empty) shapes; non-empty batch-mates are unaffected."""
    model = Recorder()
    inputs = [np.zeros(0), np.zeros(0), np.zeros((3, 0)), np.arange(2.0), np.zeros(0)]
    async with batchkit.Batcher[Any, Any](model, max_batch_size=8, max_wait_ms=10) as batcher:
        outcomes = await gather(batcher, inputs)
    for x, (kind, value) in zip(inputs, outcomes, strict=True):
        assert kind == "value"
        assert value.shape == x.shape
        np.testing.assert_array_equal(value, x * 2)
    assert sorted(model.batches, key=repr) == sorted(
        [((3, 0), np.dtype("float64")), ((1, 3, 0), np.dtype("float64")), ((1, 2), np.dtype("float64"))], key=repr
    )
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_huge_inputs_are_answered_exactly_next_to_small_ones() -> None:
    """Four 16 MB arrays and a Python int far beyond int64 go through with exact
    results; small inputs batched at the same time are not affected."""
    big = [np.full(4_000_000, float(i), dtype=np.float32) for i in range(4)]
    small = [np.full(4, float(i), dtype=np.float32) for i in range(4)]
    async with batchkit.Batcher[Any, Any](lambda b: b + 1, max_batch_size=8, max_wait_ms=10) as batcher:
        outcomes = await gather(batcher, big + small)
        numbers = await gather(batcher, [2**100, 1, 2.5])
    for x, (kind, value) in zip(big + small, outcomes, strict=True):
        assert kind == "value"
        assert value.shape == x.shape
        assert value.dtype == np.float32
        assert value[0] == x[0] + 1
        assert value[-1] == x[-1] + 1
    assert [v for _, v in numbers] == [2**100 + 1, 2, 3.5]
    check_settled(batcher.stats())


# -- ragged shapes and mixed dtypes --------------------------------------------------

SHAPES = [(), (0,), (2,), (3,), (2, 2), (1, 3)]
DTYPES = ["float32", "float64", "int64"]


@dataclass(frozen=True)
class Ragged:
    inputs: tuple[tuple[int, str], ...]  # (index into SHAPES, dtype)
    max_batch_size: int


ragged_cases = st.builds(
    Ragged,
    inputs=st.lists(st.tuples(st.integers(0, len(SHAPES) - 1), st.sampled_from(DTYPES)), min_size=1, max_size=30).map(
        tuple
    ),
    max_batch_size=st.integers(1, 8),
)


async def run_ragged(case: Ragged) -> None:
    model = Recorder()
    inputs = [
        np.full(SHAPES[s], i, dtype=dtype) if SHAPES[s] else np.array(i, dtype=dtype)
        for i, (s, dtype) in enumerate(case.inputs)
    ]
    async with batchkit.Batcher[Any, Any](model, max_batch_size=case.max_batch_size, max_wait_ms=5) as batcher:
        outcomes = await gather(batcher, inputs)
    for x, (kind, value) in zip(inputs, outcomes, strict=True):
        assert kind == "value", value
        value = np.asarray(value)
        assert value.shape == x.shape
        assert value.dtype == x.dtype
        np.testing.assert_array_equal(value, x * 2)
    allowed = {(SHAPES[s], np.dtype(d)) for s, d in case.inputs}
    for shape, dtype in model.batches:  # every batch was one shape and one dtype
        assert 1 <= shape[0] <= case.max_batch_size
        assert (shape[1:], dtype) in allowed
    check_settled(batcher.stats())


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(case=ragged_cases)
def test_ragged_shapes_and_mixed_dtypes_are_batched_apart(backend: str, case: Ragged) -> None:
    """Arrays of random shapes (0-d and empty included) and dtypes, sent together: each
    comes back with its own shape, dtype and values, and every batch the model saw
    held one shape and one dtype."""
    anyio.run(run_ragged, case, backend=backend)


@pytest.mark.anyio
async def test_mixed_python_and_numpy_numbers_keep_their_values() -> None:
    """Numbers of different kinds (bool, int, float, numpy scalars) share one batch and
    each gets its own value back."""
    inputs: list[Any] = [True, 3, 2.5, np.float32(1.5), np.int64(-4), np.bool_(False)]
    async with batchkit.Batcher[Any, Any](lambda b: b * 2, max_batch_size=8, max_wait_ms=10) as batcher:
        outcomes = await gather(batcher, inputs)
    assert [v for _, v in outcomes] == [x * 2 for x in inputs]
    check_settled(batcher.stats())


# -- bad per-call options ------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("timeout_ms", "error"),
    [(0, ValueError), (-5, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("10", TypeError)],
)
async def test_a_bad_per_call_timeout_fails_that_call_only(timeout_ms: Any, error: type[Exception]) -> None:
    """An invalid ``timeout_ms`` is a clear error for that call; concurrent calls are fine."""
    async with batchkit.Batcher[Any, Any](lambda b: b, max_batch_size=4, max_wait_ms=5, collate=None) as batcher:
        outcomes = await gather(batcher, [1, 2, 3])
        bad = await call(batcher, 4, timeout_ms=timeout_ms)
    assert type(bad[1]) is error
    assert "timeout_ms" in str(bad[1])
    assert [v for _, v in outcomes] == [1, 2, 3]
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.failed) == (3, 1)


# -- known core bugs ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_sparse_tensor_does_not_spoil_its_dense_batch_mates() -> None:
    """A tensor that cannot be stacked with dense ones (sparse layout) must not make
    its dense batch-mates fail."""
    inputs = [torch.zeros(3), torch.ones(3).to_sparse(), torch.full((3,), 2.0)]
    async with batchkit.Batcher[Any, Any](lambda b: b * 2, max_batch_size=8, max_wait_ms=10) as batcher:
        outcomes = await gather(batcher, inputs)
    assert outcomes[0][0] == "value"
    assert torch.equal(outcomes[0][1], torch.zeros(3))
    assert outcomes[2][0] == "value"
    assert torch.equal(outcomes[2][1], torch.full((3,), 4.0))
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_using_a_batcher_from_a_second_event_loop_keeps_the_stats_adding_up() -> None:
    """The ``RuntimeError`` for a call from another event loop is counted as an ending
    (rejected or failed): ``requests`` still equals the sum of the endings."""
    async with batchkit.Batcher[Any, Any](lambda b: b, collate=None) as batcher:
        assert await batcher.predict(1) == 1

        def elsewhere() -> None:
            async def use() -> None:
                await batcher.predict(2)

            with pytest.raises(RuntimeError, match="one Batcher per event loop"):
                asyncio.run(use())

        await anyio.to_thread.run_sync(elsewhere)
        check_invariant(batcher.stats())


async def _priority_order(priorities: list[Any]) -> tuple[list[Any], dict[int, Outcome]]:
    """Queue one request per priority behind a held batch (batches of 1); return the
    order the model served them in, and each call's outcome."""
    gate = threading.Event()
    order: list[Any] = []

    def model(batch: list[Any]) -> list[Any]:
        gate.wait(timeout=10)
        order.extend(batch)
        return batch

    outcomes: dict[int, Outcome] = {}
    batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, collate=None)

    async def one(i: int, priority: Any) -> None:
        outcomes[i] = await call(batcher, i, priority=priority)

    with anyio.fail_after(10):
        async with batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.predict, "held")
                await wait_until(lambda: batcher.stats().in_flight == 1)
                for i, priority in enumerate(priorities):
                    tg.start_soon(one, i, priority)
                await wait_until(lambda: batcher.stats().requests == len(priorities) + 1)
                gate.set()
    check_settled(batcher.stats())
    return [priorities[i] for i in order[1:]], outcomes


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_priority_that_is_not_a_number_fails_that_call_only(backend: str) -> None:
    """``priority="high"`` is a ``TypeError`` for that call; the others are served by priority."""
    served, outcomes = anyio.run(_priority_order, [1, "high", 3, 2], backend=backend)
    assert type(outcomes[1][1]) is TypeError
    assert served == [3, 2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_priority_fails_that_call_only_and_does_not_reorder_the_others(backend: str) -> None:
    """A NaN ``priority`` is refused (``ValueError``, like a NaN ``timeout_ms``) and the
    other callers are still served highest priority first."""
    served, outcomes = anyio.run(_priority_order, [1, 5, math.nan, 3, 2, 4, 7, 6], backend=backend)
    assert type(outcomes[2][1]) is ValueError
    assert served == [7, 6, 5, 4, 3, 2, 1]
