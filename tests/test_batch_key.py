"""batch_key: requests with different keys never share a batch; the model learns its batch's key."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import batchkit
from tests._reliability import check_settled


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_keys_never_share_a_batch_and_the_model_knows_its_key(kind: str) -> None:
    seen: list[tuple[Any, list[dict[str, Any]]]] = []

    def record(batch: list[dict[str, Any]]) -> list[str]:
        key = batchkit.current_batch_key()
        seen.append((key, batch))
        return [f"{key}:{item['x']}" for item in batch]

    async def async_model(batch: list[dict[str, Any]]) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return record(batch)

    model = record if kind == "sync" else async_model
    requests = [{"adapter": "a" if i % 3 else "b", "x": i} for i in range(24)]
    results: dict[int, str] = {}

    async def one(item: dict[str, Any]) -> None:
        results[item["x"]] = await batcher.predict(item)

    batcher = batchkit.Batcher(
        model, collate=None, max_batch_size=8, max_wait_ms=20, batch_key=lambda item: item["adapter"]
    )
    with anyio.fail_after(20):
        async with batcher, anyio.create_task_group() as tg:
            for item in requests:
                tg.start_soon(one, item)
    assert results == {item["x"]: f"{item['adapter']}:{item['x']}" for item in requests}
    for key, batch in seen:
        assert {item["adapter"] for item in batch} == {key}  # one key per batch, and it is the model's
    assert {key for key, _ in seen} == {"a", "b"}
    assert batchkit.current_batch_key() is None  # outside a model call
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_an_unhashable_or_failing_key_fails_that_caller_only() -> None:
    def key(item: Any) -> Any:
        if item == "boom":
            raise ValueError("no key for this one")
        return item if item != "list" else ["not", "hashable"]

    async with batchkit.Batcher(lambda b: b, collate=None, max_wait_ms=1, batch_key=key) as batcher:
        with anyio.fail_after(10):
            with pytest.raises(batchkit.InvalidInputError, match="unhashable"):
                await batcher.predict("list")
            with pytest.raises(ValueError, match="no key"):
                await batcher.predict("boom")
            assert await batcher.predict("fine") == "fine"
        stats = batcher.stats()
    assert (stats.failed, stats.completed) == (2, 1)
    check_settled(stats)


def test_batch_key_must_be_callable() -> None:
    with pytest.raises(TypeError, match="batch_key"):
        batchkit.Batcher(lambda b: b, batch_key="adapter")  # type: ignore[arg-type]
