"""Regressions found by reviewing dedup_key and cache_size."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from tests._reliability import check_settled


async def _three_callers(batcher: batchkit.Batcher[Any, Any], x: Any) -> list[Any]:
    """Three concurrent callers of ``x`` (one computation), then one more after (a cache hit, if cached)."""
    results: list[Any] = [None] * 3

    async def one(i: int) -> None:
        try:
            results[i] = await batcher.predict(x)
        except Exception as error:  # the errors are compared by the tests
            results[i] = error

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    return results


@pytest.mark.anyio
async def test_object_arrays_and_structured_rows_are_not_shared_between_callers() -> None:
    def model(batch: list[str]) -> list[Any]:
        out: list[Any] = []
        for x in batch:
            if x == "objects":
                out.append(np.array([[1, 2], [3]], dtype=object))
            else:
                record = np.zeros(1, dtype=[("a", "i4")])
                out.append(record[0])  # a view into the model's own array
        return out

    async with batchkit.Batcher(model, collate=None, max_wait_ms=5, dedup_key=lambda x: x, cache_size=4) as batcher:
        with anyio.fail_after(10):
            first, second, _ = await _three_callers(batcher, "objects")
            second[0].append(99)
            assert first[0] == [1, 2]
            assert (await batcher.predict("objects"))[0] == [1, 2]  # the cache's copy is untouched too
            first, second, _ = await _three_callers(batcher, "record")
            second["a"] = 7
            assert first["a"] == 0
            assert (await batcher.predict("record"))["a"] == 0
        check_settled(batcher.stats())


class ModelError(Exception):
    def __init__(self, message: str, code: int) -> None:  # two arguments: copy.copy cannot rebuild it
        super().__init__(message)
        self.code = code
        self.details: dict[str, list[str]] = {"rows": []}


@pytest.mark.anyio
@pytest.mark.parametrize("dedup", [True, False])
async def test_every_caller_gets_an_exception_object_of_its_own(dedup: bool) -> None:
    def model(batch: list[str]) -> list[str]:
        raise ModelError("bad", 3)

    options: dict[str, Any] = {"dedup_key": (lambda x: x)} if dedup else {}
    async with batchkit.Batcher(model, collate=None, max_wait_ms=5, **options) as batcher:
        with anyio.fail_after(10):
            errors = await _three_callers(batcher, "x")
    assert all(isinstance(e, ModelError) and e.code == 3 and str(e) == "bad" for e in errors)
    assert len({id(e) for e in errors}) == 3
    errors[0].details["rows"].append("changed by the first caller")
    assert errors[1].details == {"rows": []}


@pytest.mark.anyio
async def test_a_result_with_a_cycle_is_copied_for_every_caller() -> None:
    def tree() -> dict[str, Any]:
        root: dict[str, Any] = {"name": "root", "children": []}
        root["children"].append({"name": "leaf", "parent": root})
        return root

    async with batchkit.Batcher(
        lambda batch: [tree() for _ in batch], collate=None, max_wait_ms=5, dedup_key=lambda x: x, cache_size=4
    ) as batcher:
        with anyio.fail_after(10):
            results = await _three_callers(batcher, "t")
            assert all(isinstance(r, dict) and r["children"][0]["parent"] is r for r in results), results
            assert len({id(r) for r in results}) == 3
            cached = await batcher.predict("t")
            assert cached["children"][0]["parent"] is cached
        assert batcher.stats().cache_hits == 1


@pytest.mark.anyio
async def test_a_caller_after_clear_cache_does_not_join_a_computation_from_before() -> None:
    weights = {"v": 1}
    gate = threading.Event()
    entered = threading.Event()

    def model(batch: list[str]) -> list[str]:
        version = weights["v"]
        entered.set()
        gate.wait(10)
        return [f"{x} with v{version}" for x in batch]

    async with batchkit.Batcher(model, collate=None, max_wait_ms=1, dedup_key=lambda x: x, cache_size=4) as batcher:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                before: list[str] = []

                async def first() -> None:
                    before.append(await batcher.predict("q"))

                tg.start_soon(first)
                while not entered.is_set():  # the model has read its weights
                    await anyio.sleep(0.001)
                weights["v"] = 2  # the model is reloaded...
                batcher.clear_cache()  # ...and the cache cleared
                gate.set()
                after = await batcher.predict("q")
            assert before == ["q with v1"]
            assert after == "q with v2"


@dataclasses.dataclass(frozen=True)
class ArrayKey:
    vector: np.ndarray

    def __hash__(self) -> int:
        return hash(self.vector.tobytes())  # hashable, but == on two of them raises (numpy's ambiguity)


@pytest.mark.anyio
async def test_a_key_whose_equality_raises_fails_that_caller_clearly_and_is_counted() -> None:
    async with batchkit.Batcher(
        lambda batch: [float(x.sum()) for x in batch],
        collate=None,
        max_wait_ms=1,
        dedup_key=ArrayKey,
        cache_size=8,
    ) as batcher:
        with anyio.fail_after(10):
            assert await batcher.predict(np.ones(4)) == 4.0
            for _ in range(2):
                with pytest.raises(batchkit.InvalidInputError, match="dedup_key"):
                    await batcher.predict(np.ones(4))
        stats = batcher.stats()
    assert (stats.requests, stats.completed, stats.failed) == (3, 1, 2)
    check_settled(stats)
