"""A FastAPI prediction service, with batchkit and without (naive), to compare.

Run: ``python examples/fastapi_app.py [--mode batchkit|naive] [--port 8000]``
(needs ``pip install fastapi uvicorn``; ``prometheus-client`` for ``/metrics``).
Ctrl-C stops it: the requests already accepted are answered first, and if that
takes more than a second it says what it is waiting for.

It is a production template: the queue is bounded and sized from throughput and
the latency budget, requests have a deadline and batches a run timeout, batchkit's
errors are HTTP answers (503 with ``Retry-After``, 504, 422) rather than 500s, a
client that disconnects has its request taken out of the queue (never computed),
``GET /ready`` fails while the batcher is hung or hopelessly backed up, and the
shutdown grace period covers the requests a full queue holds.

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
endpoint for liveness (the process and its event loop answer; also a measure of
event-loop responsiveness under load), ``GET /ready`` readiness (the batcher can
serve: 200, or 503 with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any, Literal

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import batchkit
from batchkit.asgi import ClientDisconnect, error_handler, predict_or_disconnect, readiness

Mode = Literal["batchkit", "naive"]

DIM = 4096
N_CLASSES = 10
TOKEN = "Bearer demo-token"  # the one credential the demo auth service accepts

# --8<-- [start:bounds]
# The bounds, sized for this model on a 2-core machine (docs/tuning.md has the measurements).
# Throughput: the MLP computes ~1,400 samples/s in batches of 64 (46 ms a batch, one BLAS
# thread); behind uvicorn, with HTTP parsing and the handler's own work on the same cores,
# the service answers about THROUGHPUT_RPS requests per second.
THROUGHPUT_RPS = 400
# The latency budget: a request not answered within it is worth nothing to its caller.
TIMEOUT_MS = 500.0
# The queue holds no more than can be answered well within the budget: throughput x budget
# = 400 req/s x 0.5 s = 200 requests take the whole budget to drain, leaving nothing for the
# batch's own run and the HTTP path, so take half: 100. Measured at overload (320 clients):
# 100 served 528 req/s with no timeout; 200 let 805 accepted requests expire (359 req/s);
# 10,000 (the default) 354 req/s. A deeper queue does not serve more: it accepts requests
# that expire while queued (504 after a long wait, instead of a 503 at once).
MAX_QUEUE_SIZE = int(THROUGHPUT_RPS * TIMEOUT_MS / 1000) // 2
# A batch of 64 takes ~46 ms; one that runs 40x longer is hung: its callers get 504 and
# /ready fails until the call returns (the model is never called twice at once).
RUN_TIMEOUT_MS = 2000.0
# Shutdown answers every accepted request: a full queue drains in MAX_QUEUE_SIZE /
# THROUGHPUT_RPS = 0.25 s, plus one batch that may run up to RUN_TIMEOUT_MS; doubled: 4.5 s.
GRACE_S = 2 * (MAX_QUEUE_SIZE / THROUGHPUT_RPS + RUN_TIMEOUT_MS / 1000)
# --8<-- [end:bounds]


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
    model: Callable[[np.ndarray], np.ndarray] | None = None,
    max_batch_size: int = 64,
    max_wait_ms: float = 2.0,
    max_queue_size: int = MAX_QUEUE_SIZE,
    timeout_ms: float | None = TIMEOUT_MS,
    run_timeout_ms: float | None = RUN_TIMEOUT_MS,
    freeze_gc: bool = True,
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
        async with batchkit.Batcher(
            mlp,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue_size=max_queue_size,  # beyond it: 503 at once, not a wait that expires
            timeout_ms=timeout_ms,  # the latency budget: 504, and never computed if still queued
            run_timeout_ms=run_timeout_ms,  # a hung batch: 504 for its callers, /ready fails
            name="mlp",
        ) as batcher:
            app.state.batcher = batcher
            if freeze_gc:
                # Everything built so far (the app, the model, imports) lives as long as the process:
                # moved out of the collector's sight, full collections no longer walk it.
                gc.collect()
                gc.freeze()
            yield
            await report_drain(batcher)  # on shutdown: says what the drain waits for, if it takes long
        # --8<-- [end:lifespan]

    app = FastAPI(title=f"batchkit demo ({mode})", lifespan=lifespan)
    # --8<-- [start:errors]
    # batchkit's errors are answers, not bugs: 503 + Retry-After (queue full, shutting down),
    # 504 (deadline passed, model hung), 422 (an input the batcher cannot batch), 499 (client left).
    app.add_exception_handler(batchkit.BatchkitError, error_handler)
    app.add_exception_handler(ClientDisconnect, error_handler)
    # --8<-- [end:errors]

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
            # Cancelled if the client disconnects: the request leaves the queue, never computed.
            logits = await predict_or_disconnect(request, request.app.state.batcher, x)
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

    # --8<-- [start:probes]
    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process and its event loop answer (restart it if not)."""
        return {"status": "ok", "mode": mode}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the batcher can serve (send traffic elsewhere while it cannot)."""
        if mode == "naive":
            return JSONResponse({"ready": True, "reason": "no batcher"})
        ok, reason = readiness(
            request.app.state.batcher.stats(),
            max_run_ms=run_timeout_ms,  # a batch running past it is hung, even before it is abandoned
            max_queue_age_ms=timeout_ms,  # a queue whose head is past the budget only times out
        )
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)
        # --8<-- [end:probes]

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


def serve(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, loop: str = "auto", grace_s: float = GRACE_S
) -> None:
    """Run ``app`` under uvicorn; print the address once listening (port 0: a free one).

    ``loop``: uvicorn's event loop, ``"auto"`` (uvloop when installed), ``"asyncio"`` or
    ``"uvloop"``. ``grace_s``: how long shutdown waits for open requests.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn accepts them
    # --8<-- [start:serve]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        loop=loop,  # "auto": uvloop when installed (a shorter /health p99 under load)
        timeout_graceful_shutdown=grace_s,  # covers a full queue's drain (GRACE_S)
    )
    # --8<-- [end:serve]
    server = _Server(config)
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
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--max-queue-size", type=int, default=MAX_QUEUE_SIZE)
    parser.add_argument("--timeout-ms", type=float, default=TIMEOUT_MS)
    parser.add_argument("--run-timeout-ms", type=float, default=RUN_TIMEOUT_MS)
    parser.add_argument("--no-gc-freeze", action="store_true", help="skip gc.freeze() after start-up")
    args = parser.parse_args()
    app = create_app(
        args.mode,
        max_queue_size=args.max_queue_size,
        timeout_ms=args.timeout_ms,
        run_timeout_ms=args.run_timeout_ms,
        freeze_gc=not args.no_gc_freeze,
    )
    serve(app, args.host, args.port, loop=args.loop)


if __name__ == "__main__":
    main()
