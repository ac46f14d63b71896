"""examples/fastapi_app.py as a production service over loopback HTTP: disconnects, overload, a hung model, SIGTERM.

The service runs under uvicorn (in a thread of this process, so that the test
can count what the model computes; for SIGTERM, as a subprocess). The model
stands in for the MLP: it records the item ids of the rows it computes (a row
is recognised by its input) and answers zero logits, after a set delay, or
once a test lets it. Every load is bounded; every wait has a deadline; no
assertion is on an absolute time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ._examples import load_example  # noqa: E402

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"Authorization": "Bearer demo-token"}
N_IDS = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients; uvicorn runs the service on asyncio in its own thread


@pytest.fixture(scope="module")
def app_module() -> Any:
    return load_example("fastapi_app")


class Model:
    """Records which items it computes and the most calls ever running at once."""

    def __init__(self, app_module: Any, *, delay_s: float = 0.0, hang_on: int | None = None) -> None:
        self.ids = {float(app_module.make_input(i)[0]): i for i in range(N_IDS)}
        self.delay_s = delay_s
        self.hang_on = hang_on
        self.gate = threading.Event()  # closed: every call waits for it
        self.gate.set()
        self.release = threading.Event()  # for the call that hangs
        self.computed: list[int] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        ids = [self.ids[float(row[0])] for row in batch]
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.computed.extend(ids)
        try:
            self.gate.wait(30)
            if self.hang_on in ids:
                self.release.wait(30)
            time.sleep(self.delay_s)
            return np.zeros((len(batch), 10), dtype=np.float32)
        finally:
            with self.lock:
                self.running -= 1


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 (a free port), in a thread; its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, loop="asyncio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


async def until(condition: Any, what: str, within_s: float = 30) -> None:
    with anyio.fail_after(within_s):
        while not await condition():
            await anyio.sleep(0.01)


async def stat(client: Any, key: str) -> Any:
    return (await client.get("/stats")).json()[key]


def raw_request(url: str, item_id: int) -> socket.socket:
    """A connection that sent POST /predict and will not read its answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    body = f'{{"item_id": {item_id}}}'.encode()
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: {HEADERS['Authorization']}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    conn.sendall(head.encode() + body)
    return conn


async def test_clients_that_disconnect_are_never_computed(app_module: Any) -> None:
    model = Model(app_module)
    model.gate.clear()  # the first batch holds the model; the others queue behind it
    app = app_module.create_app(model=model, max_batch_size=4, timeout_ms=None, freeze_gc=False)
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, anyio.create_task_group() as tg:
            first: list[int] = []

            async def held() -> None:
                response = await client.post("/predict", json={"item_id": 0}, headers=HEADERS)
                first.append(response.status_code)

            tg.start_soon(held)
            await until(lambda: anyio.to_thread.run_sync(lambda: bool(model.computed)), "the first batch runs")
            leavers = [raw_request(url, item_id) for item_id in range(1, 41)]
            await until(lambda: _eq(stat(client, "pending"), 40), "40 queued")
            for conn in leavers:
                conn.close()  # the client gives up
            await until(lambda: _eq(stat(client, "pending"), 0), "the queue empties")
            stats = (await client.get("/stats")).json()
            model.gate.set()
            later = await client.post("/predict", json={"item_id": 100}, headers=HEADERS)
        stats_after = (await _get(url, "/stats")).json()
    assert stats["cancelled"] == 40, stats
    assert first == [200]
    assert later.status_code == 200
    assert sorted(model.computed) == [0, 100]  # not one of the 40 who left
    assert stats_after["completed"] == 2


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _get(url: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.get(path)


async def test_overload_is_shed_fast_while_accepted_requests_succeed(app_module: Any) -> None:
    # Capacity: batches of 4 every 20 ms, 200 requests/s. 48 clients without pause offer far more.
    model = Model(app_module, delay_s=0.02)
    app = app_module.create_app(
        model=model, max_batch_size=4, max_queue_size=8, timeout_ms=5000, run_timeout_ms=None, freeze_gc=False
    )
    outcomes: list[tuple[int, float, Any]] = []
    health: list[int] = []
    with serving(app) as url:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30)) for _ in range(49)]
            ids = iter(range(480))
            done = anyio.Event()

            async def worker(client: Any) -> None:
                for item_id in ids:
                    start = time.perf_counter()
                    response = await client.post("/predict", json={"item_id": item_id}, headers=HEADERS)
                    outcomes.append((response.status_code, time.perf_counter() - start, response))

            async def prober(client: Any) -> None:
                while not done.is_set():
                    health.append((await client.get("/health")).status_code)
                    await anyio.sleep(0.02)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as probes:
                    probes.start_soon(prober, clients[-1])
                    async with anyio.create_task_group() as tg:
                        for client in clients[:-1]:
                            tg.start_soon(worker, client)
                    done.set()
            stats = (await clients[0].get("/stats")).json()
    codes = [code for code, _, _ in outcomes]
    ok = [seconds for code, seconds, _ in outcomes if code == 200]
    shed = [seconds for code, seconds, _ in outcomes if code == 503]
    summary = {"200": len(ok), "503": len(shed), "other": len(codes) - len(ok) - len(shed)}
    print(summary, {"200 ms p50": statistics.median(ok) * 1000, "503 ms p50": statistics.median(shed) * 1000})
    assert len(codes) == 480
    assert set(codes) <= {200, 503}, summary  # no 500; within the budget, no 504 either
    assert ok, summary
    assert shed, summary
    assert statistics.median(shed) < statistics.median(ok)  # refused at once, not after a wait
    for code, _, response in outcomes:
        if code == 503:
            assert response.headers["retry-after"] == "1"
            assert "queue" in response.json()["detail"].lower()
        else:
            assert response.json()["label"] == 0
    assert stats["completed"] == len(ok) == len(model.computed)  # every accepted request succeeded
    assert stats["rejected"] == len(shed)
    assert stats["timed_out"] == stats["failed"] == 0
    assert health
    assert set(health) == {200}  # liveness stayed answered all through


async def test_a_hung_model_fails_readiness_and_recovers(app_module: Any) -> None:
    model = Model(app_module, hang_on=7)
    app = app_module.create_app(model=model, max_batch_size=1, timeout_ms=None, run_timeout_ms=200, freeze_gc=False)
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/ready")).status_code == 200
            hung = await client.post("/predict", json={"item_id": 7}, headers=HEADERS)
            assert hung.status_code == 504, hung.text
            assert "run_timeout_ms" in hung.json()["detail"]
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert "blocked" in ready.json()["reason"]
            assert (await client.get("/health")).status_code == 200  # alive: the loop answers
            async with anyio.create_task_group() as tg:
                queued: list[Any] = []

                async def behind() -> None:
                    queued.append(await client.post("/predict", json={"item_id": 8}, headers=HEADERS))

                tg.start_soon(behind)  # waits: the only slot is blocked until the hung call returns
                await until(lambda: _eq(stat(client, "pending"), 1), "8 queued")
                assert (await client.get("/ready")).status_code == 503
                assert not queued
                model.release.set()  # the hung call returns
            assert queued[0].status_code == 200
            await until(lambda: _ready(client), "ready again")
            assert (await client.post("/predict", json={"item_id": 9}, headers=HEADERS)).status_code == 200
            stats = (await client.get("/stats")).json()
    assert model.most == 1  # the model was never called while the hung call ran
    assert model.computed == [7, 8, 9]
    assert stats["hung_batches"] == 1
    assert stats["blocked_slots"] == 0


async def _ready(client: Any) -> bool:
    return bool((await client.get("/ready")).status_code == 200)


SLOW_SERVICE = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from tests._examples import load_example

app = load_example("fastapi_app")


def slow(batch):  # 4 requests every 50 ms: a queue of 40 takes half a second to drain
    time.sleep(0.05)
    return np.zeros((len(batch), 10), dtype=np.float32)


app.serve(app.create_app(model=slow, max_batch_size=4, max_queue_size=64, timeout_ms=30_000), port=0)
"""


def test_sigterm_answers_every_accepted_request() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_SERVICE.format(root=str(ROOT)))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert process.stdout is not None
    watchdog = threading.Timer(120, process.kill)  # whatever happens, the process ends
    watchdog.start()
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on "), line + process.stdout.read()
        url = line.split()[-1]
        answers = anyio.run(_load_then_sigterm, url, process)
        output = line + process.stdout.read()
        process.wait(30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait(30)
        process.stdout.close()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "SIGTERM: shutting down" in output
    assert "Traceback" not in output
    assert sorted(answers) == [(200, i) for i in range(40)], output  # every accepted request answered


async def _load_then_sigterm(url: str, process: subprocess.Popen[str]) -> list[tuple[int, int]]:
    answers: list[tuple[int, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:

        async def one(item_id: int) -> None:
            response = await client.post("/predict", json={"item_id": item_id}, headers=HEADERS)
            answers.append((response.status_code, response.json().get("item_id", -1)))

        with anyio.fail_after(60):
            assert (await client.get("/health")).status_code == 200
            async with anyio.create_task_group() as tg:
                for item_id in range(40):
                    tg.start_soon(one, item_id)
                async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                    await until(lambda: _at_least(stat(probe, "requests"), 40), "all 40 accepted")
                    pending = await stat(probe, "pending")
                assert pending > 0  # requests are still queued when the signal comes
                process.send_signal(signal.SIGTERM)
    return answers


async def _at_least(value: Any, expected: int) -> bool:
    return bool(await value >= expected)
