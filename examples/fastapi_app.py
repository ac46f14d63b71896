"""A FastAPI prediction service, with batchkit and without (naive), to compare.

Run: ``python examples/fastapi_app.py [--mode batchkit|naive] [--port 8000]``
(needs ``pip install fastapi uvicorn``; ``prometheus-client`` for ``/metrics``).
Ctrl-C stops it: the requests already accepted are answered first, and if that
takes more than a second it says what it is waiting for.

``POST /predict`` does what a real handler does around a model call:

1. I/O before: an async auth check, then fetching the input from a remote store
   (simulated in-process: each awaits a few milliseconds, as a network call would);
2. the prediction: ``await batcher.predict(x)`` in batchkit mode; in naive mode
   the handler calls the model inline, blocking the event loop while it runs;
3. business logic after: softmax, top-1 label, a response model.

The response reports how long the auth and fetch steps took as the handler saw
them: in naive mode they stretch, because every inline model call in flight
holds up every other request's I/O. ``GET /stats`` is ``Batcher.stats()`` as JSON,
``GET /metrics`` the same in Prometheus' text format, ``GET /health`` a trivial
endpoint for liveness (and for measuring event-loop responsiveness under load).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any, Literal

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request, Response
from pydantic import BaseModel

import batchkit

Mode = Literal["batchkit", "naive"]

DIM = 4096
N_CLASSES = 10
TOKEN = "Bearer demo-token"  # the one credential the demo auth service accepts


class MLP:
    """A small numpy MLP built in code: (batch, 4096) -> (batch, 10) logits.

    Alone, a sample takes ~10 ms on one CPU core: all 128 MB of weights are read
    from memory for each call, whatever the batch size. In a batch of 32, each
    sample costs a few times less, which is what batching buys on CPU and GPU alike.
    """

    def __init__(self, seed: int = 0, layers: int = 2) -> None:
        rng = np.random.default_rng(seed)
        scale = np.float32(1 / np.sqrt(DIM))
        self.hidden = [rng.standard_normal((DIM, DIM), dtype=np.float32) * scale for _ in range(layers)]
        self.head = rng.standard_normal((DIM, N_CLASSES), dtype=np.float32) * scale

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        for w in self.hidden:
            batch = np.maximum(batch @ w, 0.0)
        logits: np.ndarray = batch @ self.head
        return logits


def make_input(item_id: int) -> np.ndarray:
    """The feature vector the input store holds for ``item_id`` (deterministic)."""
    return np.random.default_rng(item_id).standard_normal(DIM).astype(np.float32)


def postprocess(logits: np.ndarray) -> tuple[int, float]:
    """Business logic after the model: the top-1 label and its softmax probability."""
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    label = int(probs.argmax())
    return label, float(probs[label])


async def authenticate(authorization: str | None) -> str:
    """The auth service: an async call that takes a couple of milliseconds."""
    await anyio.sleep(0.002)
    if authorization != TOKEN:
        raise HTTPException(status_code=401, detail="bad or missing token")
    return "demo-user"


class InputStore:
    """The remote feature store, simulated in-process: every read awaits ~2 ms."""

    async def get(self, item_id: int) -> np.ndarray:
        await anyio.sleep(0.002)
        return make_input(item_id)


class PredictRequest(BaseModel):
    item_id: int


class PredictResponse(BaseModel):
    item_id: int
    user: str
    label: int
    score: float
    auth_ms: float
    """How long the auth step took, as the handler saw it."""
    fetch_ms: float
    """How long fetching the input took, as the handler saw it."""


async def report_drain(batcher: batchkit.Batcher[Any, Any], after_s: float = 1.0) -> None:
    """Wait up to ``after_s`` for the requests still in the batcher; if some remain, say so."""
    for _ in range(20):
        stats = batcher.stats()
        if not stats.pending + stats.in_flight:
            return
        await anyio.sleep(after_s / 20)
    print(
        f"shutting down: waiting for {stats.pending} queued and {stats.in_flight} running requests to be answered "
        "(a model that never returns is waited for forever unless the batcher has run_timeout_ms)",
        flush=True,
    )


def create_app(
    mode: Mode = "batchkit",
    *,
    model: MLP | None = None,
    max_batch_size: int = 64,
    max_wait_ms: float = 2.0,
) -> FastAPI:
    """The service. ``mode="naive"`` calls the model inline in the handler, for comparison."""
    if mode not in ("batchkit", "naive"):
        raise ValueError(f"mode must be 'batchkit' or 'naive', got {mode!r}")
    mlp = model if model is not None else MLP()
    store = InputStore()

    # --8<-- [start:lifespan]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if mode == "naive":
            yield
            return
        # Starts with the app; on shutdown, answers every accepted request before exiting.
        async with batchkit.Batcher(mlp, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, name="mlp") as batcher:
            app.state.batcher = batcher
            yield
            await report_drain(batcher)  # on shutdown: says what the drain waits for, if it takes long
        # --8<-- [end:lifespan]

    app = FastAPI(title=f"batchkit demo ({mode})", lifespan=lifespan)

    # --8<-- [start:predict]
    @app.post("/predict")
    async def predict(
        body: PredictRequest, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> PredictResponse:
        start = time.perf_counter()
        user = await authenticate(authorization)
        authed = time.perf_counter()
        x = await store.get(body.item_id)
        fetched = time.perf_counter()
        if mode == "batchkit":
            logits = await request.app.state.batcher.predict(x)
        else:
            logits = mlp(x[None])[0]  # blocks the event loop for the whole model call
        label, score = postprocess(logits)
        return PredictResponse(
            item_id=body.item_id,
            user=user,
            label=label,
            score=score,
            auth_ms=(authed - start) * 1000,
            fetch_ms=(fetched - authed) * 1000,
        )
        # --8<-- [end:predict]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "mode": mode}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        if mode == "naive":
            raise HTTPException(status_code=404, detail="the naive service has no batcher")
        snapshot = request.app.state.batcher.stats()
        return {**dataclasses.asdict(snapshot), "mean_batch_size": snapshot.mean_batch_size}

    # --8<-- [start:metrics]
    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

            from batchkit.prometheus import BatcherCollector
        except ImportError:
            raise HTTPException(status_code=501, detail="pip install prometheus-client") from None
        if mode == "naive":
            raise HTTPException(status_code=404, detail="the naive service has no batcher")
        registry = CollectorRegistry()
        registry.register(BatcherCollector([request.app.state.batcher]))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        # --8<-- [end:metrics]

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` under uvicorn; print the address once listening (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn accepts them
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False))
    print(f"listening on http://{host}:{sock.getsockname()[1]}", flush=True)  # tests read the URL off this line
    print("Ctrl-C to stop", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C once it has shut down cleanly
        server.run(sockets=[sock])
    print("stopped", flush=True)


class _Server(uvicorn.Server):
    """uvicorn's server, saying what a first Ctrl-C (or SIGTERM) starts."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
            print(f"{name}: shutting down; open requests are answered first (Ctrl-C again: stop waiting for them)")
        super().handle_exit(sig, frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=["batchkit", "naive"], default="batchkit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    serve(create_app(args.mode), args.host, args.port)


if __name__ == "__main__":
    main()
