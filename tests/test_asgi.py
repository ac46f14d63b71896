"""batchkit.asgi: predict cancelled by a client disconnect, errors as HTTP answers, readiness from stats.

The handlers are driven with a hand-made ASGI ``receive`` channel, on asyncio and
trio; tests/test_production.py drives the same code over real HTTP.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
from typing import Any

import anyio
import pytest

pytest.importorskip("starlette")

from starlette.requests import Request

import batchkit
from batchkit._extras import DISTRIBUTION
from batchkit.asgi import (
    ClientDisconnect,
    error_handler,
    error_response,
    error_status,
    predict_or_disconnect,
    readiness,
)
from tests._reliability import check_settled, wait_until
from tests.conftest import RecordingModel


class Channel:
    """An ASGI receive channel: the body already read, then ``http.disconnect`` once ``leave()`` is called."""

    def __init__(self, *, extra_body: int = 0) -> None:
        self.left = anyio.Event()
        self.extra_body = extra_body  # http.request messages before the disconnect (a body not read)
        self.received = 0

    def leave(self) -> None:
        self.left.set()

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        if self.extra_body:
            self.extra_body -= 1
            return {"type": "http.request", "body": b"x", "more_body": True}
        await self.left.wait()
        return {"type": "http.disconnect"}


def request(channel: Channel) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    return Request(scope, channel.receive)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_result_comes_back_when_the_client_stays() -> None:
    channel = Channel()
    async with batchkit.Batcher(lambda b: [x * 2 for x in b], collate=None, max_wait_ms=0) as batcher:
        with anyio.fail_after(10):
            assert await predict_or_disconnect(request(channel), batcher, 21) == 42
            assert await predict_or_disconnect(request(channel), batcher, 1, timeout_ms=5000) == 2
        check_settled(batcher.stats())


@pytest.mark.anyio
@pytest.mark.parametrize("extra_body", [0, 3])
async def test_a_client_that_leaves_while_queued_is_never_computed(extra_body: int) -> None:
    model = RecordingModel(gated=True)
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0)
    channel = Channel(extra_body=extra_body)
    outcome: list[object] = []

    async def leaver() -> None:
        try:
            outcome.append(await predict_or_disconnect(request(channel), batcher, "left"))
        except ClientDisconnect as exc:
            outcome.append(exc)

    with anyio.fail_after(10):
        async with batcher, anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "first")  # holds the only slot
            await wait_until(model.entered.is_set)
            tg.start_soon(leaver)
            await wait_until(lambda: batcher.stats().pending == 1)
            channel.leave()
            await wait_until(lambda: bool(outcome))
            stats = batcher.stats()
            assert stats.pending == 0
            assert stats.cancelled == 1
            model.gate.set()
    assert isinstance(outcome[0], ClientDisconnect)
    assert model.batches == [["first"]]  # "left" never reached the model
    assert channel.received == extra_body + 1  # the body's messages were dropped, the disconnect seen
    check_settled(batcher.stats())


@pytest.mark.anyio
async def test_errors_are_raised_as_themselves_not_as_a_group() -> None:
    channel = Channel()

    def failing(batch: list[Any]) -> list[Any]:
        raise ValueError("the model failed")

    async with batchkit.Batcher(failing, collate=None, max_wait_ms=0) as batcher:
        with anyio.fail_after(10), pytest.raises(ValueError, match="the model failed"):
            await predict_or_disconnect(request(channel), batcher, 1)
    async with batchkit.Batcher(lambda b: b, max_wait_ms=0) as batcher:  # auto collate: a str is invalid
        with anyio.fail_after(10), pytest.raises(batchkit.InvalidInputError):
            await predict_or_disconnect(request(channel), batcher, "not an array")
    gated = RecordingModel(gated=True)
    async with batchkit.Batcher(gated, collate=None, max_batch_size=1, max_wait_ms=0) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "first")
            await wait_until(gated.entered.is_set)
            with anyio.fail_after(10), pytest.raises(batchkit.RequestTimeoutError):
                await predict_or_disconnect(request(channel), batcher, "late", timeout_ms=20)
            gated.gate.set()


@pytest.mark.anyio
async def test_an_outer_cancellation_still_cancels() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, "first")
            await wait_until(model.entered.is_set)
            with anyio.move_on_after(0.05) as scope:
                await predict_or_disconnect(request(Channel()), batcher, "cancelled")
            assert scope.cancelled_caught
            model.gate.set()
        assert model.batches == [["first"]]
        check_settled(batcher.stats())


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["ok", "timeout", "disconnect"])
async def test_answers_leave_nothing_for_the_cycle_collector(kind: str) -> None:
    model = RecordingModel(gated=kind != "ok")
    batcher = batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0)
    answered: list[bool] = []

    async def one(i: int) -> None:
        channel = Channel()
        if kind == "disconnect":
            channel.leave()
        try:
            await predict_or_disconnect(request(channel), batcher, i, timeout_ms=5 if kind == "timeout" else None)
        except (ClientDisconnect, batchkit.RequestTimeoutError) as exc:
            answered.append(error_response(exc) is not None)  # the response is part of the answer checked

    async def wave() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)

    with anyio.fail_after(30):
        async with batcher, anyio.create_task_group() as tg:
            if kind != "ok":
                tg.start_soon(batcher.predict, -1)  # holds the slot: the others wait in the queue
                await wait_until(model.entered.is_set)
            await wave()  # warm up
            gc.collect()
            gc.disable()
            try:
                await wave()
                await anyio.sleep(0.05)
                found = gc.collect()
            finally:
                gc.enable()
            model.gate.set()
    assert found == 0, f"{found} objects were freed only by the cycle collector after 50 {kind} answers"
    assert all(answered)
    assert len(answered) == (0 if kind == "ok" else 100)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (batchkit.QueueFullError("full"), 503),
        (batchkit.BatcherClosedError("closed"), 503),
        (batchkit.RequestTimeoutError("late"), 504),
        (batchkit.ModelTimeoutError("hung"), 504),
        (batchkit.InvalidInputError("bad"), 422),
        (ClientDisconnect(), 499),
        (batchkit.BatchSizeMismatchError("bug"), None),
        (batchkit.StreamBufferFullError("slow reader"), None),
        (ValueError("the model's own"), None),
    ],
)
def test_error_response(error: Exception, status: int | None) -> None:
    assert error_status(error) == status
    response = error_response(error, retry_after_s=3)
    if status is None:
        assert response is None
        return
    assert response is not None
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"detail": str(error)}
    assert response.headers.get("retry-after") == ("3" if status == 503 else None)


@pytest.mark.anyio
async def test_error_handler_answers_or_reraises() -> None:
    connection = request(Channel())
    assert (await error_handler(connection, batchkit.QueueFullError("full"))).status_code == 503
    with pytest.raises(batchkit.BatchSizeMismatchError):
        await error_handler(connection, batchkit.BatchSizeMismatchError("bug"))


def stats(**fields: Any) -> batchkit.BatcherStats:
    base = {"requests": 0, "batches": 0, "completed": 0, "failed": 0, "rejected": 0, "timed_out": 0}
    return batchkit.BatcherStats(**{**base, "cancelled": 0, "pending": 0, "in_flight": 0, **fields})


@pytest.mark.parametrize(
    ("snapshot", "slots", "ready", "says"),
    [
        (stats(), 1, True, "ready (0 queued"),
        (stats(pending=5, oldest_queued_ms=200, in_flight=4, oldest_running_ms=30), 1, True, "ready (5 queued"),
        (stats(blocked_slots=1, oldest_running_ms=60_000), 1, False, "every slot (1 of 1) is blocked"),
        (stats(blocked_slots=1, oldest_running_ms=100), 2, True, "ready"),  # one of two slots still serves
        (stats(blocked_slots=2), 2, False, "every slot (2 of 2)"),
        (stats(in_flight=8, oldest_running_ms=6000), 1, False, "running for 6000 ms (limit 5000 ms)"),
        (stats(pending=900, oldest_queued_ms=1500), 1, False, "waited 1500 ms (limit 1000 ms; 900 queued)"),
    ],
)
def test_readiness(snapshot: batchkit.BatcherStats, slots: int, ready: bool, says: str) -> None:
    ok, reason = readiness(snapshot, slots=slots, max_run_ms=5000, max_queue_age_ms=1000)
    assert ok is ready
    assert says in reason


def test_readiness_without_limits_only_sees_blocked_slots() -> None:
    assert readiness(stats(oldest_running_ms=1e9, oldest_queued_ms=1e9))[0]
    assert not readiness(stats(blocked_slots=1))[0]
    with pytest.raises(ValueError, match="slots"):
        readiness(stats(), slots=0)


@pytest.mark.anyio
async def test_readiness_follows_a_hung_call_and_its_return() -> None:
    model = RecordingModel(gated=True)
    async with batchkit.Batcher(model, collate=None, max_batch_size=1, max_wait_ms=0, run_timeout_ms=50) as batcher:
        with anyio.fail_after(10):
            assert readiness(batcher.stats())[0]
            with pytest.raises(batchkit.ModelTimeoutError):
                await predict_or_disconnect(request(Channel()), batcher, "hangs")
            ok, reason = readiness(batcher.stats())
            assert not ok
            assert "blocked" in reason
            model.gate.set()
            await wait_until(lambda: readiness(batcher.stats())[0])
            assert await predict_or_disconnect(request(Channel()), batcher, "next") == "next"


def test_the_module_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "batchkit.asgi", raising=False)
    for name in [m for m in sys.modules if m == "starlette" or m.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "starlette", None)
    with pytest.raises(ImportError, match=rf"'asgi' extra: pip install \"{DISTRIBUTION}\[asgi\]\""):
        importlib.import_module("batchkit.asgi")


def test_import_batchkit_does_not_import_starlette() -> None:
    code = "import sys, batchkit; print('starlette' in sys.modules, 'batchkit.asgi' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["False", "False"]
