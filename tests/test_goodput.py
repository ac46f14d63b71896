"""Goodput: the per-size cost model, the adaptive wait, deadline flushes, early failure and admission.

Timing rules are tested on a virtual clock (the real ``Scheduler`` driven by
hand, its clock replaced) or with gated models, never against absolute times.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import anyio
import pytest

import batchkit
import batchkit._scheduler as scheduler_module
from batchkit._cost import STALE_AFTER, WARMUP, CostBook, CostModel, bucket_of
from batchkit._deadlines import FLUSH_MARGIN, flush_by, hopeless_before, lower, time_to_answer, upper
from batchkit._execute import Outcome
from batchkit._policy import AdaptiveWait, ArrivalRate, make_policy
from batchkit._queue import Request, RequestQueue
from batchkit._scheduler import Batch, Scheduler
from batchkit._settings import Settings
from tests.conftest import RecordingModel
from tests.test_batching import wait_until
from tests.test_failures import check_invariant

MS = 0.001


def mlp_like(size: int) -> float:
    """A cost per sample that falls with the batch size: no straight line fits it."""
    return math.sqrt(size) * MS


def taught(sizes: list[int], cost: Any, rounds: int = 5) -> CostModel:
    model = CostModel()
    for _ in range(rounds):
        for size in sizes:
            model.observe(size, cost(size))
    return model


# -- the cost model -----------------------------------------------------------------------


def test_buckets_are_log_spaced_and_ordered() -> None:
    assert [bucket_of(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 24, 32)] == [
        0, 2, 3, 4, 4, 5, 5, 6, 6, 7, 8, 9, 10,
    ]  # fmt: skip
    buckets = [bucket_of(n) for n in range(1, 5000)]
    assert buckets == sorted(buckets)
    assert bucket_of(2**40) == bucket_of(2**50)  # the largest sizes share the last bucket


def test_cost_model_learns_each_size_where_a_line_cannot() -> None:
    model = taught([1, 4, 16, 64], mlp_like)
    for size in (1, 4, 16, 64):
        assert model.expected(size) == pytest.approx(mlp_like(size), rel=1e-6)
    # The least-squares line is off by a quarter or more at sizes 4 and 16; the per-size model is exact there.
    a, b = model.coefficients()
    assert abs(a + 4 * b - mlp_like(4)) > 0.25 * mlp_like(4)
    assert abs(a + 16 * b - mlp_like(16)) > 0.25 * mlp_like(16)
    # A size never seen lies on the line between the sizes seen on either side.
    assert mlp_like(4) < model.expected(8) < mlp_like(16)
    assert model.expected(8) == pytest.approx(mlp_like(4) + (mlp_like(16) - mlp_like(4)) * 4 / 12)


def test_cost_model_extends_beyond_the_sizes_seen() -> None:
    model = taught([8, 16], lambda n: 0.010 + 0.001 * n)
    assert model.expected(64) == pytest.approx(0.010 + 0.001 * 64, rel=0.01)  # up the fitted slope
    assert 0 < model.expected(1) <= model.expected(8)  # down the slope, never below a proportional share
    assert model.expected(1) >= model.expected(8) / 8


def test_cost_model_recovers_a_linear_cost() -> None:
    model = CostModel()
    for size in [1, 4, 16, 64, 8, 32] * 5:
        model.observe(size, 0.010 + 0.001 * size)
    a, b = model.coefficients()
    assert a == pytest.approx(0.010, rel=1e-6)
    assert b == pytest.approx(0.001, rel=1e-6)
    assert model.expected(10) == pytest.approx(0.020)
    same = CostModel()
    for _ in range(5):
        same.observe(8, 0.02)
    assert same.coefficients() == (0.0, pytest.approx(0.0025))  # no evidence of a fixed cost: none assumed
    noisy = CostModel()
    for size, seconds in [(1, 0.001), (2, 0.030), (1, 0.001), (2, 0.030)]:
        noisy.observe(size, seconds)
    assert noisy.coefficients()[0] <= 0.001  # a fixed cost above the fastest batch is not believed


def test_cost_model_before_any_batch_predicts_nothing() -> None:
    model = CostModel()
    assert model.expected(8) == 0.0
    assert model.spread(8) == 0.0
    for _ in range(WARMUP):
        assert not model.knows()
        model.observe(8, 0.01)
    assert model.knows()


def test_cost_model_spread() -> None:
    model = CostModel()
    for i in range(200):
        model.observe(8, 0.010 if i % 2 else 0.012)  # mean 11 ms, standard deviation 1 ms
    assert model.expected(8) == pytest.approx(0.011, rel=0.02)
    assert model.spread(8) == pytest.approx(0.001, rel=0.2)
    assert model.quantile(8, 0.5) == pytest.approx(model.expected(8))
    assert model.quantile(8, 0.975) == pytest.approx(model.expected(8) + 1.96 * model.spread(8), rel=1e-3)
    # A size without a spread of its own takes its neighbour's, relative to its expected time.
    model.observe(64, 0.044)
    assert model.spread(64) == pytest.approx(model.spread(8) / model.expected(8) * 0.044, rel=1e-6)
    steady = taught([8], lambda n: 0.01)
    assert steady.spread(8) == pytest.approx(0.0, abs=1e-12)


def test_cost_model_follows_a_slower_model_and_shrugs_off_one_stall() -> None:
    model = taught([16], lambda n: 0.010, rounds=20)
    model.observe(16, 1.0)  # one stall of the machine, 100x the usual run
    assert model.expected(16) < 0.011  # moved by at most a tenth of half the mean
    for _ in range(40):
        model.observe(16, 0.020)  # the model got twice as slow and stays so
    assert model.expected(16) == pytest.approx(0.020, rel=0.05)


def test_cost_book_keeps_groups_apart_once_they_have_their_own_data() -> None:
    book = CostBook()
    for _ in range(WARMUP):
        book.observe("short", 8, 0.001)
    assert book.model("long") is book.all  # no batch of its own yet: the batcher-wide model
    for _ in range(WARMUP):
        book.observe("long", 8, 0.010)
    assert book.model("short").expected(8) == pytest.approx(0.001)
    assert book.model("long").expected(8) == pytest.approx(0.010)
    assert 0.001 < book.all.expected(8) < 0.010
    for n in range(CostBook.GROUPS):
        book.observe(n, 8, 0.005)  # the least recently used groups are forgotten
    assert book.model("short") is book.all


# -- what it says about deadlines ------------------------------------------------------------


def test_pessimistic_and_optimistic_run_times() -> None:
    steady = taught([8], lambda n: 0.010)
    assert upper(steady, 8) == pytest.approx(0.011)  # no spread: still a tenth of margin either way
    assert lower(steady, 8) == pytest.approx(0.009)
    noisy = CostModel()
    for i in range(200):
        noisy.observe(8, 0.010 if i % 2 else 0.012)
    assert upper(noisy, 8) == pytest.approx(noisy.expected(8) + 2 * noisy.spread(8))
    assert lower(noisy, 8) == pytest.approx(noisy.expected(8) - 2 * noisy.spread(8))


def test_flush_by_leaves_room_for_a_pessimistic_run_and_the_loop() -> None:
    model = taught([1, 4, 16, 64], mlp_like)
    deadline, arrived = 10.0, 9.9  # a 100 ms wait: its tenth (10 ms) beats the 5 ms floor
    assert flush_by(model, 16, deadline, arrived) == pytest.approx(deadline - upper(model, 16) - 0.010)
    assert flush_by(model, 16, deadline, deadline - 0.020) == pytest.approx(deadline - upper(model, 16) - FLUSH_MARGIN)
    assert flush_by(model, 64, deadline, arrived) < flush_by(model, 1, deadline, arrived)  # by the batch's size


def test_hopeless_before() -> None:
    model = taught([1, 4, 16, 64], mlp_like)
    now = 0.5  # the model learned at 0.0 (observe's default)
    assert hopeless_before(CostModel(), 64, now, backlog=True) == now  # no data: only what is past
    assert hopeless_before(model, 64, now, backlog=True) == pytest.approx(now + model.expected(64))
    assert hopeless_before(model, 64, now, backlog=False) == pytest.approx(now + lower(model, 64))
    assert hopeless_before(model, 1, now, backlog=True) == pytest.approx(now + model.expected(1))
    later = STALE_AFTER + 0.5  # no batch for a while: the estimate is not acted on
    assert hopeless_before(model, 64, later, backlog=True) == later


def test_time_to_answer() -> None:
    line = taught([1, 8, 64], lambda n: 0.010 + 0.001 * n)
    c64 = line.expected(64)
    assert time_to_answer(CostModel(), 500, 64, 1, []) == 0.0  # no data: nothing is refused
    assert time_to_answer(line, 500, 64, 1, [], now=STALE_AFTER + 0.5) == 0.0  # stale data: nor on that
    # Nothing ahead, a slot free: just its own (optimistic) run.
    assert time_to_answer(line, 0, 64, 1, []) == pytest.approx(lower(line, 1))
    # 130 ahead: two full batches, then its own with the 2 left over; one batch half run.
    running = [(line, 64, c64 / 2)]
    expected = 2 * c64 + c64 / 2 + lower(line, 3)
    assert time_to_answer(line, 130, 64, 1, running) == pytest.approx(expected)
    # Two slots: the first full batch takes the free slot, the second the slot that frees at c64 / 2;
    # its own batch starts when the first of them ends (c64).
    assert time_to_answer(line, 130, 64, 2, running) == pytest.approx(c64 + lower(line, 3))
    # A batch that overran its expected time holds its slot for nothing more.
    assert time_to_answer(line, 64, 64, 1, [(line, 64, 10.0)]) == pytest.approx(c64 + lower(line, 1))
    # A free slot takes it at once, whatever runs elsewhere.
    assert time_to_answer(line, 10, 64, 2, running) == pytest.approx(lower(line, 11))


def test_queue_counts_who_is_surely_ahead() -> None:
    queue = RequestQueue()
    first = Request("a", "k", 0.0, 1.0, 1.0)
    assert queue.ahead(first, True) == 0
    for n in range(5):
        queue.push(Request(n, "k", 0.0, 1.0, 1.0), True)
    assert queue.ahead(Request("p", "k", 0.1, 1.1, 1.1), True) == 5  # joins the FIFO's tail
    assert queue.ahead(Request("u", "k", 0.1, 0.5, 0.5), True) == 0  # goes through the heaps: counted first
    assert queue.ahead(Request("q", "k", 0.1, 1.1, 0.0), False) == 0  # a priority: counted first
    queue.push(Request("h", "k", 0.1, 2.0, 0.2), False)
    assert queue.ahead(Request("p", "k", 0.1, 1.1, 1.1), True) == 5  # the heap entry may go after it
    assert queue.ahead(Request("p", "other", 0.1, 1.1, 1.1), True) == 0


def test_queue_expires_one_group_only() -> None:
    queue = RequestQueue()
    for key in ("a", "b"):
        for deadline in (1.0, 2.0, 3.0):
            queue.push(Request(deadline, key, 0.0, deadline, deadline), True)
    gone = queue.expired_in("a", 2.0)
    assert [r.item for r in gone] == [1.0, 2.0]
    a, b = queue.group("a"), queue.group("b")
    assert a is not None
    assert b is not None
    assert (a.live, b.live) == (1, 3)
    assert queue.expired_in("missing", 9.0) == []


# -- the adaptive wait -------------------------------------------------------------------------


class Running:
    def __init__(self, started_at: float, size: int) -> None:
        self.started_at = started_at
        self.requests = [None] * size


def test_adaptive_wait_sends_at_once_with_one_slot() -> None:
    model = taught([1, 8, 64], lambda n: 0.010 + 0.001 * n)
    policy = AdaptiveWait(model, None, [Running(1.0, 64)], slots=lambda: 1)
    assert policy.flush_at(Request(None, None, 1.001, math.inf, 0.0), 3, 64) == 1.001  # no wait: due on arrival


def test_adaptive_wait_spaces_batches_over_several_slots() -> None:
    model = taught([1, 8, 64], lambda n: 0.010 + 0.001 * n)  # the fixed cost is most of a batch's time
    running: list[Running] = []
    arrivals = ArrivalRate()
    arrivals.rate = 2000.0  # a request every half millisecond
    now = 1.001
    policy = AdaptiveWait(model, None, running, slots=lambda: 4, arrivals=arrivals, clock=lambda: now)
    oldest = Request(None, None, 1.001, math.inf, 0.0)
    assert policy.flush_at(oldest, 1, 64) == oldest.enqueued_at  # nothing runs: the slots are free: due at once
    running += [Running(0.990, 64), Running(1.0, 8)]
    # The slots, as one server four times as fast, are free a quarter of the last batch's run after it started.
    free = 1.0 + model.expected(8) / 4
    assert policy.flush_at(oldest, 1, 64) == pytest.approx(free)
    budget = AdaptiveWait(model, 0.020, running, slots=lambda: 4, arrivals=arrivals, clock=lambda: now)
    assert budget.flush_at(oldest, 1, 64) == pytest.approx(min(free, 1.021 - model.expected(1)))  # max_latency_ms
    tight = AdaptiveWait(model, 0.012, running, slots=lambda: 4, arrivals=arrivals, clock=lambda: now)
    assert tight.flush_at(oldest, 1, 64) == pytest.approx(1.013 - model.expected(1))


def test_adaptive_wait_sends_at_once_where_spacing_cannot_pay() -> None:
    flat = taught([1, 8, 64], lambda n: 0.010 + 0.001 * n)
    running = [Running(1.0, 8)]
    oldest = Request(None, None, 1.001, math.inf, 0.0)
    free = 1.0 + flat.expected(8) / 4

    def policy(model: CostModel, rate: float, now: float = 1.001) -> AdaptiveWait:
        arrivals = ArrivalRate()
        arrivals.rate = rate
        return AdaptiveWait(model, None, running, slots=lambda: 4, arrivals=arrivals, clock=lambda: now)

    assert policy(flat, 2000.0).flush_at(oldest, 1, 64) == pytest.approx(free)
    assert policy(CostModel(), 2000.0).flush_at(oldest, 1, 64) == oldest.enqueued_at  # no data yet
    # No request expected before the slots are free (one per 10 ms, 3.5 ms to go): nothing to gather.
    assert policy(flat, 100.0).flush_at(oldest, 1, 64) == oldest.enqueued_at
    assert policy(flat, 2000.0, now=free - 0.0001).flush_at(oldest, 1, 64) == oldest.enqueued_at  # nor in 0.1 ms
    # A cost mostly per sample: more batches side by side serve better than larger ones.
    per_sample = taught([1, 8, 64], lambda n: 0.0002 + 0.001 * n)
    assert policy(per_sample, 2000.0).flush_at(oldest, 1, 64) == oldest.enqueued_at


def test_arrival_rate_tracks_a_steady_stream() -> None:
    rate = ArrivalRate(horizon=0.05)
    for step in range(1, 200):
        rate.observe(step * 10, step * 0.01)  # 10 requests every 10 ms
    assert rate.rate == pytest.approx(1000.0, rel=0.01)


def test_make_policy_counts_the_slots() -> None:
    model = CostModel()
    sync = make_policy(Settings.build(is_async=False, max_wait_ms="auto", replicas=3), model)
    concurrent = make_policy(Settings.build(is_async=True, max_wait_ms="auto", max_concurrent_batches=2), model)
    assert isinstance(sync, AdaptiveWait)
    assert isinstance(concurrent, AdaptiveWait)
    assert (sync._slots(), concurrent._slots()) == (3, 2)


# -- the scheduler on a virtual clock ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Answers:
    """The part of a backend the scheduler uses; records each answer."""

    def __init__(self) -> None:
        self.results: dict[Request, Any] = {}
        self.errors: dict[Request, BaseException] = {}

    def is_current(self) -> bool:
        return True

    def withdrawn(self, request: Request) -> bool:
        return False

    def resolve(self, requests: Any, values: Any) -> None:
        self.results.update(zip(requests, values, strict=True))

    def fail(self, request: Request, error: BaseException) -> None:
        self.errors[request] = error


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(scheduler_module, "clock", fake)
    return fake


def make_scheduler(**options: Any) -> tuple[Scheduler, Answers]:
    scheduler = Scheduler(Settings.build(is_async=False, **options), lambda x: None, padded_cost=False, name="t")
    answers = Answers()
    scheduler.attach(answers)  # type: ignore[arg-type]
    return scheduler, answers


def run(scheduler: Scheduler, clock: Clock, batch: Batch, seconds: float) -> None:
    clock.now += seconds
    outcome = Outcome()
    outcome.outputs = list(batch.items)
    outcome.seconds = seconds
    scheduler.finish(batch, outcome)


def teach(scheduler: Scheduler, clock: Clock, size: int, seconds: float, times: int = WARMUP) -> None:
    for _ in range(times):
        for n in range(size):
            scheduler.submit(n, None, 0)
        batch = scheduler.take(clock.now, due=True)
        assert batch is not None
        assert len(batch.requests) == size
        run(scheduler, clock, batch, seconds)


def test_admission_refuses_a_request_the_queue_ahead_makes_late(clock: Clock) -> None:
    scheduler, answers = make_scheduler(max_batch_size=4, max_wait_ms=0, timeout_ms=25)
    teach(scheduler, clock, 4, 0.010)  # a batch of 4 takes 10 ms
    for n in range(4):
        scheduler.submit(n, None, 0)
    running = scheduler.take(clock.now)  # the only slot is busy from now on
    assert running is not None
    # One timeout for all: a FIFO. The answer of the k-th is predicted after the running batch (10 ms),
    # the full batches ahead of it (10 ms each) and its own: the 7th (a batch of 3 behind one full one,
    # about 27 ms) cannot make 25 ms.
    admitted: list[Request] = []

    def fill() -> None:
        for n in range(12):
            admitted.append(scheduler.submit(n, None, 0))

    with pytest.raises(batchkit.RequestTimeoutError, match=r"its 25 ms timeout.*6 queued ahead of it\); refused"):
        fill()
    assert len(admitted) == 6
    stats = scheduler.stats()
    assert stats.pending == 6  # the refused one was never queued
    assert stats.timed_out == 1  # counted, never silent
    check_invariant(stats)
    ok = scheduler.submit("in time", 60.0, 0)  # 60 ms is enough: admitted, behind the same six
    assert scheduler.stats().pending == 7
    while scheduler.pending or running is not None:
        if running is not None:
            run(scheduler, clock, running, 0.010)
        running = scheduler.take(clock.now)
    assert answers.results[ok] == "in time"
    assert all(r in answers.results or r in answers.errors for r in admitted)  # each answered, once
    check_invariant(scheduler.stats())


def test_admission_never_refuses_before_the_model_has_run(clock: Clock) -> None:
    scheduler, _ = make_scheduler(max_batch_size=4, max_wait_ms=0, timeout_ms=1)
    for n in range(100):
        scheduler.submit(n, None, 0)
    assert scheduler.take(clock.now) is not None  # busy, 96 queued, nothing learned yet
    scheduler.submit("hopeful", None, 0)  # would be refused on any data; there is none
    assert scheduler.stats().timed_out == 0


def test_admission_and_early_failure_are_off_for_a_plain_fifo(clock: Clock) -> None:
    scheduler, answers = make_scheduler(max_batch_size=4, max_wait_ms=0, timeout_ms=5)
    teach(scheduler, clock, 4, 0.010)
    scheduler.guard_deadlines = False
    for n in range(40):
        scheduler.submit(n, None, 0)
    late = scheduler.submit("late", None, 0)  # would be refused with the guard on
    batch = scheduler.take(clock.now)  # 5 ms left, batches take 10: sent all the same
    assert batch is not None
    assert len(batch.requests) == 4
    assert scheduler.stats().timed_out == 0
    scheduler.guard_deadlines = True
    with pytest.raises(batchkit.RequestTimeoutError):
        scheduler.submit("refused", None, 0)
    assert late not in answers.errors


def test_a_hopeless_request_fails_by_the_run_time_of_its_own_batch_size(clock: Clock) -> None:
    scheduler, answers = make_scheduler(max_batch_size=64, max_wait_ms=0)
    teach(scheduler, clock, 1, 0.001)  # a batch of 1 takes 1 ms
    teach(scheduler, clock, 64, 0.050)  # a batch of 64 takes 50 ms
    # Alone, 10 ms is plenty for a batch of 1 (the fastest recent batch, the old rule, said so too).
    alone = scheduler.submit("alone", 10.0, 0)
    batch = scheduler.take(clock.now)
    assert batch is not None
    assert batch.requests == [alone]
    run(scheduler, clock, batch, 0.001)
    assert answers.results[alone] == "alone"
    # Behind a backlog, its batch is a full one (50 ms): with 10 ms left it is failed, not sent.
    tight = scheduler.submit("tight", 10.0, 0)
    for n in range(100):
        scheduler.submit(n, None, 0)
    batch = scheduler.take(clock.now)
    assert batch is not None
    assert tight not in batch.requests
    assert len(batch.requests) == 64
    assert isinstance(answers.errors[tight], batchkit.RequestTimeoutError)
    assert "a batch of 64 is expected to take 50 ms" in str(answers.errors[tight])
    check_invariant(scheduler.stats())


def test_hopeless_requests_leave_before_the_batch_forms_so_others_fill_it(clock: Clock) -> None:
    scheduler, answers = make_scheduler(max_batch_size=4, max_wait_ms=0)
    teach(scheduler, clock, 4, 0.020)
    doomed = [scheduler.submit(n, 30.0, 0) for n in range(2)]
    clock.now += 0.015  # 15 ms left for them; a batch takes 20
    fine = [scheduler.submit(n, 1000.0, 0) for n in range(6)]
    batch = scheduler.take(clock.now)
    assert batch is not None
    assert batch.requests == fine[:4]  # a full batch of requests that can make it
    assert all(isinstance(answers.errors[r], batchkit.RequestTimeoutError) for r in doomed)


def test_deadline_flush_leaves_time_for_the_batch_it_would_form(clock: Clock) -> None:
    scheduler, _ = make_scheduler(max_batch_size=64, max_wait_ms=1000)
    teach(scheduler, clock, 1, 0.002)
    teach(scheduler, clock, 64, 0.040)
    model = scheduler.costs.model(None)
    arrived = clock.now
    first = scheduler.submit("first", 200.0, 0)
    for n in range(9):
        scheduler.submit(n, None, 0)
    assert scheduler.take(clock.now) is None  # not full, long fixed wait: not due yet
    expected = flush_by(model, 10, first.deadline, arrived)
    assert scheduler.flush_at == pytest.approx(expected)
    assert expected < first.deadline - model.expected(10) - FLUSH_MARGIN
    assert expected > first.deadline - model.expected(64) - 0.1 * 0.2  # sized for 10, not for a full batch
    clock.now = expected
    batch = scheduler.take(clock.now)
    assert batch is not None
    assert len(batch.requests) == 10


# -- through a Batcher, on both backends -----------------------------------------------------


async def settle(batcher: batchkit.Batcher[Any, Any], x: Any) -> None:
    """Predict, accepting a timeout (the queue of a test may outlive its requests)."""
    with contextlib.suppress(batchkit.RequestTimeoutError):
        await batcher.predict(x)


@pytest.mark.anyio
async def test_batcher_refuses_at_admission_what_the_queue_makes_late() -> None:
    slow = RecordingModel(gated=True)

    def model(batch: list[Any]) -> list[Any]:
        time.sleep(0.060)
        return slow(batch)  # type: ignore[no-any-return]

    refused: list[tuple[Any, str]] = []

    async def call(x: Any) -> None:
        try:
            await batcher.predict(x)
        except batchkit.RequestTimeoutError as error:
            if "refused" in str(error):
                refused.append((x, str(error)))

    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, timeout_ms=300, collate=None) as batcher:
        slow.gate.set()
        for _ in range(WARMUP):
            await batcher.predict("teach")  # batches take at least 60 ms
        slow.gate.clear()
        slow.entered.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "running")
            await wait_until(slow.entered.is_set)
            # One timeout for all (a FIFO): each new request has more batches of 60 ms ahead of it,
            # until one cannot make 300 ms.
            for n in range(20):
                tg.start_soon(call, n)
                await wait_until(lambda n=n: batcher.stats().pending + batcher.stats().timed_out == n + 1)
                if refused:
                    break
            pending = batcher.stats().pending
            slow.gate.set()
    assert len(refused) == 1
    x, message = refused[0]
    assert f"{pending} queued ahead of it" in message
    assert pending >= 2  # at least one full batch was ahead of it
    assert x not in slow.seen
    check_invariant(batcher.stats())


@pytest.mark.anyio
async def test_batcher_admits_before_warmup_and_times_out_as_usual() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, max_batch_size=2, max_wait_ms=0, collate=None) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "running")
            await wait_until(model.entered.is_set)
            for n in range(8):
                tg.start_soon(batcher.predict, n)
            await wait_until(lambda: batcher.stats().pending == 8)
            with pytest.raises(batchkit.RequestTimeoutError, match="timed out after 20 ms"):
                await batcher.predict("no data yet", timeout_ms=20)  # admitted (no data), then timed out
            model.gate.set()
    assert "no data yet" not in model.seen
    check_invariant(batcher.stats())


def test_a_slow_estimate_is_checked_again_after_a_while(clock: Clock) -> None:
    scheduler, answers = make_scheduler(max_batch_size=4, max_wait_ms=0, timeout_ms=50)
    teach(scheduler, clock, 1, 0.100)  # a cold start: batches of 1 "take 100 ms"
    with pytest.raises(batchkit.RequestTimeoutError, match="refused"):
        scheduler.submit("refused", None, 0)
    # Nothing runs to correct the estimate while everything is refused; after a while it is checked again.
    clock.now += STALE_AFTER + 0.001
    probe = scheduler.submit("probe", None, 0)
    batch = scheduler.take(clock.now)
    assert batch is not None
    assert batch.requests == [probe]  # not failed as hopeless either
    run(scheduler, clock, batch, 0.001)  # the model is fast now
    assert answers.results[probe] == "probe"
    assert scheduler.costs.model(None).expected(1) == pytest.approx(0.001)  # the stale estimate is replaced
    scheduler.submit("admitted", None, 0)
    check_invariant(scheduler.stats())


@pytest.mark.anyio
async def test_a_batcher_recovers_from_a_cold_start_that_made_every_request_look_hopeless() -> None:
    calls = 0

    def model(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls <= WARMUP + 1:
            time.sleep(0.1)  # a cold start long enough for the model to trust it
        return batch

    answered = 0
    async with batchkit.Batcher(model, collate=None, max_wait_ms=0) as batcher:
        for x in range(WARMUP + 1):
            await batcher.predict(x)
        with anyio.fail_after(10):
            while answered < 20:
                try:
                    assert await batcher.predict(1, timeout_ms=50) == 1
                    answered += 1
                except batchkit.RequestTimeoutError:
                    await anyio.sleep(0.01)
    assert calls > WARMUP + 1
    check_invariant(batcher.stats())
