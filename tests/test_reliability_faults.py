"""Fault injection: models that raise, return garbage, hang, or raise BaseExceptions.

In every case the callers of the faulty batch get an error that says what went
wrong, nobody else is affected, and the batcher keeps serving the requests that
follow. ``on_error="isolate"`` narrows a failure down to the poison inputs, and
out-of-memory errors halve the batch until it fits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchkit
from tests._reliability import BACKENDS, Boom, Outcome, batchkit_threads, call, check_settled, wait_until

EXAMPLES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class Fatal(BaseException):
    """A BaseException that is neither an Exception nor a cancellation."""


def expected(x: int) -> int:
    return 3 * x + 1


# -- random faults ------------------------------------------------------------------


def _raise(error: Exception) -> Any:
    raise error


#: fault name -> (what the model does with the batch, how each caller of that batch must end)
FAULTS: dict[str, tuple[Callable[[list[Any]], Any], Callable[[Outcome], bool]]] = {
    "ok": (lambda b: [expected(x) for _, x in b], lambda o: o[0] == "value"),
    "raise": (lambda b: _raise(Boom("bad batch")), lambda o: type(o[1]) is Boom),
    "raise-keyerror": (lambda b: _raise(KeyError("missing")), lambda o: type(o[1]) is KeyError),
    "too-short": (lambda b: [0] * (len(b) - 1), lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
    "too-long": (lambda b: [0] * (len(b) + 1), lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
    "none": (lambda b: None, lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
    "int": (lambda b: 42, lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
    "str": (lambda b: "x" * len(b), lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
    "dict": (lambda b: dict.fromkeys(range(len(b)), 0), lambda o: isinstance(o[1], batchkit.BatchSizeMismatchError)),
}
#: BaseExceptions (not cancellations): handed to the callers as themselves, like any other error
BASE_FAULTS: dict[str, type[BaseException]] = {
    "system-exit": SystemExit,
    "keyboard-interrupt": KeyboardInterrupt,
    "fatal": Fatal,
}


@dataclass(frozen=True)
class FaultRound:
    fault: str
    callers: int


fault_rounds = st.builds(FaultRound, fault=st.sampled_from([*FAULTS, *BASE_FAULTS]), callers=st.integers(1, 5))


async def run_faults(rounds: list[FaultRound], is_async: bool) -> None:
    plan: dict[int, str] = {}

    def behave(batch: list[tuple[int, int]]) -> Any:
        faults = {plan[r] for r, _ in batch}
        assert len(faults) == 1, "a batch mixed two rounds"
        fault = faults.pop()
        if fault in BASE_FAULTS:
            raise BASE_FAULTS[fault](fault)
        return FAULTS[fault][0](batch)

    async def async_fn(batch: list[tuple[int, int]]) -> Any:
        await anyio.lowlevel.checkpoint()
        return behave(batch)

    name = "faults"
    batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(
        async_fn if is_async else behave, max_batch_size=8, max_wait_ms=5, collate=None, name=name
    )
    threads: set[threading.Thread] = set()
    with anyio.fail_after(20):
        async with batcher:
            for number, rnd in enumerate(rounds):
                plan[number] = rnd.fault
                outcomes: list[Outcome] = []

                async def one(i: int, number: int = number) -> None:
                    outcomes.append(await call(batcher, (number, i)))  # noqa: B023

                async with anyio.create_task_group() as tg:
                    for i in range(rnd.callers):
                        tg.start_soon(one, i)
                assert len(outcomes) == rnd.callers
                for outcome in outcomes:
                    if rnd.fault in BASE_FAULTS:
                        assert type(outcome[1]) is BASE_FAULTS[rnd.fault], (rnd, outcome)
                    else:
                        assert FAULTS[rnd.fault][1](outcome), (rnd, outcome)
                # the batcher keeps serving, on the same worker thread
                plan[-number - 1] = "ok"
                assert await batcher.predict((-number - 1, 7)) == expected(7)
                threads.update(batchkit_threads(name))
    if not is_async:
        assert len(threads) == 1, "the worker thread was replaced: a fault killed it"
    stats = batcher.stats()
    check_settled(stats)
    assert stats.completed == len(rounds) + sum(r.callers for r in rounds if r.fault == "ok")
    assert not batchkit_threads(name)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(rounds=st.lists(fault_rounds, min_size=1, max_size=8))
def test_random_faults_of_a_sync_model_reach_only_their_batch(backend: str, rounds: list[FaultRound]) -> None:
    """A sync model that raises (Exceptions or BaseExceptions like SystemExit), returns
    the wrong length or a non-batch: each caller of that batch gets the model's own
    exception or ``BatchSizeMismatchError``; the next request is served by the same
    worker thread (no fault kills it)."""
    anyio.run(run_faults, rounds, False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(rounds=st.lists(fault_rounds, min_size=1, max_size=8))
def test_random_faults_of_an_async_model_reach_only_their_batch(backend: str, rounds: list[FaultRound]) -> None:
    """The same faults from an ``async`` model, BaseExceptions included: each reaches
    the callers of its batch as itself, and the worker keeps serving."""
    anyio.run(run_faults, rounds, True, backend=backend)


async def _async_base_exception() -> None:
    async def model(batch: list[str]) -> list[str]:
        if "die" in batch:
            raise Fatal("die")
        return batch

    batcher: batchkit.Batcher[str, str] = batchkit.Batcher(model, max_wait_ms=1, collate=None)
    with anyio.fail_after(5):
        async with batcher:
            outcome = await call(batcher, "die")
            assert type(outcome[1]) is Fatal, outcome
            assert await batcher.predict("fine") == "fine"
    check_settled(batcher.stats())


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_model_raising_a_base_exception_reaches_its_callers(backend: str) -> None:
    """An async model raising a BaseException that is not a cancellation: its callers
    get that exception, as with a sync model, and the batcher keeps serving."""
    anyio.run(_async_base_exception, backend=backend)


# -- exceptions that resist copying -----------------------------------------------


class NeedsTwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


class Uncopyable(Exception):
    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError("cannot copy me")


@pytest.mark.anyio
@pytest.mark.parametrize("error", [NeedsTwoArgs(1, 2), Uncopyable("no copies")])
async def test_an_exception_that_cannot_be_copied_still_reaches_every_caller(error: Exception) -> None:
    """Each caller normally gets its own copy of the model's exception; one that
    cannot be copied is shared instead of being lost."""

    def model(batch: list[int]) -> list[int]:
        if 0 in batch:
            raise error
        return batch

    async with batchkit.Batcher[Any, Any](model, max_batch_size=4, max_wait_ms=20, collate=None) as batcher:
        outcomes: list[Outcome] = []

        async def one(x: int) -> None:
            outcomes.append(await call(batcher, x))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for x in (0, 1, 2):
                    tg.start_soon(one, x)
            assert await batcher.predict(5) == 5
    assert [type(o[1]) for o in outcomes] == [type(error)] * 3
    assert all(str(o[1]) == str(error) for o in outcomes)
    check_settled(batcher.stats())


# -- collate and split that fail ----------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_custom_collate_or_split_fails_only_that_batch() -> None:
    """Errors raised by a user's collate or split reach the callers of that batch only."""

    def collate(items: list[int]) -> list[int]:
        if -1 in items:
            raise Boom("collate failed")
        return items

    def split(output: list[int]) -> list[int]:
        if -2 in output:
            raise KeyError("split failed")
        return output

    async with batchkit.Batcher[Any, Any](
        lambda b: b, max_batch_size=4, max_wait_ms=1, collate=(collate, split)
    ) as batcher:
        with anyio.fail_after(5):
            assert type((await call(batcher, -1))[1]) is Boom
            assert type((await call(batcher, -2))[1]) is KeyError
            assert await batcher.predict(3) == 3
    stats = batcher.stats()
    assert (stats.failed, stats.completed) == (2, 1)
    check_settled(stats)


class ShortSplit:
    """A full custom collator whose split drops the last output."""

    def key(self, item: Any) -> None:
        return None

    def collate(self, items: list[Any]) -> list[Any]:
        return items

    def split(self, output: Any, n: int, *batch: Any) -> list[Any]:
        return list(output)[:-1]


async def _short_split() -> None:
    async with batchkit.Batcher[Any, Any](lambda b: b, max_wait_ms=1, collate=ShortSplit()) as batcher:
        with anyio.fail_after(2):
            outcome = await call(batcher, 1)
        assert isinstance(outcome[1], batchkit.BatchSizeMismatchError), outcome
    check_settled(batcher.stats())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_custom_collator_returning_too_few_outputs_fails_its_callers(backend: str) -> None:
    """A custom collator whose ``split`` returns the wrong number of results gives each
    caller ``BatchSizeMismatchError`` instead of leaving them waiting forever (a run
    in a separate ``anyio.run``: before the fix, trio crashed with TrioInternalError)."""
    anyio.run(_short_split, backend=backend)


# -- hung models ------------------------------------------------------------------


@pytest.mark.anyio
async def test_hung_sync_batches_time_out_and_the_batcher_recovers_each_time() -> None:
    """Batches that run past ``run_timeout_ms`` fail with ``ModelTimeoutError`` (also a
    TimeoutError) for their callers; a fresh thread serves what follows, every
    time; the abandoned threads exit once the hung calls return."""
    release = threading.Event()

    def model(batch: list[str]) -> list[str]:
        if any(x.startswith("hang") for x in batch):
            release.wait(timeout=30)
        return batch

    name = "hangs"
    async with batchkit.Batcher[Any, Any](
        model, max_batch_size=4, max_wait_ms=1, run_timeout_ms=40, collate=None, name=name, replace_hung=True
    ) as batcher:
        with anyio.fail_after(10):
            for round_ in range(3):
                outcomes: list[Outcome] = []

                async def one(x: str) -> None:
                    outcomes.append(await call(batcher, x))  # noqa: B023

                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(one, f"hang{round_}-{i}")
                assert all(isinstance(o[1], batchkit.ModelTimeoutError) for o in outcomes), outcomes
                assert all(isinstance(o[1], TimeoutError) for o in outcomes)
                assert await batcher.predict(f"fine{round_}") == f"fine{round_}"
        stats = batcher.stats()
        assert stats.hung_batches >= 3
        assert (stats.failed, stats.completed) == (9, 3)
        release.set()
        await wait_until(lambda: len(batchkit_threads(name)) == 1)  # the abandoned threads are gone
    check_settled(batcher.stats())
    assert not batchkit_threads(name)


@pytest.mark.anyio
async def test_aclose_does_not_wait_for_a_hung_batch_beyond_run_timeout() -> None:
    """``aclose()`` during a hung batch returns once ``run_timeout_ms`` passes: the hung
    callers get ``ModelTimeoutError``, queued ones are still answered."""
    release = threading.Event()
    entered = threading.Event()

    def model(batch: list[str]) -> list[str]:
        if "hang" in batch:
            entered.set()
            release.wait(timeout=30)
        return batch

    name = "hung-close"
    batcher: batchkit.Batcher[str, str] = batchkit.Batcher(
        model, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50, collate=None, name=name, replace_hung=True
    )
    outcomes: dict[str, Outcome] = {}

    async def one(x: str) -> None:
        outcomes[x] = await call(batcher, x)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "hang")
            await wait_until(entered.is_set)
            tg.start_soon(one, "queued")
            await wait_until(lambda: batcher.stats().pending == 1)
            await batcher.aclose()
    assert isinstance(outcomes["hang"][1], batchkit.ModelTimeoutError)
    assert outcomes["queued"] == ("value", "queued")
    check_settled(batcher.stats())
    release.set()
    await wait_until(lambda: not batchkit_threads(name))


@pytest.mark.anyio
async def test_a_hung_async_model_is_cancelled_and_the_batcher_recovers() -> None:
    """An async model past ``run_timeout_ms`` is cancelled; its callers get
    ``ModelTimeoutError``, concurrent batches and later requests are unaffected."""

    async def model(batch: list[str]) -> list[str]:
        if "hang" in batch:
            await anyio.sleep(60)
        return batch

    async with batchkit.Batcher[Any, Any](
        model, max_batch_size=1, max_wait_ms=0, run_timeout_ms=40, max_concurrent_batches=2, collate=None
    ) as batcher:
        outcomes: dict[str, Outcome] = {}

        async def one(x: str) -> None:
            outcomes[x] = await call(batcher, x)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "hang")
                tg.start_soon(one, "fine")
            assert await batcher.predict("after") == "after"
    assert isinstance(outcomes["hang"][1], batchkit.ModelTimeoutError)
    assert outcomes["fine"] == ("value", "fine")
    assert batcher.stats().hung_batches == 1
    check_settled(batcher.stats())


# -- error isolation and out-of-memory halving ---------------------------------------


@dataclass(frozen=True)
class PoisonCase:
    poison: tuple[bool, ...]
    max_batch_size: int
    is_async: bool
    numpy: bool


poison_cases = st.builds(
    PoisonCase,
    poison=st.lists(st.booleans(), min_size=1, max_size=24).map(tuple),
    max_batch_size=st.integers(1, 16),
    is_async=st.booleans(),
    numpy=st.booleans(),
)


async def run_isolation(case: PoisonCase) -> None:
    calls: list[int] = []

    def fn(batch: Any) -> Any:
        calls.append(len(batch))
        values = [int(v) for v in (batch[:, 0] if case.numpy else batch)]
        if any(v < 0 for v in values):
            raise Boom("negative input")
        return batch * 10 if case.numpy else [v * 10 for v in values]

    async def async_fn(batch: Any) -> Any:
        return fn(batch)

    batcher: batchkit.Batcher[Any, Any] = batchkit.Batcher(
        async_fn if case.is_async else fn,
        max_batch_size=case.max_batch_size,
        max_wait_ms=20,
        collate="auto" if case.numpy else None,
        on_error="isolate",
    )
    inputs = [-(i + 1) if bad else i + 1 for i, bad in enumerate(case.poison)]
    outcomes: dict[int, Outcome] = {}

    async def one(i: int) -> None:
        x = np.array([inputs[i]]) if case.numpy else inputs[i]
        outcomes[i] = await call(batcher, x)

    with anyio.fail_after(20):
        async with batcher:
            async with anyio.create_task_group() as tg:
                for i in range(len(inputs)):
                    tg.start_soon(one, i)
    for i, x in enumerate(inputs):
        kind, value = outcomes[i]
        if x < 0:
            assert type(value) is Boom, (i, outcomes[i])
        else:
            assert kind == "value", (i, outcomes[i])
            assert (int(value[0]) if case.numpy else value) == 10 * x
    stats = batcher.stats()
    check_settled(stats)
    bad = sum(case.poison)
    assert (stats.completed, stats.failed) == (len(inputs) - bad, bad)
    # bisection: each poison input costs at most two calls per halving level
    levels = max(1, case.max_batch_size.bit_length())
    assert len(calls) <= stats.batches + 2 * bad * levels


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(case=poison_cases)
def test_isolate_fails_only_the_poison_inputs_wherever_they_are(backend: str, case: PoisonCase) -> None:
    """``on_error="isolate"``: poison inputs hidden at random positions among good ones
    fail alone, with the model's own exception; every good input gets its value;
    the extra model calls stay logarithmic."""
    anyio.run(run_isolation, case, backend=backend)


async def run_oom(limit: int, n: int, max_batch_size: int) -> None:
    sizes: list[int] = []

    def fn(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if len(batch) > limit:
            raise MemoryError(f"batch of {len(batch)} does not fit")
        return [x + 1 for x in batch]

    async with batchkit.Batcher[Any, Any](fn, max_batch_size=max_batch_size, max_wait_ms=20, collate=None) as batcher:
        with anyio.fail_after(20):
            outcomes: dict[int, Outcome] = {}

            async def one(i: int) -> None:
                outcomes[i] = await call(batcher, i)

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
            assert outcomes == {i: ("value", i + 1) for i in range(n)}
            if batcher.stats().oom_splits == 0:
                return  # every batch happened to fit
            assert batcher.stats().batch_size_limit <= limit
            sizes.clear()
            async with anyio.create_task_group() as tg:  # later batches are capped: no more OOM
                for i in range(n):
                    tg.start_soon(one, i)
            assert outcomes == {i: ("value", i + 1) for i in range(n)}
            assert max(sizes) <= limit
    check_settled(batcher.stats())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None, database=None)
@given(limit=st.integers(1, 8), n=st.integers(2, 20), max_batch_size=st.integers(2, 16))
def test_out_of_memory_halves_until_it_fits_and_caps_later_batches(
    backend: str, limit: int, n: int, max_batch_size: int
) -> None:
    """A model that runs out of memory above some batch size still answers every
    request (the batch is halved until it fits), and later batches are capped."""
    anyio.run(run_oom, limit, n, max_batch_size, backend=backend)


# -- overload --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_overload_sheds_beyond_max_queue_size_at_once_and_answers_the_rest() -> None:
    """2,000 callers at once against a stalled model and ``max_queue_size=500``: the
    queue never holds more than 500; the callers beyond it fail at once (while the
    model is still stalled) with ``QueueFullError``; every accepted one is answered
    once the model resumes; the model never sees a refused request."""
    gate = threading.Event()
    seen: list[int] = []

    def model(batch: list[int]) -> list[int]:
        gate.wait(timeout=30)
        seen.extend(batch)
        return batch

    queue_size, batch_size, load = 500, 10, 2_000
    outcomes: dict[int, Outcome] = {}

    async def one(i: int) -> None:
        outcomes[i] = await call(batcher, i)

    with anyio.fail_after(30):
        async with batchkit.Batcher[Any, Any](
            model, max_batch_size=batch_size, max_wait_ms=1, max_queue_size=queue_size, collate=None
        ) as batcher:
            async with anyio.create_task_group() as tg:
                for i in range(load):
                    tg.start_soon(one, i)
                await wait_until(lambda: batcher.stats().requests == load)
                stats = batcher.stats()
                assert stats.pending <= queue_size
                assert stats.rejected == load - stats.pending - stats.in_flight
                await wait_until(lambda: len(outcomes) == stats.rejected)  # refused at once, model still stalled
                assert all(isinstance(o[1], batchkit.QueueFullError) for o in outcomes.values())
                gate.set()
    refused = {i for i, o in outcomes.items() if isinstance(o[1], batchkit.QueueFullError)}
    accepted = {i: o for i, o in outcomes.items() if i not in refused}
    assert queue_size <= len(accepted) <= queue_size + batch_size
    assert all(o == ("value", i) for i, o in accepted.items())
    assert sorted(seen) == sorted(accepted)
    stats = batcher.stats()
    check_settled(stats)
    assert (stats.completed, stats.rejected) == (len(accepted), len(refused))
