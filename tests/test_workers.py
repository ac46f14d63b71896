"""Many processes: the FastAPI example under uvicorn with 2 workers, each with its own batcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import fastapi_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the HTTP client side; the servers are separate processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_pids(master: int) -> set[int]:
    """Worker processes uvicorn spawned (multiprocessing's resource tracker is not one)."""
    workers = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if parent == master and b"spawn_main" in command:
                workers.add(int(entry.name))
    return workers


@pytest.fixture(scope="module")
def two_workers() -> Iterator[tuple[str, int]]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "fastapi_app:create_app", "--factory", "--workers", "2"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=EXAMPLES, env=env)
    try:
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_two_uvicorn_workers_each_batch_and_answer_correctly(two_workers: tuple[str, int]) -> None:
    url, master = two_workers
    headers = {"authorization": fastapi_app.TOKEN}
    model = fastapi_app.MLP()
    item_ids = list(range(120))
    answers: dict[int, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        with anyio.fail_after(60):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.2)

        async def call(item: int) -> None:
            response = await client.post("/predict", json={"item_id": item})
            assert response.status_code == 200, response.text
            answers[item] = response.json()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for item in item_ids:
                    tg.start_soon(call, item)

        stats = [(await client.get("/stats")).json() for _ in range(8)]

    assert len(worker_pids(master)) == 2
    logits = model(np.stack([fastapi_app.make_input(i) for i in item_ids]))
    for item in item_ids:
        label, score = fastapi_app.postprocess(logits[item])
        assert answers[item]["label"] == label
        assert answers[item]["score"] == pytest.approx(score, rel=1e-3)
    assert sum(max(s["requests"] - s["batches"], 0) for s in stats) > 0  # batching happened in a worker
