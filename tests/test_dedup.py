"""dedup_key and cache_size: identical inputs in progress are computed once; results are cached by key.

Most tests hold the model's only slot with a gated "blocker" batch, so that the
requests under test stay queued (or hold the computation under test running)
while callers join, cancel or time out; then they open the gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
import subprocess
import sys
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np
import pytest

import batchkit
from batchkit._dedup import ResultCache, detached
from batchkit._dedup_scheduler import DedupScheduler
from tests._reliability import check_invariant, check_settled, wait_until
from tests.conftest import RecordingModel

pytestmark = pytest.mark.anyio


class Boom(ValueError):
    pass


def same(x: Any) -> Any:
    return x


def doubled(batch: list[Any]) -> list[Any]:
    return [f"{x}{x}" for x in batch]


def dedup_batcher(model: Callable[[Any], Any], **options: Any) -> batchkit.Batcher[Any, Any]:
    options = {"collate": None, "max_batch_size": 8, "max_wait_ms": 1, "dedup_key": same, **options}
    return batchkit.Batcher(model, **options)


class Calls:
    """Start ``predict`` calls in a task group, each in a scope of its own; keep how each ended."""

    def __init__(self, batcher: batchkit.Batcher[Any, Any], tg: anyio.abc.TaskGroup) -> None:
        self.batcher = batcher
        self.tg = tg
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    def start(self, name: str, x: Any, **kwargs: Any) -> None:
        scope = self.scopes[name] = anyio.CancelScope()

        async def call() -> None:
            with scope:
                try:
                    self.results[name] = await self.batcher.predict(x, **kwargs)
                except Exception as error:
                    self.errors[name] = error

        self.tg.start_soon(call)


@contextlib.asynccontextmanager
async def serving(model: RecordingModel, **options: Any) -> AsyncIterator[tuple[batchkit.Batcher[Any, Any], Calls]]:
    """A batcher with ``dedup_key`` and a ``Calls`` on it; the model's gate opens on the way out, come what may."""
    with anyio.fail_after(30):  # a caller left waiting fails the test, not hangs it
        async with dedup_batcher(model, **options) as batcher, anyio.create_task_group() as tg:
            try:
                yield batcher, Calls(batcher, tg)
            finally:
                model.gate.set()


def pending(batcher: batchkit.Batcher[Any, Any], n: int) -> Callable[[], bool]:
    return lambda: batcher.stats().pending == n


def settled(batcher: batchkit.Batcher[Any, Any], stats: batchkit.BatcherStats | None = None) -> None:
    """Nothing queued or running, the counters add up, and the scheduler keeps no record of any caller."""
    check_settled(batcher.stats() if stats is None else stats)
    scheduler = batcher._scheduler  # white box: what it holds once every caller is answered
    assert isinstance(scheduler, DedupScheduler)
    assert not scheduler._computations
    assert not scheduler._of
    assert (scheduler._followers, scheduler._queued_followers) == (0, 0)


# -- computed once ---------------------------------------------------------------------


async def test_identical_queued_inputs_are_computed_once_and_each_caller_is_answered(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        for i in range(30):
            calls.start(f"c{i}", i % 3)
        await wait_until(pending(batcher, 30))  # three queued, 27 waiting for them: all pending
        stats = batcher.stats()
        assert (stats.in_flight, stats.requests) == (1, 31)
        check_invariant(stats)
        model.gate.set()
    assert calls.results == {"blocker": "bb", **{f"c{i}": f"{i % 3}{i % 3}" for i in range(30)}}
    assert Counter(model.seen) == Counter({"b": 1, 0: 1, 1: 1, 2: 1})
    stats = batcher.stats()
    assert (stats.completed, stats.deduplicated, stats.cache_hits, stats.cache_misses) == (31, 27, 0, 0)
    settled(batcher, stats)


async def test_callers_join_a_running_computation(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("first", "a")
        await wait_until(model.entered.is_set)
        for i in range(10):
            calls.start(f"joiner{i}", "a")
        await wait_until(lambda: batcher.stats().in_flight == 11)
        assert batcher.stats().pending == 0  # never queued
        model.gate.set()
    assert set(calls.results.values()) == {"aa"}
    assert len(calls.results) == 11
    assert model.batches == [["a"]]
    assert batcher.stats().deduplicated == 10
    settled(batcher)


async def test_without_dedup_key_identical_inputs_are_each_computed(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model, dedup_key=None) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        for i in range(5):
            calls.start(f"c{i}", "a")
        await wait_until(pending(batcher, 5))
        model.gate.set()
    assert model.seen.count("a") == 5  # the control: what dedup_key saves


# -- results of their own ----------------------------------------------------------------


async def test_every_caller_gets_a_result_of_its_own(anyio_backend: str) -> None:
    def model(batch: list[str]) -> list[Any]:
        return [{"vector": np.arange(4.0), "tags": ["x"], "pair": (np.ones(2), [1])} for _ in batch]

    async with dedup_batcher(model, cache_size=4) as batcher:
        results: list[Any] = []

        async def call() -> None:
            results.append(await batcher.predict("a"))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call)
        results.append(await batcher.predict("a"))  # from the cache
        assert batcher.stats().cache_hits == 1
        for i, mine in enumerate(results):
            for other in results[i + 1 :]:
                assert mine is not other
                assert not np.shares_memory(mine["vector"], other["vector"])
                assert mine["tags"] is not other["tags"]
                assert not np.shares_memory(mine["pair"][0], other["pair"][0])
                assert mine["pair"][1] is not other["pair"][1]
        for mine in results[:-1]:  # mutate all but one: the last one (and the cache) never change
            mine["vector"][:] = -1
            mine["tags"].append("mutated")
            mine["pair"][0][:] = -1
            mine["pair"][1].append(2)
        last = results[-1]
        assert last["vector"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert (last["tags"], last["pair"][1], last["pair"][0].tolist()) == (["x"], [1], [1.0, 1.0])
        again = await batcher.predict("a")
        assert again["vector"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert again["tags"] == ["x"]


@dataclasses.dataclass
class Box:
    items: list[int]


def test_detached_copies_what_can_change_and_keeps_what_cannot() -> None:
    array = np.arange(3)
    assert detached(array) is not array
    assert np.array_equal(detached(array), array)
    assert not np.shares_memory(detached(array), array)
    for atom in (3, 2.5, "s", b"b", None, True, np.float32(1.5)):
        assert detached(atom) is atom
    nested = ([1, [2]], {"k": [3]}, Box([4]))
    copied = detached(nested)
    assert copied == nested
    assert copied[0] is not nested[0]
    assert copied[0][1] is not nested[0][1]
    assert copied[1]["k"] is not nested[1]["k"]
    assert copied[2] is not nested[2]
    assert copied[2].items is not nested[2].items


def test_detached_clones_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(3)
    copied = detached({"t": tensor})["t"]
    assert isinstance(copied, torch.Tensor)
    assert torch.equal(copied, tensor)
    assert copied.data_ptr() != tensor.data_ptr()


# -- cancellation ------------------------------------------------------------------------


async def test_the_first_caller_cancelled_while_queued_leaves_the_computation_to_the_others(
    anyio_backend: str,
) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        calls.start("first", "a")
        await wait_until(pending(batcher, 1))
        calls.start("second", "a")
        calls.start("third", "a")
        await wait_until(pending(batcher, 3))
        calls.scopes["first"].cancel()
        await wait_until(lambda: batcher.stats().cancelled == 1)
        assert batcher.stats().pending == 2  # the second now queued with the input, the third following it
        model.gate.set()
    assert calls.results == {"blocker": "bb", "second": "aa", "third": "aa"}
    assert model.seen.count("a") == 1
    stats = batcher.stats()
    assert (stats.cancelled, stats.deduplicated) == (1, 1)
    settled(batcher, stats)


async def test_the_first_caller_cancelled_while_running_leaves_the_result_to_the_others(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("first", "a")
        await wait_until(model.entered.is_set)
        calls.start("second", "a")
        calls.start("third", "a")
        await wait_until(lambda: batcher.stats().in_flight == 3)
        calls.scopes["first"].cancel()
        await wait_until(lambda: batcher.stats().cancelled == 1)
        model.gate.set()
    assert calls.results == {"second": "aa", "third": "aa"}
    assert model.batches == [["a"]]
    settled(batcher)


async def test_a_follower_cancelled_just_leaves(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        calls.start("first", "a")
        await wait_until(pending(batcher, 1))
        calls.start("queued-follower", "a")
        await wait_until(pending(batcher, 2))
        calls.scopes["queued-follower"].cancel()
        await wait_until(pending(batcher, 1))
        model.gate.set()
        await wait_until(lambda: "first" in calls.results)
        # Now a follower of a running computation.
        model.gate.clear()
        model.entered.clear()
        calls.start("again", "c")
        await wait_until(model.entered.is_set)
        calls.start("running-follower", "c")
        await wait_until(lambda: batcher.stats().in_flight == 2)
        calls.scopes["running-follower"].cancel()
        await wait_until(lambda: batcher.stats().in_flight == 1)
        model.gate.set()
    assert calls.results == {"blocker": "bb", "first": "aa", "again": "cc"}
    assert Counter(model.seen) == Counter({"b": 1, "a": 1, "c": 1})
    stats = batcher.stats()
    assert (stats.cancelled, stats.deduplicated) == (2, 0)
    settled(batcher, stats)


async def test_a_computation_whose_callers_all_left_is_never_sent(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        calls.start("first", "a")
        await wait_until(pending(batcher, 1))
        calls.start("second", "a")
        await wait_until(pending(batcher, 2))
        calls.scopes["first"].cancel()  # the second takes the input over...
        await wait_until(lambda: batcher.stats().cancelled == 1)
        calls.scopes["second"].cancel()  # ...and leaves too: nothing is left to compute
        await wait_until(pending(batcher, 0))
        model.gate.set()
        await wait_until(lambda: "blocker" in calls.results)
        assert model.seen == ["b"]
        settled(batcher)  # no record of the computation is left
        assert await batcher.predict("a") == "aa"  # a new computation
    assert model.seen == ["b", "a"]
    stats = batcher.stats()
    assert stats.cancelled == 2
    settled(batcher, stats)


# -- deadlines -------------------------------------------------------------------------------


async def test_a_follower_times_out_at_its_own_deadline(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("first", "a")
        await wait_until(model.entered.is_set)
        calls.start("hasty", "a", timeout_ms=30)
        await wait_until(lambda: "hasty" in calls.errors)
        assert isinstance(calls.errors["hasty"], batchkit.RequestTimeoutError)
        assert batcher.stats().in_flight == 1  # the first still waits
        model.gate.set()
    assert calls.results == {"first": "aa"}
    stats = batcher.stats()
    assert (stats.timed_out, stats.completed) == (1, 1)
    settled(batcher, stats)


async def test_a_follower_with_a_later_deadline_takes_over_from_one_that_timed_out(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        calls.start("hasty", "a", timeout_ms=30)
        await wait_until(pending(batcher, 1))
        calls.start("patient", "a")
        await wait_until(lambda: "hasty" in calls.errors)
        assert isinstance(calls.errors["hasty"], batchkit.RequestTimeoutError)
        assert batcher.stats().pending == 1  # the patient one, queued with the input
        model.gate.set()
    assert calls.results == {"blocker": "bb", "patient": "aa"}
    assert model.seen == ["b", "a"]
    stats = batcher.stats()
    assert (stats.timed_out, stats.deduplicated) == (1, 0)
    settled(batcher, stats)


async def test_a_tighter_caller_is_queued_so_its_deadline_is_met_and_the_input_sent_once(anyio_backend: str) -> None:
    model = RecordingModel(doubled)
    # Only a deadline flushes before a minute: a caller that merely followed the first one
    # would time out.
    async with serving(model, max_wait_ms=60_000) as (batcher, calls):
        calls.start("relaxed", "a")
        await wait_until(pending(batcher, 1))
        calls.start("tight", "a", timeout_ms=300)
        calls.start("follower", "a", timeout_ms=5_000)
        with anyio.fail_after(5):
            await wait_until(lambda: len(calls.results) == 3)
    assert calls.results == {"relaxed": "aa", "tight": "aa", "follower": "aa"}
    assert model.batches == [["a"]]  # the two queued requests shared one row
    stats = batcher.stats()
    assert stats.batch_sizes == {1: 1}
    assert stats.deduplicated == 2
    settled(batcher, stats)


# -- errors -------------------------------------------------------------------------------------


async def test_an_isolated_failure_reaches_every_caller_of_that_input_each_its_own(anyio_backend: str) -> None:
    def model(batch: list[str]) -> list[str]:
        if "bad" in batch:
            raise Boom("bad input")
        return doubled(batch)

    recording = RecordingModel(model, gated=True)
    async with serving(recording, on_error="isolate") as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(recording.entered.is_set)
        for i in range(3):
            calls.start(f"bad{i}", "bad")
            calls.start(f"good{i}", "good")
        await wait_until(pending(batcher, 6))
        recording.gate.set()
    assert calls.results == {"blocker": "bb", "good0": "goodgood", "good1": "goodgood", "good2": "goodgood"}
    errors = [calls.errors[f"bad{i}"] for i in range(3)]
    assert all(isinstance(e, Boom) and str(e) == "bad input" for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert all(batch.count("bad") <= 1 and batch.count("good") <= 1 for batch in recording.batches)
    stats = batcher.stats()
    assert (stats.failed, stats.deduplicated) == (3, 4)
    settled(batcher, stats)


async def test_a_failed_batch_reaches_every_caller_each_with_its_own_exception(anyio_backend: str) -> None:
    def model(batch: list[str]) -> list[str]:
        raise Boom("the whole batch")

    recording = RecordingModel(model, gated=True)
    async with serving(recording) as (batcher, calls):
        calls.start("first", "a")
        await wait_until(recording.entered.is_set)
        for i in range(3):
            calls.start(f"follower{i}", "a")  # following the running computation
        await wait_until(lambda: batcher.stats().in_flight == 4)
        calls.start("other", "o")
        calls.start("other-follower", "o")
        await wait_until(pending(batcher, 2))
        recording.gate.set()
    assert not calls.results
    assert set(calls.errors) == {"first", "follower0", "follower1", "follower2", "other", "other-follower"}
    assert all(isinstance(e, Boom) for e in calls.errors.values())
    assert len({id(e) for e in calls.errors.values()}) == 6
    assert Counter(recording.seen) == Counter({"a": 1, "o": 1})
    stats = batcher.stats()
    assert (stats.failed, stats.deduplicated) == (6, 4)
    settled(batcher, stats)


async def test_a_hung_batch_and_a_close_fail_every_caller_waiting_for_it(anyio_backend: str) -> None:
    release = threading.Event()

    def model(batch: list[str]) -> list[str]:
        release.wait(10)
        return doubled(batch)

    batcher = dedup_batcher(model, run_timeout_ms=100)
    async with anyio.create_task_group() as tg:
        await batcher.__aenter__()
        try:
            calls = Calls(batcher, tg)
            calls.start("hung", "h")
            calls.start("hung-follower", "h")
            await wait_until(lambda: batcher.stats().in_flight == 2)
            calls.start("queued", "q")
            calls.start("queued-follower", "q")
            await wait_until(lambda: len(calls.errors) == 2)  # the hung batch's two callers
            assert batcher.stats().pending == 2  # behind the only slot, blocked by the hung call
            await batcher.aclose()  # nothing can run the queued computation: its callers fail
        finally:
            release.set()
            await batcher.__aexit__(None, None, None)
    assert set(calls.errors) == {"hung", "hung-follower", "queued", "queued-follower"}
    assert all(isinstance(e, batchkit.ModelTimeoutError) for e in calls.errors.values())
    assert len({id(e) for e in calls.errors.values()}) == 4
    stats = batcher.stats()
    assert (stats.failed, stats.deduplicated) == (4, 1)  # the queued follower's computation never ran
    settled(batcher, stats)


# -- the cache ------------------------------------------------------------------------------------


async def test_cache_hits_and_misses(anyio_backend: str) -> None:
    model = RecordingModel(doubled)
    async with dedup_batcher(model, cache_size=8) as batcher:
        answers = [await batcher.predict(x) for x in ("a", "a", "b", "a", "b", "c")]
        assert answers == ["aa", "aa", "bb", "aa", "bb", "cc"]
        stats = batcher.stats()
    assert model.seen == ["a", "b", "c"]
    assert (stats.cache_hits, stats.cache_misses, stats.completed, stats.batches) == (3, 3, 6, 3)
    assert stats.latency_ms.count == 6
    settled(batcher, stats)


async def test_the_cache_keeps_the_most_recently_used_keys(anyio_backend: str) -> None:
    model = RecordingModel(doubled)
    async with dedup_batcher(model, cache_size=2) as batcher:
        for x in ("a", "b", "a", "c", "b", "c", "a"):
            await batcher.predict(x)
        stats = batcher.stats()
    # a, b computed; a hit (now the most recent); c computed, b out; b computed, a out; c hit; a computed.
    assert model.seen == ["a", "b", "c", "b", "a"]
    assert (stats.cache_hits, stats.cache_misses) == (2, 5)


def test_the_result_cache_is_bounded_least_recently_used_out() -> None:
    cache = ResultCache(3)
    for key in "abcd":
        cache.put(key, key.upper())
    assert cache.keys() == ["b", "c", "d"]
    assert len(cache) == 3
    assert cache.get("b") == "B"
    cache.put("e", "E")
    assert cache.keys() == ["d", "b", "e"]
    cache.clear()
    assert len(cache) == 0
    assert cache.generation == 1


async def test_failures_are_not_cached(anyio_backend: str) -> None:
    failures = {"flaky": 1}

    def model(batch: list[str]) -> list[str]:
        for x in batch:
            if failures.get(x, 0) > 0:
                failures[x] -= 1
                raise Boom(x)
        return doubled(batch)

    async with dedup_batcher(model, cache_size=4, on_error="isolate") as batcher:
        with pytest.raises(Boom):
            await batcher.predict("flaky")
        assert await batcher.predict("flaky") == "flakyflaky"  # computed again
        assert await batcher.predict("flaky") == "flakyflaky"  # now cached
        stats = batcher.stats()
    assert (stats.cache_hits, stats.cache_misses, stats.failed, stats.batches) == (1, 2, 1, 2)


async def test_clear_cache_forgets_results_and_voids_computations_in_progress(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model, cache_size=4) as (batcher, calls):
        model.gate.set()
        assert await batcher.predict("a") == "aa"
        model.gate.clear()
        model.entered.clear()
        calls.start("running", "r")
        await wait_until(model.entered.is_set)
        batcher.clear_cache()  # "a" goes; "r", running now, may come from the model as it was
        model.gate.set()
        await wait_until(lambda: "running" in calls.results)
        assert await batcher.predict("a") == "aa"
        assert await batcher.predict("r") == "rr"
        assert await batcher.predict("r") == "rr"
        stats = batcher.stats()
    assert model.seen == ["a", "r", "a", "r"]
    assert stats.cache_hits == 1


async def test_configure_keeps_the_cache(anyio_backend: str) -> None:
    model = RecordingModel(doubled)
    async with dedup_batcher(model, cache_size=4) as batcher:
        await batcher.predict("a")
        batcher.configure(max_batch_size=2, max_wait_ms=0, timeout_ms=1000)
        assert await batcher.predict("a") == "aa"
    assert model.seen == ["a"]
    assert batcher.stats().cache_hits == 1


# -- bad input, options, bounds ------------------------------------------------------------------


async def test_an_unhashable_or_failing_key_fails_that_caller_only(anyio_backend: str) -> None:
    def key(x: Any) -> Any:
        if x == "boom":
            raise Boom("no key")
        return x if x != "list" else ["un", "hashable"]

    model = RecordingModel(doubled)
    async with dedup_batcher(model, dedup_key=key, cache_size=2) as batcher:
        results: dict[str, Any] = {}

        async def call(x: str) -> None:
            try:
                results[x] = await batcher.predict(x)
            except Exception as error:
                results[x] = error

        async with anyio.create_task_group() as tg:
            for x in ("fine", "list", "boom", "also fine"):
                tg.start_soon(call, x)
        stats = batcher.stats()
    assert isinstance(results["list"], batchkit.InvalidInputError)
    assert "unhashable list" in str(results["list"])
    assert isinstance(results["boom"], Boom)
    assert (results["fine"], results["also fine"]) == ("finefine", "also fine" * 2)
    assert sorted(model.seen) == ["also fine", "fine"]
    assert (stats.failed, stats.completed) == (2, 2)
    settled(batcher, stats)


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="dedup_key must be a callable"):
        batchkit.Batcher(doubled, dedup_key="id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size must be at least 0"):
        batchkit.Batcher(doubled, dedup_key=same, cache_size=-1)
    with pytest.raises(TypeError, match="cache_size must be an int"):
        batchkit.Batcher(doubled, dedup_key=same, cache_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size needs a dedup_key"):
        batchkit.Batcher(doubled, cache_size=8)

    def steps(batch: list[Any]) -> Iterator[list[Any]]:
        yield batch

    with pytest.raises(ValueError, match=r"dedup_key \(and cache_size\) are for models that return one output"):
        batchkit.Batcher(steps, dedup_key=same)
    batchkit.Batcher(doubled, dedup_key=same, cache_size=0)  # dedup without a cache


async def test_options_reach_decorated_functions_and_methods(anyio_backend: str) -> None:
    seen: list[str] = []

    class Model:
        @batchkit.batch(collate=None, max_wait_ms=1, dedup_key=same, cache_size=2)
        def predict(self, batch: list[str]) -> list[str]:
            seen.extend(batch)
            return doubled(batch)

    model = Model()
    assert [await model.predict(x) for x in ("a", "a")] == ["aa", "aa"]
    Model.predict.clear_cache()  # the class attribute clears every instance's cache
    assert await model.predict("a") == "aa"
    assert seen == ["a", "a"]
    await model.predict.aclose()


async def test_callers_waiting_for_an_identical_one_count_against_max_queue_size(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model, max_queue_size=3) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        for i in range(3):
            calls.start(f"c{i}", "a")
        await wait_until(pending(batcher, 3))
        with pytest.raises(batchkit.QueueFullError, match="waiting for an identical one"):
            await batcher.predict("a")
        model.gate.set()
    assert len(calls.results) == 4
    assert batcher.stats().rejected == 1
    settled(batcher)


# -- other threads ---------------------------------------------------------------------------------


async def test_submit_threadsafe_callers_share_computations_and_the_cache(anyio_backend: str) -> None:
    model = RecordingModel(doubled, gated=True)
    async with serving(model, cache_size=4) as (batcher, calls):
        calls.start("blocker", "b")
        await wait_until(model.entered.is_set)
        futures = await anyio.to_thread.run_sync(lambda: [batcher.submit_threadsafe("a") for _ in range(5)])
        await wait_until(pending(batcher, 5))
        assert futures[3].cancel()  # a follower from a thread leaves too
        await wait_until(pending(batcher, 4))
        model.gate.set()
        results = await anyio.to_thread.run_sync(lambda: [f.result(10) for i, f in enumerate(futures) if i != 3])
        hit = await anyio.to_thread.run_sync(lambda: batcher.submit_threadsafe("a").result(10))
    assert results == ["aa"] * 4
    assert hit == "aa"
    assert model.seen == ["b", "a"]
    stats = batcher.stats()
    assert (stats.cancelled, stats.deduplicated, stats.cache_hits) == (1, 3, 1)
    settled(batcher, stats)


def test_sync_batcher_callers_share_computations() -> None:
    model = RecordingModel(doubled, gated=True)
    results: list[str] = []
    with batchkit.SyncBatcher(model, collate=None, max_wait_ms=1, dedup_key=same, cache_size=2) as batcher:
        threads = [threading.Thread(target=lambda: results.append(batcher.predict("a"))) for _ in range(6)]
        for thread in threads:
            thread.start()
        deadline = threading.Event()
        while batcher.stats().requests < 6 and not deadline.wait(0.001):
            pass
        model.gate.set()
        for thread in threads:
            thread.join(10)
        assert batcher.predict("a") == "aa"
        batcher.clear_cache()
        assert batcher.predict("a") == "aa"
    assert results == ["aa"] * 6
    assert model.seen == ["a", "a"]  # the six shared one computation, the last came after clear_cache()


# -- memory ------------------------------------------------------------------------------------------


class Obj:
    def __init__(self, value: str) -> None:
        self.value = value


async def test_nothing_is_kept_once_callers_are_answered_but_the_cached_copies(anyio_backend: str) -> None:
    inputs: list[weakref.ref[Obj]] = []
    results: list[weakref.ref[Obj]] = []

    def model(batch: list[Obj]) -> list[Obj]:
        return [Obj(x.value * 2) for x in batch]

    recording = RecordingModel(model, gated=True)
    async with dedup_batcher(recording, dedup_key=lambda x: x.value, cache_size=3) as batcher:

        async def call(value: str) -> None:
            x = Obj(value)
            inputs.append(weakref.ref(x))
            result = await batcher.predict(x)
            results.append(weakref.ref(result))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "blocker")
            await wait_until(recording.entered.is_set)
            for value in ("a", "a", "a", "b", "b"):
                tg.start_soon(call, value)
            await wait_until(pending(batcher, 5))
            recording.gate.set()
        recording.batches.clear()  # the test's own references to the inputs
        gc.collect()
        assert len(inputs) == len(results) == 6
        assert not [r for r in inputs if r() is not None]
        assert not [r for r in results if r() is not None]
        # The cache holds copies of its own: the callers' results went, these did not.
        assert [(await batcher.predict(Obj(v))).value for v in ("a", "b", "blocker")] == ["aa", "bb", "blocker" * 2]
        assert batcher.stats().cache_hits == 3


# -- the benchmark ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_benchmark_runs_and_computes_fewer_rows_with_dedup_and_fewer_still_with_the_cache() -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "dedup.py"
    args = ["--requests", "600", "--vocabulary", "100", "--clients", "16", "--rounds", "1"]
    args += ["--fixed-ms", "0.2", "--row-ms", "0.02", "--cache-size", "200"]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    distinct = int(re.search(r"\(Zipf s=1.1; (\d+) distinct\)", run.stdout).group(1))  # type: ignore[union-attr]
    rows = {v: int(n.replace(",", "")) for v, n in re.findall(r"^\| ([\w +]+) \| ([\d,]+) \|", run.stdout, re.M)}
    assert rows["no dedup"] == 600, run.stdout
    assert distinct <= rows["dedup_key"] < 600, run.stdout  # each distinct input at least once, repeats shared
    assert rows["dedup_key + cache"] == distinct, run.stdout  # a cache larger than the vocabulary: once each
