"""Property tests: random schedules of requests, cancellations, deadlines, faults and ``aclose()``.

Each hypothesis example is one whole scenario, run to completion with
``anyio.run(..., backend=...)`` inside a synchronous test that is parametrized
over asyncio and trio. Two families:

* ``test_gated_schedule_*``: the model holds every batch until the test releases
  it (with a verdict: return, raise, or return the wrong number of outputs). While
  a batch is held, nothing else can be dispatched (one slot), so a request that
  was submitted *and* ended (cancelled, or deadline passed) before that batch
  was released is known to have ended before dispatch: the model must never see
  it. No assertion depends on how fast anything ran.
* ``test_free_running_*``: no gate; callers arrive after random delays, with random
  deadlines and cancellations, a model that sleeps a little and fails on poison
  inputs, several replicas, and ``aclose()`` at a random moment.

After every example: each caller ended exactly once, with its own value or an
error it can be blamed for; no batch exceeded ``max_batch_size``; the model saw no
request twice; the stats add up, with nothing pending or in flight; the
batcher's threads are gone.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import batchkit
from tests._reliability import BACKENDS, Boom, Outcome, batchkit_threads, call, check_settled, wait_until

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow],
)
LONG_MS = 60_000.0
_names = itertools.count()


def expected(x: int) -> int:
    """What the test models return for input ``x`` (so a caller can tell its own answer)."""
    return 2 * x + 1


# -- gated schedules --------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    timeout_ms: float | None
    cancel: bool  # cancelled by the test in the round it was submitted in
    priority: float


@dataclass(frozen=True)
class Round:
    new: tuple[Spec, ...]  # requests submitted in this round
    verdict: str  # how the batch held during this round ends: "ok", "raise" or "mismatch"
    sleep_ms: float  # real time spent in the round before the held batch is released
    cancel_running: int  # callers of the held batch that the test cancels
    close: bool  # aclose() starts in this round


@dataclass(frozen=True)
class Schedule:
    rounds: tuple[Round, ...]
    max_batch_size: int
    max_wait_ms: float
    is_async: bool


specs = st.builds(
    Spec,
    timeout_ms=st.sampled_from([None, None, None, 1.0, 3.0, 10.0, LONG_MS]),
    cancel=st.sampled_from([False, False, False, True]),
    priority=st.sampled_from([0.0, 0.0, 0.0, 2.0, -1.0]),
)
rounds = st.builds(
    Round,
    new=st.lists(specs, max_size=6).map(tuple),
    verdict=st.sampled_from(["ok", "ok", "ok", "raise", "mismatch"]),
    sleep_ms=st.sampled_from([0.0, 1.0, 2.0, 5.0]),
    cancel_running=st.integers(0, 2),
    close=st.sampled_from([False] * 7 + [True]),
)
schedules = st.builds(
    Schedule,
    rounds=st.lists(rounds, min_size=1, max_size=8).map(tuple),
    max_batch_size=st.integers(1, 5),
    max_wait_ms=st.sampled_from([0.0, 1.0, 5.0]),
    is_async=st.booleans(),
)


@dataclass
class HeldCall:
    items: list[int]
    gate: threading.Event = field(default_factory=threading.Event)
    verdict: str = "ok"


class GatedModel:
    """A batch function that holds every call until the test releases it with a verdict."""

    def __init__(self) -> None:
        self.calls: list[HeldCall] = []
        self._lock = threading.Lock()

    def _enter(self, batch: list[int]) -> HeldCall:
        held = HeldCall(list(batch))
        with self._lock:
            self.calls.append(held)
        return held

    def release(self, index: int, verdict: str) -> None:
        held = self.calls[index]
        held.verdict = verdict
        held.gate.set()

    @staticmethod
    def _answer(held: HeldCall, index: int) -> list[int]:
        if held.verdict == "raise":
            raise Boom(f"call {index}")
        outputs = [expected(x) for x in held.items]
        return outputs[:-1] if held.verdict == "mismatch" else outputs

    def sync_fn(self, batch: list[int]) -> list[int]:
        held = self._enter(batch)
        index = self.calls.index(held)
        if not held.gate.wait(timeout=20):
            raise RuntimeError("the test never released this batch")
        return self._answer(held, index)

    async def async_fn(self, batch: list[int]) -> list[int]:
        held = self._enter(batch)
        index = self.calls.index(held)
        with anyio.fail_after(20):
            while not held.gate.is_set():
                await anyio.sleep(0.0005)
        return self._answer(held, index)


async def run_gated(schedule: Schedule) -> None:
    model = GatedModel()
    name = f"gated{next(_names)}"
    fn = model.async_fn if schedule.is_async else model.sync_fn
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        fn,
        max_batch_size=schedule.max_batch_size,
        max_wait_ms=schedule.max_wait_ms,
        collate=None,
        name=name,
    )
    outcomes: dict[int, Outcome] = {}
    specs_by_id: dict[int, Spec] = {}
    scopes: dict[int, anyio.CancelScope] = {}
    submitted_while_held: dict[int, int] = {}  # request -> index of the call held when it was submitted
    cancelled_by_test: set[int] = set()
    after_close: set[int] = set()
    must_not_run: set[int] = set()
    released = 0
    closing = False
    closed = False

    def idle() -> bool:
        stats = batcher.stats()
        return stats.pending == 0 and stats.in_flight == 0

    async def caller(rid: int, spec: Spec, scope: anyio.CancelScope) -> None:
        outcome: Outcome = ("cancelled", None)
        with scope:
            outcome = await call(batcher, rid, timeout_ms=spec.timeout_ms, priority=spec.priority)
        assert rid not in outcomes, f"request {rid} ended twice"
        outcomes[rid] = outcome

    async def closer() -> None:
        nonlocal closed
        await batcher.aclose()
        closed = True

    next_id = 0
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for rnd in schedule.rounds:
                held = released if len(model.calls) > released else None
                new_ids = []
                for spec in rnd.new:
                    rid, next_id = next_id, next_id + 1
                    specs_by_id[rid] = spec
                    scopes[rid] = anyio.CancelScope()
                    if held is not None:
                        submitted_while_held[rid] = held
                    if closing:
                        after_close.add(rid)
                    new_ids.append(rid)
                    tg.start_soon(caller, rid, spec, scopes[rid])
                # every new caller is inside predict (queued, or refused if closing)
                await wait_until(lambda: batcher.stats().requests == next_id)  # noqa: B023
                if rnd.close and not closing:
                    closing = True
                    tg.start_soon(closer)
                    await wait_until(lambda: batcher.closed)
                to_cancel = [rid for rid, spec in zip(new_ids, rnd.new, strict=True) if spec.cancel]
                if held is not None:
                    running = [rid for rid in model.calls[held].items if rid not in outcomes]
                    to_cancel += running[: rnd.cancel_running]
                for rid in to_cancel:
                    cancelled_by_test.add(rid)
                    scopes[rid].cancel()
                await anyio.sleep(rnd.sleep_ms / 1000)
                if held is not None:
                    # the cancelled callers end promptly: wait for them, then record who
                    # ended while still queued behind the held batch
                    await wait_until(lambda: all(r in outcomes for r in to_cancel))  # noqa: B023
                    for rid, during in submitted_while_held.items():
                        if during == held and rid in outcomes:
                            kind, value = outcomes[rid]
                            if kind == "cancelled" or isinstance(value, batchkit.RequestTimeoutError):
                                must_not_run.add(rid)
                    model.release(held, rnd.verdict)
                    released += 1
                await wait_until(lambda: len(model.calls) > released or idle())  # noqa: B023
            # drain: release every batch that comes, until every caller has ended and aclose() returned
            if not closing:
                tg.start_soon(closer)
            while not (closed and len(outcomes) == next_id):
                if len(model.calls) > released:
                    model.release(released, "ok")
                    released += 1
                await anyio.sleep(0.0005)

    # every request ended exactly once
    assert sorted(outcomes) == list(range(next_id))
    # the model saw no request twice, and no batch over max_batch_size
    seen_in: dict[int, int] = {}
    for index, held_call in enumerate(model.calls):
        assert 1 <= len(held_call.items) <= schedule.max_batch_size
        for rid in held_call.items:
            assert rid not in seen_in, f"request {rid} sent to the model twice"
            seen_in[rid] = index
    # nothing that ended while queued behind a held batch ever reached the model
    assert not (must_not_run & seen_in.keys()), (must_not_run & seen_in.keys(), model.calls)
    # each caller got its own value, or an error that is its own
    values = model_errors = timeouts = cancels = 0
    for rid, (kind, value) in outcomes.items():
        verdict = model.calls[seen_in[rid]].verdict if rid in seen_in else None
        if rid in after_close:
            assert kind == "error", (rid, kind, value)
            assert isinstance(value, batchkit.BatcherClosedError), (rid, kind, value)
            assert rid not in seen_in
        elif kind == "value":
            assert value == expected(rid)
            assert verdict == "ok"
            values += 1
        elif kind == "cancelled":
            assert rid in cancelled_by_test
            cancels += 1
        elif isinstance(value, batchkit.RequestTimeoutError):
            assert specs_by_id[rid].timeout_ms is not None
            timeouts += 1
        elif isinstance(value, Boom):
            assert verdict == "raise"
            assert str(value) == f"call {seen_in[rid]}"
            model_errors += 1
        elif isinstance(value, batchkit.BatchSizeMismatchError):
            assert verdict == "mismatch"
            model_errors += 1
        else:
            raise AssertionError(f"request {rid} ended with an unexpected {value!r}")
    # the stats add up, and agree with what the callers saw (a caller the test
    # cancelled may have been answered, or timed out, just before the cancel arrived)
    stats = batcher.stats()
    check_settled(stats)
    assert stats.requests == next_id
    assert stats.rejected == len(after_close)
    surplus = [stats.completed - values, stats.failed - model_errors, stats.timed_out - timeouts]
    assert all(s >= 0 for s in surplus), (stats, values, model_errors, timeouts, cancels)
    assert sum(surplus) == cancels - stats.cancelled, (stats, values, model_errors, timeouts, cancels)
    assert not batchkit_threads(name)
    for label, count in [
        ("dead before dispatch", len(must_not_run)),
        ("value", values),
        ("model error", model_errors),
        ("timeout", timeouts),
        ("cancelled", cancels),
        ("refused after aclose", len(after_close)),
    ]:
        event(f"gated: {label}: {'some' if count else 'none'}")


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(schedule=schedules)
def test_gated_schedule_every_request_ends_once_and_nothing_dead_is_dispatched(
    backend: str, schedule: Schedule
) -> None:
    """Exactly-once answers; cancelled/expired-while-queued requests never reach the model.

    Random rounds of submissions (with and without deadlines and priorities), cancellations of
    queued and of running requests, batches that succeed, raise or return the
    wrong length, and ``aclose()`` at a random round.
    """
    anyio.run(run_gated, schedule, backend=backend)


# -- free-running schedules -------------------------------------------------------


@dataclass(frozen=True)
class FreeRequest:
    delay_ms: float
    timeout_ms: float | None
    cancel_after_ms: float | None
    poison: bool
    priority: float
    cost: float


@dataclass(frozen=True)
class FreeSchedule:
    requests: tuple[FreeRequest, ...]
    max_batch_size: int
    max_wait_ms: float | Literal["auto"]
    run_ms: float
    is_async: bool
    parallel: int  # replicas (sync model) or max_concurrent_batches (async model)
    isolate: bool
    close_after_ms: float | None
    allowed: tuple[int, ...]  # allowed_batch_sizes (those above max_batch_size are left out); () for None
    max_batch_cost: float | None  # with batch_cost = each request's cost
    max_latency_ms: float | None  # only with max_wait_ms="auto"


free_requests = st.builds(
    FreeRequest,
    delay_ms=st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0]),
    timeout_ms=st.sampled_from([None, None, 1.0, 5.0, LONG_MS]),
    cancel_after_ms=st.sampled_from([None, None, None, 0.0, 1.0, 4.0]),
    poison=st.sampled_from([False] * 5 + [True]),
    priority=st.sampled_from([0.0, 0.0, 0.0, 1.0, -1.0, 3.0]),
    cost=st.sampled_from([1.0, 1.0, 2.0, 5.0]),
)
free_schedules = st.builds(
    FreeSchedule,
    requests=st.lists(free_requests, min_size=1, max_size=40).map(tuple),
    max_batch_size=st.integers(1, 8),
    max_wait_ms=st.sampled_from([0.0, 1.0, 3.0, "auto"]),
    run_ms=st.sampled_from([0.0, 0.5, 2.0]),
    is_async=st.booleans(),
    parallel=st.integers(1, 2),
    isolate=st.booleans(),
    close_after_ms=st.sampled_from([None, None, 0.0, 1.0, 3.0, 8.0]),
    allowed=st.one_of(st.just(()), st.sets(st.integers(1, 8), min_size=1).map(lambda s: tuple(sorted(s)))),
    max_batch_cost=st.sampled_from([None, None, 4.0, 10.0]),
    max_latency_ms=st.sampled_from([None, 2.0, 20.0]),
)


async def run_free(schedule: FreeSchedule) -> None:
    poison = {i for i, r in enumerate(schedule.requests) if r.poison}
    calls: list[list[int]] = []
    lock = threading.Lock()

    def answer(batch: list[int]) -> list[int]:
        if poison.intersection(batch):
            raise Boom("poison in batch")
        return [expected(x) for x in batch]

    def sync_fn(batch: list[int]) -> list[int]:
        with lock:
            calls.append(list(batch))
        time.sleep(schedule.run_ms / 1000)
        return answer(batch)

    async def async_fn(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        await anyio.sleep(schedule.run_ms / 1000)
        return answer(batch)

    name = f"free{next(_names)}"
    allowed = [size for size in schedule.allowed if size <= schedule.max_batch_size]
    parallel = {"max_concurrent_batches" if schedule.is_async else "replicas": schedule.parallel}
    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        async_fn if schedule.is_async else sync_fn,
        max_batch_size=schedule.max_batch_size,
        max_wait_ms=schedule.max_wait_ms,
        collate=None,
        on_error="isolate" if schedule.isolate else "raise",
        allowed_batch_sizes=allowed or None,
        batch_cost=None if schedule.max_batch_cost is None else (lambda rid: schedule.requests[rid].cost),
        max_batch_cost=schedule.max_batch_cost,
        max_latency_ms=schedule.max_latency_ms if schedule.max_wait_ms == "auto" else None,
        name=name,
        **parallel,
    )
    outcomes: dict[int, Outcome] = {}
    refused: set[int] = set()

    async def caller(rid: int, spec: FreeRequest) -> None:
        await anyio.sleep(spec.delay_ms / 1000)
        outcome: Outcome = ("cancelled", None)
        with anyio.CancelScope() as scope:
            if spec.cancel_after_ms is not None:
                scope.deadline = anyio.current_time() + spec.cancel_after_ms / 1000
            if batcher.closed:  # predict checks this first, with no await before
                refused.add(rid)
            outcome = await call(batcher, rid, timeout_ms=spec.timeout_ms, priority=spec.priority)
        assert rid not in outcomes, f"request {rid} ended twice"
        outcomes[rid] = outcome

    async def closer(after_ms: float) -> None:
        await anyio.sleep(after_ms / 1000)
        await batcher.aclose()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for rid, spec in enumerate(schedule.requests):
                tg.start_soon(caller, rid, spec)
            if schedule.close_after_ms is not None:
                tg.start_soon(closer, schedule.close_after_ms)
        await batcher.aclose()

    n = len(schedule.requests)
    assert sorted(outcomes) == list(range(n))
    assert all(1 <= len(batch) <= schedule.max_batch_size for batch in calls)
    if allowed:
        assert all(len(batch) in allowed for batch in calls)
    if schedule.max_batch_cost is not None:  # a batch holds at least one request, else fits the budget
        for batch in calls:
            rids = set(batch)
            assert len(rids) == 1 or sum(schedule.requests[r].cost for r in rids) <= schedule.max_batch_cost
    seen = [rid for batch in calls for rid in set(batch)]  # padding repeats a batch's last input
    if not schedule.isolate:
        assert len(seen) == len(set(seen)), "a request was sent to the model twice"
    values = model_errors = timeouts = cancels = 0
    for rid, (kind, value) in outcomes.items():
        spec = schedule.requests[rid]
        if rid in refused:
            assert kind == "error", (rid, kind, value)
            assert isinstance(value, batchkit.BatcherClosedError), (rid, kind, value)
            assert rid not in seen
        elif kind == "value":
            assert value == expected(rid)
            assert rid not in poison
            values += 1
        elif kind == "cancelled":
            assert spec.cancel_after_ms is not None
            cancels += 1
        elif isinstance(value, batchkit.RequestTimeoutError):
            assert spec.timeout_ms is not None
            timeouts += 1
        elif isinstance(value, Boom):
            # isolate: only a poison input fails; raise: only the batch-mates of one
            batches = [batch for batch in calls if rid in batch]
            if schedule.isolate:
                assert rid in poison
            else:
                assert len(batches) == 1
                assert poison.intersection(batches[0])
            model_errors += 1
        else:
            raise AssertionError(f"request {rid} ended with an unexpected {value!r}")
    stats = batcher.stats()
    check_settled(stats)
    assert stats.requests == n
    assert stats.rejected == len(refused)
    surplus = [stats.completed - values, stats.failed - model_errors, stats.timed_out - timeouts]
    assert all(s >= 0 for s in surplus), (stats, values, model_errors, timeouts, cancels)
    assert sum(surplus) == cancels - stats.cancelled, (stats, values, model_errors, timeouts, cancels)
    assert not batchkit_threads(name)
    for label, count in [
        ("value", values),
        ("model error", model_errors),
        ("timeout", timeouts),
        ("cancelled", cancels),
        ("refused after aclose", len(refused)),
    ]:
        event(f"free: {label}: {'some' if count else 'none'}")


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(schedule=free_schedules)
def test_free_running_schedule_every_request_ends_once_with_its_own_answer(
    backend: str, schedule: FreeSchedule
) -> None:
    """Exactly-once answers under real timing: arrivals, deadlines, priorities, cancels, poison,
    replicas, padding to ``allowed_batch_sizes``, a ``max_batch_cost`` budget, the adaptive
    wait (``max_wait_ms="auto"``, with ``max_latency_ms``) and ``aclose()`` at a random moment.

    With ``on_error="raise"`` a poison input fails exactly its own batch; with
    ``"isolate"`` it fails only itself. Requests made after ``aclose()`` began are
    refused with ``BatcherClosedError`` and never reach the model; every other
    one is answered. Stats add up and no thread is left.
    """
    anyio.run(run_free, schedule, backend=backend)


async def _padding_above_max_batch_size() -> None:
    sizes: list[int] = []

    def model(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        return batch

    batcher: batchkit.Batcher[int, int] = batchkit.Batcher(
        model, max_batch_size=3, max_wait_ms=20, allowed_batch_sizes=(1, 4, 8), collate=None
    )
    with anyio.fail_after(10):
        async with batcher:
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(batcher.predict, i)
    assert max(sizes) <= 3, f"the model was given batches of {sizes} with max_batch_size=3"


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_exceeds_max_batch_size(backend: str) -> None:
    """``max_batch_size`` is "the largest batch the model is given", padding included."""
    anyio.run(_padding_above_max_batch_size, backend=backend)
