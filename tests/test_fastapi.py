"""examples/fastapi_app.py under uvicorn on loopback: batchkit and naive, side by side.

Both services run as subprocesses (each its own process and GIL, as in
production, one BLAS thread each), on 127.0.0.1 with a port the OS picks. The
same bounded load of concurrent httpx requests is sent to each in turn. Every
comparison is between the two services measured the same way; no absolute time
is asserted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import batchkit  # noqa: E402

from ._examples import EXAMPLES, load_example  # noqa: E402

pytestmark = pytest.mark.anyio

N_REQUESTS = 192
CONCURRENCY = 32
HEADERS = {"Authorization": "Bearer demo-token"}


@dataclass
class Server:
    mode: str
    url: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None


@dataclass
class Load:
    seconds: float
    responses: list[dict[str, Any]]

    @property
    def rps(self) -> float:
        return len(self.responses) / self.seconds

    def median(self, key: str) -> float:
        return float(statistics.median(float(r[key]) for r in self.responses))


def _start(mode: str) -> Server:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "fastapi_app.py"), "--mode", mode, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(60, process.kill)  # never wait forever for the first line
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    if not line.startswith("listening on "):
        process.kill()
        rest = process.communicate(timeout=30)[0]
        process.stdout.close()
        pytest.fail(f"{mode} server did not start: {line}{rest}")
    server = Server(mode, line.split()[-1], process)
    # Keep its output from now on (a chatty server never blocks on a full pipe; failures show it).
    server.reader = threading.Thread(target=server.log.extend, args=(process.stdout,), daemon=True)
    server.reader.start()
    return server


def _stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()  # uvicorn shuts down gracefully: the lifespan drains the batcher
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=30)
    if server.reader is not None:
        server.reader.join(timeout=30)
    if server.process.stdout is not None:
        server.process.stdout.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for mode in ("naive", "batchkit"):
            started[mode] = _start(mode)
        yield started
    finally:
        for server in started.values():
            _stop(server)
            print(f"--- {server.mode} server output ---", *server.log, sep="\n")  # shown if a test failed
    for server in started.values():
        # uvicorn exits 0, or re-raises the SIGTERM it handled once it has shut down gracefully.
        assert server.process.returncode in (0, -signal.SIGTERM), f"{server.mode}: {server.process.returncode}"


@pytest.fixture(scope="module")
def expected() -> dict[int, np.ndarray]:
    app = load_example("fastapi_app")
    ids = list(range(N_REQUESTS))
    logits = app.MLP()(np.stack([app.make_input(i) for i in ids]))
    return dict(zip(ids, logits, strict=True))


async def _wait_until_up(client: Any) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)


async def _load(url: str, n: int = N_REQUESTS, concurrency: int = CONCURRENCY) -> Load:
    """``n`` POST /predict from ``concurrency`` workers, each with its own keep-alive connection.

    One ``AsyncClient`` per worker: a single client's pool shared by many
    connections costs more CPU per request than the service under test does.
    """
    ids = iter(range(n))
    responses: list[dict[str, Any]] = []
    load = Load(0.0, responses)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60)) for _ in range(concurrency)
        ]
        await _wait_until_up(clients[0])
        for i, client in enumerate(clients):  # warm up: connections, caches, the batcher's thread
            assert (await client.post("/predict", json={"item_id": i}, headers=HEADERS)).status_code == 200

        async def worker(client: Any) -> None:
            for item_id in ids:
                response = await client.post("/predict", json={"item_id": item_id}, headers=HEADERS)
                assert response.status_code == 200, response.text
                answer = response.json()
                answer["io_ms"] = answer["auth_ms"] + answer["fetch_ms"]  # all the I/O before the model
                responses.append(answer)

        with anyio.fail_after(120):
            start = time.perf_counter()
            async with anyio.create_task_group() as workers:
                for client in clients:
                    workers.start_soon(worker, client)
            load.seconds = time.perf_counter() - start
    return load


def _check_answers(load: Load, expected: dict[int, np.ndarray]) -> None:
    app = load_example("fastapi_app")
    assert sorted(r["item_id"] for r in load.responses) == list(range(N_REQUESTS))
    for response in load.responses:
        logits = expected[response["item_id"]]
        label, score = app.postprocess(logits)
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 1e-3:  # the top label is unambiguous in float32
            assert response["label"] == label, response
        assert response["score"] == pytest.approx(score, abs=1e-3)
        assert response["user"] == "demo-user"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_batchkit_keeps_io_moving_and_serves_more(servers: dict[str, Server], expected: Any) -> None:
    naive = await _load(servers["naive"].url)
    batched = await _load(servers["batchkit"].url)
    _check_answers(naive, expected)
    _check_answers(batched, expected)

    report = {
        name: {
            "requests/s": round(load.rps),
            "auth ms p50": round(load.median("auth_ms"), 1),
            "fetch ms p50": round(load.median("fetch_ms"), 1),
            "auth+fetch ms p50": round(load.median("io_ms"), 1),
        }
        for name, load in (("naive", naive), ("batchkit", batched))
    }
    print(report)
    # The I/O steps wait on the event loop: the naive handler's inline model calls hold them up.
    assert batched.median("io_ms") * 3 < naive.median("io_ms"), report
    # Batches are cheaper per sample than single calls, and run off the loop. (The client, httpx
    # in this process, caps what either service can show; batchkit still answers faster.)
    assert batched.rps > naive.rps * 1.2, report

    async with httpx.AsyncClient(base_url=servers["batchkit"].url, timeout=30) as client:
        stats = (await client.get("/stats")).json()
    assert stats["mean_batch_size"] > 2, stats
    assert stats["completed"] == stats["requests"] >= N_REQUESTS


async def test_auth_stats_and_metrics(servers: dict[str, Server]) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=servers["batchkit"].url, timeout=30) as client:
        await _wait_until_up(client)
        assert (await client.post("/predict", json={"item_id": 1})).status_code == 401
        assert (await client.post("/predict", json={"item_id": 1}, headers=HEADERS)).status_code == 200
        stats = (await client.get("/stats")).json()
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(metrics.text)
        for s in family.samples
        if s.labels.get("batcher") == "mlp"
    }
    assert samples[("batchkit_requests_total", None)] >= stats["requests"] >= 1
    assert samples[("batchkit_batch_size_bucket", "+Inf")] >= stats["batches"] >= 1

    async with httpx.AsyncClient(base_url=servers["naive"].url, timeout=30) as client:
        await _wait_until_up(client)
        assert (await client.get("/stats")).status_code == 404


def test_create_app_checks_mode() -> None:
    app = load_example("fastapi_app")
    with pytest.raises(ValueError, match="mode"):
        app.create_app("turbo")


def test_ctrl_c_stops_the_service_without_a_traceback() -> None:
    server = _start("batchkit")
    try:
        for _ in range(100):  # serving (and so handling signals) once /health answers
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"{server.url}/health never answered")
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=30)
    finally:
        _stop(server)
    output = "\n".join(server.log)
    assert server.process.returncode == 0, output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output
    assert "Ctrl-C: shutting down" in output
    assert output.rstrip().endswith("stopped"), output


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_long_drain_says_what_it_waits_for(capsys: pytest.CaptureFixture[str]) -> None:
    app = load_example("fastapi_app")
    release = threading.Event()

    def stuck(batch: np.ndarray) -> np.ndarray:
        release.wait(30)
        return batch

    async with batchkit.Batcher(stuck, max_batch_size=4, max_wait_ms=0) as batcher:
        await app.report_drain(batcher, after_s=0.01)
        assert capsys.readouterr().out == ""  # nothing in flight: nothing to say
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.predict, np.zeros(2))
            while batcher.stats().in_flight == 0:
                await anyio.sleep(0.01)
            await app.report_drain(batcher, after_s=0.05)
            release.set()
    assert "shutting down: waiting for 0 queued and 1 running requests" in capsys.readouterr().out
