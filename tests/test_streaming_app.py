"""examples/streaming_app.py over real HTTP on loopback: server-sent events from a StepBatcher.

Two servers, both on 127.0.0.1 with a port the OS picks, probed with httpx:

* the example as a user runs it (``python examples/streaming_app.py``, a
  subprocess): concurrent streams each get exactly what their prompt gives
  generated alone, in-process, one request at a time;
* its app with a gated model (uvicorn in a thread of this process): every step
  waits until the test allows it, so "the first token arrived while the
  generation still runs", "the disconnected row was dropped" and the error
  statuses are checked by the order of events, never by a duration.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ._examples import EXAMPLES, load_example  # noqa: E402
from ._reliability import wait_until  # noqa: E402
from .test_fastapi import Server, _stop, _wait_until_up  # noqa: E402

pytestmark = pytest.mark.anyio

app = load_example("streaming_app")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client's loop; the servers run uvicorn's own


# -- helpers ------------------------------------------------------------------------------------------


def reference(prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """The text ``prompt`` gives generated alone, in this process, without batchkit."""
    request = app.Prompt(app.encode(prompt), max_new_tokens, temperature, seed)
    return "".join(app.generate(app.CharGRU(), request))


def long_seed(prompt: str, max_new_tokens: int, temperature: float = 1.0) -> int:
    """A seed with which ``prompt`` generates all ``max_new_tokens`` (no END_CHAR before)."""
    model = app.CharGRU()
    for seed in range(200):
        items = app.generate(model, app.Prompt(app.encode(prompt), max_new_tokens, temperature, seed))
        if len(items) == max_new_tokens:
            return seed
    raise AssertionError("no seed generates that long")


async def sse(response: Any) -> AsyncIterator[tuple[str, Any]]:
    """The server-sent events of ``response``: (event name, JSON data)."""
    name, data = "message", None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
        elif not line and data is not None:
            yield name, data
            name, data = "message", None


async def stream_text(client: Any, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """POST /generate as a stream: the tokens joined, and the ``end`` event's data."""
    tokens: list[str] = []
    async with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for name, data in sse(response):
            if name == "end":
                return "".join(tokens), data
            assert name == "message", (name, data)
            tokens.append(data["token"])
    raise AssertionError(f"the stream ended without an end event after {tokens}")


async def stats(client: Any) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def poll(client: Any, condition: Any) -> dict[str, Any]:
    """/stats, once ``condition(stats)`` holds."""
    with anyio.fail_after(30):
        while not condition(snapshot := await stats(client)):
            await anyio.sleep(0.01)
    return snapshot


# -- the example as a user runs it --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "streaming_app.py"), "--port", "0", "--max-batch-size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    if not line.startswith("listening on "):
        process.kill()
        pytest.fail(f"streaming server did not start: {line}{process.communicate(timeout=30)[0]}")
    started = Server("streaming", line.split()[-1], process)
    started.reader = threading.Thread(target=started.log.extend, args=(process.stdout,), daemon=True)
    started.reader.start()
    try:
        yield started
    finally:
        _stop(started)
        print("--- streaming server output ---", *started.log, sep="\n")  # shown if a test failed
    assert started.process.returncode in (0, -signal.SIGTERM), started.process.returncode
    assert "Traceback" not in "".join(started.log)


REQUESTS = [
    {"prompt": "once upon a time", "max_new_tokens": 40},
    {"prompt": "", "max_new_tokens": 7},
    {"prompt": "hello", "max_new_tokens": 120, "temperature": 1.0, "seed": 1},
    {"prompt": "the quick brown fox", "max_new_tokens": 60, "temperature": 0.7, "seed": 2},
    {"prompt": "a", "max_new_tokens": 1},
    {"prompt": "what is it?", "max_new_tokens": 200, "temperature": 1.5, "seed": 3},
    {"prompt": "zzz", "max_new_tokens": 90, "temperature": 1.0, "seed": 4},
    {"prompt": "batch me, please!", "max_new_tokens": 150, "temperature": 1.2, "seed": 5},
    {"prompt": "it's", "max_new_tokens": 30, "temperature": 1.0, "seed": 6},
    {"prompt": "it's", "max_new_tokens": 30, "temperature": 1.0, "seed": 7},
]


async def test_concurrent_streams_each_get_what_their_prompt_gives_alone(server: Server) -> None:
    expected = [reference(**body) for body in REQUESTS]
    assert len(set(expected)) > len(expected) // 2  # the prompts generate different texts
    streamed: dict[int, tuple[str, dict[str, Any]]] = {}
    whole: dict[int, dict[str, Any]] = {}

    async def one(index: int, client: Any) -> None:
        streamed[index] = await stream_text(client, REQUESTS[index])
        response = await client.post("/generate", params={"stream": "false"}, json=REQUESTS[index])
        assert response.status_code == 200, response.text
        whole[index] = response.json()

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        await _wait_until_up(client)
        before = await stats(client)
        async with anyio.create_task_group() as tg:
            for index in range(len(REQUESTS)):
                tg.start_soon(one, index, client)
        after = await stats(client)
    for index, text in enumerate(expected):
        assert streamed[index][0] == text, REQUESTS[index]
        assert whole[index]["text"] == text, REQUESTS[index]
        reason = "stop" if text.endswith(app.END_CHAR) else "length"
        assert streamed[index][1] == {"tokens": len(text), "finish_reason": reason}
        assert whole[index] == {"text": text, "tokens": len(text), "finish_reason": reason}
    assert after["completed"] - before["completed"] == 2 * len(REQUESTS)
    assert (after["in_flight"], after["pending"]) == (0, 0)


async def test_health_and_stats(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        await _wait_until_up(client)
        assert (await client.get("/health")).json() == {"status": "ok"}
        snapshot = await stats(client)
    assert {"requests", "completed", "cancelled", "in_flight", "pending", "mean_batch_size"} <= set(snapshot)


# -- its app with a gated model, in this process ------------------------------------------------------


class Gated:
    """``CharGRU`` whose steps wait until the test allows them; records the rows of each step."""

    def __init__(self) -> None:
        self.model = app.CharGRU()
        self.rows_per_step: list[int] = []
        self._allowed = 0.0
        self._changed = threading.Condition()
        self.stepping = 0  # steps waiting for leave to run, or running

    def allow(self, steps: float) -> None:
        """Let ``steps`` more steps run (``math.inf``: all of them)."""
        with self._changed:
            self._allowed += steps
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._allowed = 0

    def start(self, inputs: list[Any]) -> Any:
        return self.model.start(inputs)

    def step(self, state: Any) -> tuple[list[str], list[bool]]:
        self.stepping += 1
        try:
            return self._step(state)
        finally:
            self.stepping -= 1

    def _step(self, state: Any) -> tuple[list[str], list[bool]]:
        with self._changed:
            if not self._changed.wait_for(lambda: self._allowed > 0, timeout=30):
                raise RuntimeError("the test never allowed this step")
            self._allowed -= 1
        self.rows_per_step.append(len(state.left))
        result: tuple[list[str], list[bool]] = self.model.step(state)
        return result

    def join(self, a: Any, b: Any) -> Any:
        return self.model.join(a, b)

    def select(self, state: Any, rows: list[int]) -> Any:
        return self.model.select(state, rows)


class InThread:
    def __init__(self, url: str, model: Gated) -> None:
        self.url = url
        self.model = model


@pytest.fixture(scope="module")
def gated() -> Iterator[InThread]:
    model = Gated()
    service = app.create_app(model, max_batch_size=2, max_wait_ms=0, max_queue_size=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(service, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield InThread(f"http://127.0.0.1:{sock.getsockname()[1]}", model)
    finally:
        model.allow(math.inf)  # whatever is still running drains
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture
def client(gated: InThread) -> Iterator[InThread]:
    gated.model.close()  # every test starts with no step allowed
    yield gated
    gated.model.allow(math.inf)


async def test_the_first_token_arrives_before_the_generation_ends(client: InThread) -> None:
    model = client.model
    seed = long_seed("tell me", 20)
    body = {"prompt": "tell me", "max_new_tokens": 20, "temperature": 1.0, "seed": seed}
    async with httpx.AsyncClient(base_url=client.url, timeout=60) as http:
        await _wait_until_up(http)
        model.allow(1)
        tokens = []
        async with http.stream("POST", "/generate", json=body) as response:
            events = sse(response)
            name, data = await anext(events)
            assert name == "message"
            tokens.append(data["token"])
            snapshot = await stats(http)
            assert snapshot["in_flight"] == 1  # the row still runs: its next step is held
            model.allow(math.inf)
            async for name, data in events:
                if name == "end":
                    break
                tokens.append(data["token"])
    assert "".join(tokens) == reference(**body)
    assert len(tokens) == 20


async def test_a_client_that_disconnects_has_its_row_dropped(client: InThread) -> None:
    model = client.model
    seed = long_seed("go on", 20)
    async with httpx.AsyncClient(base_url=client.url, timeout=60) as http:
        await _wait_until_up(http)
        before = await stats(http)
        steps_before = len(model.rows_per_step)
        model.allow(1)
        body = {"prompt": "go on", "max_new_tokens": 20, "temperature": 1.0, "seed": seed}
        async with http.stream("POST", "/generate", json=body) as response:
            name, _ = await anext(sse(response))
            assert name == "message"
        # Disconnected after one token of 20; the next step is held until the row is gone.
        await poll(http, lambda s: s["cancelled"] == before["cancelled"] + 1)
        model.allow(math.inf)
        await poll(http, lambda s: s["in_flight"] == 0)
        assert len(model.rows_per_step) - steps_before <= 2  # the step that was waiting, and no more
        # The server keeps serving.
        assert await stream_text(http, {"prompt": "more", "max_new_tokens": 9}) == (
            reference("more", 9),
            {"tokens": len(reference("more", 9)), "finish_reason": "stop" if "." in reference("more", 9) else "length"},
        )


async def test_errors_map_to_http_statuses(client: InThread) -> None:
    model = client.model
    async with httpx.AsyncClient(base_url=client.url, timeout=60) as http:
        await _wait_until_up(http)
        before = await stats(http)
        # 422: a character outside the vocabulary (refused before it is queued), or a bad field.
        for params in ({}, {"stream": "false"}):
            response = await http.post("/generate", params=params, json={"prompt": "Hello"})
            assert response.status_code == 422
            assert "vocabulary" in response.json()["detail"]
        assert (await http.post("/generate", json={"prompt": "hi", "max_new_tokens": 0})).status_code == 422

        # 504: a deadline that passes while no step may run, before the first token or after it.
        for params in ({}, {"stream": "false"}):
            response = await http.post("/generate", params=params, json={"prompt": "hi", "timeout_ms": 50})
            assert response.status_code == 504, response.text
        steps = len(model.rows_per_step)
        model.allow(math.inf)  # the held step (of rows now expired) runs; then no row is left to step
        await wait_until(lambda: len(model.rows_per_step) > steps)
        await poll(http, lambda s: s["in_flight"] == 0)
        for _ in range(3):  # no step of the expired rows still to come (it would take the permit below)
            await wait_until(lambda: model.stepping == 0)
            await anyio.sleep(0.05)
        model.close()
        seed = long_seed("late", 5)
        model.allow(1)
        body = {"prompt": "late", "max_new_tokens": 5, "temperature": 1.0, "seed": seed, "timeout_ms": 3000}
        async with http.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            events = [event async for event in sse(response)]
        assert events[0] == ("message", {"token": reference("late", 5, 1.0, seed)[0]})
        assert events[-1][0] == "error"
        assert events[-1][1]["status"] == 504
        assert len(events) == 2
        await poll(http, lambda s: s["in_flight"] == 0)

        # 503: two rows running (max_batch_size=2) and one queued (max_queue_size=1): the next is refused.
        async with anyio.create_task_group() as tg:
            texts: list[str] = []

            async def generate(prompt: str) -> None:
                texts.append((await stream_text(http, {"prompt": prompt, "max_new_tokens": 3}))[0])

            for prompt, condition in [
                ("one", lambda s: s["in_flight"] == 1),
                ("two", lambda s: s["in_flight"] == 2),
                ("three", lambda s: s["pending"] == 1),
            ]:
                tg.start_soon(generate, prompt)
                await poll(http, condition)
            for params in ({}, {"stream": "false"}):
                response = await http.post("/generate", params=params, json={"prompt": "four"})
                assert response.status_code == 503, response.text
                assert "max_queue_size" in response.json()["detail"]
            model.allow(math.inf)
        assert sorted(texts) == sorted(reference(p, 3) for p in ("one", "two", "three"))
        after = await poll(http, lambda s: s["in_flight"] == 0)
    assert after["timed_out"] - before["timed_out"] == 3
    assert after["rejected"] - before["rejected"] == 2


def test_batcher_errors_map_to_statuses() -> None:
    import batchkit

    assert app.status_of(batchkit.QueueFullError()) == 503
    assert app.status_of(batchkit.BatcherClosedError()) == 503
    assert app.status_of(batchkit.RequestTimeoutError()) == 504
    assert app.status_of(batchkit.InvalidInputError()) == 422
    assert app.status_of(ValueError()) == 500
