"""Regressions found by reviewing the deadline rules (admission, early failure)."""

from __future__ import annotations

import time

import anyio
import pytest

import batchkit


@pytest.mark.anyio
async def test_a_fast_group_is_not_refused_by_a_slow_groups_estimate() -> None:
    def model(batch: list[tuple[str, int]]) -> list[int]:
        time.sleep(0.2 if batch[0][0] == "slow" else 0.001)
        return [x for _, x in batch]

    async with batchkit.Batcher(
        model, collate=None, max_batch_size=8, max_wait_ms=0, batch_key=lambda item: item[0]
    ) as batcher:
        with anyio.fail_after(30):
            for x in range(3):
                await batcher.predict(("slow", x))
            answered = 0
            for x in range(5):
                await batcher.predict(("slow", x))  # the slot is idle after it
                try:
                    await batcher.predict(("fast", x), timeout_ms=100)
                    answered += 1
                except batchkit.RequestTimeoutError:
                    pass
    assert answered == 5


@pytest.mark.anyio
async def test_an_old_estimate_for_one_batch_size_does_not_refuse_it_forever() -> None:
    slow_left = [3]

    def model(batch: list[int]) -> list[int]:
        time.sleep(0.3 if slow_left[0] else 0.002)  # a cold start at size 1, then fast at every size
        slow_left[0] = max(0, slow_left[0] - 1)
        return batch

    async with batchkit.Batcher(model, collate=None, max_batch_size=8, max_wait_ms=5) as batcher:
        with anyio.fail_after(30):
            for _ in range(3):
                await batcher.predict(1)
            await anyio.sleep(1.1)  # the size-1 estimate grows old while...
            answered = 0
            for _ in range(5):
                async with anyio.create_task_group() as tg:  # ...batches of 8 keep the model current
                    for x in range(8):
                        tg.start_soon(batcher.predict, x)
                try:
                    await batcher.predict(0, timeout_ms=100)
                    answered += 1
                except batchkit.RequestTimeoutError:
                    pass
    assert answered >= 4, answered


@pytest.mark.anyio
async def test_admission_counts_on_the_first_slot_to_free_not_the_average() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.1)
        return batch

    async with batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, replicas=4) as batcher:
        with anyio.fail_after(30):
            for x in range(4):
                await batcher.predict(x)
            outcome: list[str] = []

            async def last() -> None:
                try:
                    await batcher.predict(5, timeout_ms=150)
                    outcome.append("answered")
                except batchkit.RequestTimeoutError as error:
                    outcome.append(str(error))

            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.predict, 1)
                await anyio.sleep(0.09)  # its slot frees in about 10 ms
                for x in (2, 3, 4):
                    tg.start_soon(batcher.predict, x)  # these three run 100 ms more
                await anyio.sleep(0.001)
                tg.start_soon(last)  # it starts within ~10 ms, on the first slot to free: ~110 ms in all
    assert outcome == ["answered"], outcome
