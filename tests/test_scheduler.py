"""The scheduler's own rules: bounded memory under floods, deadline order, histograms."""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import tracemalloc
from typing import Any

import anyio
import numpy as np
import pytest

import batchkit
from batchkit._stats import Histogram
from tests._reliability import check_settled, wait_until


def _held_model() -> tuple[Any, threading.Event]:
    gate = threading.Event()

    def model(batch: list[Any]) -> list[Any]:
        if not gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        return batch

    return model, gate


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["cancelled", "timed_out"])
async def test_a_flood_of_dead_requests_does_not_grow_memory_while_the_model_is_busy(how: str) -> None:
    """20,000 requests that give up while the model is stuck on one batch, 1,000 queued at a
    time: the memory held afterwards does not grow with the flood (inputs of 10 kB each)."""
    model, gate = _held_model()
    batcher = batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue_size=1_000, collate=None)

    async def one(i: int) -> None:
        payload = np.full(1_250, i, dtype=np.float64)  # 10 kB each
        if how == "cancelled":
            with anyio.move_on_after(0.001):
                await batcher.predict(payload)
        else:
            with contextlib.suppress(batchkit.RequestTimeoutError):
                await batcher.predict(payload, timeout_ms=1)

    async def wave(first: int) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(first, first + 1_000):
                tg.start_soon(one, i)

    with anyio.fail_after(60):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "held")
            await wait_until(lambda: batcher.stats().in_flight == 1)
            await wave(0)  # the queue's structures reach their working size
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for first in range(1_000, 20_000, 1_000):
                    await wave(first)
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            gate.set()
    # 19,000 dead requests of 10 kB would be 190 MB; what is left is bookkeeping.
    assert grown < 2_000_000, f"memory grew by {grown / 1e6:.1f} MB over 19,000 dead requests"
    stats = batcher.stats()
    assert stats.cancelled + stats.timed_out == 20_000
    check_settled(stats)


@pytest.mark.anyio
async def test_a_shorter_default_timeout_set_while_serving_is_kept_in_deadline_order() -> None:
    """configure(timeout_ms=...) shortens the default deadline: requests queued after it expire
    at their own deadline, not behind older requests that have longer ones."""
    model, gate = _held_model()
    batcher = batchkit.Batcher(model, max_batch_size=1, max_wait_ms=0, timeout_ms=60_000, collate=None)
    outcomes: dict[str, str] = {}

    async def one(name: str) -> None:
        try:
            await batcher.predict(name)
            outcomes[name] = "value"
        except batchkit.RequestTimeoutError:
            outcomes[name] = "timed out"

    with anyio.fail_after(20):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "held")
            await wait_until(lambda: batcher.stats().in_flight == 1)
            tg.start_soon(one, "long")  # 60 s deadline, queued first
            await wait_until(lambda: batcher.stats().pending == 1)
            batcher.configure(timeout_ms=50)
            tg.start_soon(one, "short")  # 50 ms deadline, behind the long one
            await wait_until(lambda: "short" in outcomes)
            assert outcomes == {"short": "timed out"}  # at its own deadline, the long one still queued
            gate.set()
    assert outcomes == {"short": "timed out", "long": "value"}
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_a_running_request_times_out_at_its_deadline_and_its_batch_mates_are_answered() -> None:
    model, gate = _held_model()
    batcher = batchkit.Batcher(model, max_batch_size=2, max_wait_ms=50, collate=None)
    results: dict[str, Any] = {}

    async def one(name: str, timeout_ms: float) -> None:
        try:
            results[name] = await batcher.predict(name, timeout_ms=timeout_ms)
        except batchkit.RequestTimeoutError as error:
            results[name] = error

    with anyio.fail_after(20):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(one, "quick", 300)
            tg.start_soon(one, "patient", 60_000)
            await wait_until(lambda: batcher.stats().in_flight == 2)
            await wait_until(lambda: "quick" in results)  # while the batch still runs
            assert isinstance(results["quick"], batchkit.RequestTimeoutError)
            gate.set()
    assert results["patient"] == "patient"
    stats = batcher.stats()
    assert (stats.timed_out, stats.completed) == (1, 1)
    check_settled(stats)


def test_histogram_percentiles_are_within_a_bucket_of_the_exact_ones() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=-6, sigma=1.5, size=9_000)  # about 2.5 ms, spread over decades
    histogram = Histogram()
    histogram.add_since(1.0, list(1.0 - samples[:5_000]))  # binned as one batch (numpy)
    for value in samples[5_000:]:
        histogram.add(float(value))  # one by one
    summary = histogram.summary()
    assert summary.count == 9_000
    assert math.isclose(summary.mean, samples.mean() * 1000, rel_tol=1e-9)
    assert math.isclose(summary.max, samples.max() * 1000, rel_tol=1e-9)
    for q, got in ((0.50, summary.p50), (0.90, summary.p90), (0.99, summary.p99)):
        exact = float(np.quantile(samples, q)) * 1000
        assert abs(got / exact - 1) < 0.05, (q, got, exact)


def test_histogram_covers_recent_samples_only() -> None:
    histogram = Histogram()
    for _ in range(30_000):
        histogram.add(1.0)  # old: one second each
    for _ in range(20_000):
        histogram.add(0.001)  # recent: one millisecond each
    summary = histogram.summary()
    assert summary.count <= 20_000
    assert summary.p99 < 1.1  # milliseconds: the old seconds are gone
