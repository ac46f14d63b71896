"""Ray Serve: replicas that each run a batchkit Batcher, behind Serve's HTTP proxy on loopback."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import batchkit

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
sys.path.insert(0, EXAMPLES)
import ray_serve_app  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    port = free_port()
    # Replica processes import the example module too (the batcher factory is pickled by reference).
    runtime_env = {"env_vars": {"PYTHONPATH": EXAMPLES}}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve_app.build_app(num_replicas=2), route_prefix="/classify")
        yield f"http://127.0.0.1:{port}/classify"
    finally:
        serve.shutdown()
        ray.shutdown()


def expected_scores(x: np.ndarray) -> list[float]:
    with torch.no_grad():
        return ray_serve_app.build_model()(torch.from_numpy(x)[None])[0].tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_concurrent_http_requests_are_answered_by_batching_replicas(serve_url: str) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((200, 8)).astype(np.float32)
    answers: dict[int, Any] = {}

    async with httpx.AsyncClient(timeout=60) as client:

        async def call(i: int) -> None:
            response = await client.post(serve_url, json={"x": inputs[i].tolist()})
            assert response.status_code == 200, response.text
            answers[i] = response.json()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(len(inputs)):
                    tg.start_soon(call, i)

        for i, x in enumerate(inputs):
            assert answers[i]["scores"] == pytest.approx(expected_scores(x), abs=1e-4)
            assert answers[i]["label"] == int(np.argmax(answers[i]["scores"]))

        bad = await client.post(serve_url, json={"x": ["not", "numbers"]})
        assert bad.status_code >= 400

        batched = 0
        for _ in range(10):  # each GET reaches one replica; look at a few
            stats = (await client.get(f"{serve_url}/stats")).json()
            assert (
                stats["requests"]
                == stats["completed"]
                + stats["failed"]
                + stats["rejected"]
                + stats["timed_out"]
                + stats["cancelled"]
                + stats["pending"]
                + stats["in_flight"]
            )
            batched = max(batched, stats["requests"] - stats["batches"])
        assert batched > 0  # some replica answered more requests than it ran batches


def test_only_invalid_input_maps_to_http_400() -> None:
    """A collator's refusal is the client's fault (400); a TypeError raised by the model is a bug (500)."""
    from batchkit.ray import _error_response

    refused = _error_response(batchkit.InvalidInputError("cannot batch str"))
    assert refused is not None
    assert refused.status_code == 400
    assert _error_response(TypeError("the model's own bug")) is None  # Serve answers 500
    timed_out = _error_response(batchkit.ModelTimeoutError("hung"))
    assert timed_out is not None
    assert timed_out.status_code == 504
