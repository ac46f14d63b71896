"""A streaming text generator behind FastAPI, with step-level batching (``batchkit.StepBatcher``).

Run: ``python examples/streaming_app.py [--port 8000]`` (needs ``pip install
fastapi uvicorn`` and torch). Then, from another terminal::

    curl -N localhost:8000/generate -H 'content-type: application/json' -d '{"prompt": "once upon a time"}'

The model is a character-level GRU built in code with fixed random weights (no
download, so its text is gibberish; the serving is what is real). ``start`` runs
each prompt through the GRU (a "prefill") to get its hidden state; ``step``
picks the next character of every running row (greedy, or sampled with the
request's own seed) and feeds it back; a row is finished at ``END_CHAR`` or
after its request's ``max_new_tokens``. ``join`` and ``select`` concatenate and
index the hidden states, so requests join and leave the running batch between
any two steps.

Routes:

* ``POST /generate``: server-sent events (``text/event-stream``): one ``data:``
  line per character (``{"token": "a"}``), then ``event: end`` (``{"tokens": n,
  "finish_reason": "stop" | "length"}``). An error before the first character is
  an HTTP status (below); after it, an ``event: error`` (``{"status": ...,
  "detail": ...}``) ends the stream. A client that disconnects has its row
  dropped at the next step.
* ``POST /generate?stream=false``: the whole text as JSON, once generated.
* ``GET /health``, ``GET /stats`` (``StepBatcher.stats()`` as JSON).

batchkit's errors map to statuses: a full queue or a closed batcher 503, a
request past its ``timeout_ms`` 504, a prompt with characters outside the
vocabulary 422 (as pydantic's own validation errors are).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

import batchkit

VOCAB = " abcdefghijklmnopqrstuvwxyz,.!?'"  # what the model reads and writes
END_CHAR = "."  # a row that produces it is finished
MAX_NEW_TOKENS = 1024


# -- the model: a character-level GRU, driven step by step ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request to the model: the prompt's character ids and how to generate."""

    ids: tuple[int, ...]
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # the request's own sampling seed: the same text whoever it is batched with


def encode(text: str) -> tuple[int, ...]:
    """Character ids of ``text``; ``InvalidInputError`` for a character outside ``VOCAB``."""
    unknown = sorted(set(text) - set(VOCAB))
    if unknown:
        raise batchkit.InvalidInputError(f"characters outside the vocabulary: {''.join(unknown)!r} (use {VOCAB!r})")
    return tuple(VOCAB.index(c) for c in text)


# --8<-- [start:state]
@dataclasses.dataclass
class Rows:
    """The state of the running rows: row i of every field belongs to the same request."""

    hidden: torch.Tensor  # (1, rows, width): the GRU's state after everything each row has read
    left: list[int]  # characters each row may still produce
    temperature: list[float]
    rng: list[random.Random]  # one per row, seeded by its request
    # --8<-- [end:state]


class CharGRU:
    """A character-level GRU with fixed random weights, as a ``batchkit.StepModel``.

    All four methods run on the ``StepBatcher``'s step thread, one at a time.
    The weights are float64 so that a row's text does not depend on the rows
    it happens to be batched with, down to the last bit that could flip a choice.
    """

    def __init__(self, seed: int = 0, width: int = 128, embed: int = 32) -> None:
        generator = torch.Generator().manual_seed(seed)
        bos = len(VOCAB)  # a begin-of-text id that only the prefill reads, so that "" is a prompt too
        self.bos = bos
        self.embed = torch.randn(bos + 1, embed, generator=generator, dtype=torch.float64)
        self.gru = torch.nn.GRU(embed, width, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            for parameter in self.gru.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) / width**0.5)
        self.gru.requires_grad_(False)
        self.head = torch.randn(width, len(VOCAB), generator=generator, dtype=torch.float64) * (3 / width**0.5)

    # --8<-- [start:model]
    @torch.inference_mode()
    def start(self, inputs: list[Prompt]) -> Rows:
        """The prefill: run every prompt through the GRU, all at once (packed to their lengths)."""
        ids = [(self.bos, *p.ids) for p in inputs]
        lengths = torch.tensor([len(i) for i in ids])
        padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            padded[row, : len(row_ids)] = torch.tensor(row_ids)
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            self.embed[padded], lengths, batch_first=True, enforce_sorted=False
        )
        _, hidden = self.gru(packed)  # (1, rows, width), in the order of ``inputs``
        return Rows(
            hidden,
            [p.max_new_tokens for p in inputs],
            [p.temperature for p in inputs],
            [random.Random(p.seed) for p in inputs],
        )

    @torch.inference_mode()
    def step(self, state: Rows) -> tuple[list[str], list[bool]]:
        """One character for every row; a row is finished at END_CHAR or at its max_new_tokens."""
        logits = state.hidden[0] @ self.head  # (rows, vocab)
        chosen = logits.argmax(dim=1).tolist()
        for row, temperature in enumerate(state.temperature):
            if temperature > 0:  # sampled with the row's own generator
                cumulative = torch.softmax(logits[row] / temperature, dim=0).cumsum(0)
                u = torch.tensor([state.rng[row].random()], dtype=torch.float64)
                chosen[row] = min(int(torch.searchsorted(cumulative, u)), len(VOCAB) - 1)
        _, state.hidden = self.gru(self.embed[chosen].unsqueeze(1), state.hidden)  # read what was written
        items = [VOCAB[c] for c in chosen]
        state.left = [left - 1 for left in state.left]
        finished = [item == END_CHAR or left == 0 for item, left in zip(items, state.left, strict=True)]
        return items, finished

    def join(self, a: Rows, b: Rows) -> Rows:
        """The rows of ``a``, then those of ``b``: newcomers join the running batch."""
        return Rows(
            torch.cat([a.hidden, b.hidden], dim=1),
            a.left + b.left,
            a.temperature + b.temperature,
            a.rng + b.rng,
        )

    def select(self, state: Rows, rows: list[int]) -> Rows:
        """Only these rows, in this order: finished, cancelled and expired rows leave."""
        return Rows(
            state.hidden[:, rows],
            [state.left[i] for i in rows],
            [state.temperature[i] for i in rows],
            [state.rng[i] for i in rows],
        )
        # --8<-- [end:model]


def generate(model: batchkit.StepModel[Any], prompt: Prompt) -> list[str]:
    """What ``prompt`` gives generated alone, without batchkit (the reference the tests compare with)."""
    state = model.start([prompt])
    items: list[str] = []
    while True:
        (item,), (finished,) = model.step(state)
        items.append(item)
        if finished:
            return items


# -- the service ----------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    prompt: str = Field(max_length=4096)
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    seed: int = 0
    timeout_ms: float | None = Field(default=None, gt=0)
    """A deadline for the whole generation (504 if it passes first)."""


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    finish_reason: str


# --8<-- [start:errors]
STATUS = {
    batchkit.QueueFullError: 503,  # shed load: the client may retry later
    batchkit.BatcherClosedError: 503,  # shutting down
    batchkit.StreamBufferFullError: 503,  # this reader fell stream_buffer items behind
    batchkit.RequestTimeoutError: 504,
    batchkit.InvalidInputError: 422,
}


def status_of(error: Exception) -> int:
    """The HTTP status for an error from the batcher (500: the model's own)."""
    return next((status for kind, status in STATUS.items() if isinstance(error, kind)), 500)
    # --8<-- [end:errors]


def finish_reason(items: Sequence[str]) -> str:
    return "stop" if items and items[-1] == END_CHAR else "length"


def event(data: Any, name: str | None = None) -> str:
    """One server-sent event: JSON data, so that any character fits on its ``data:`` line."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n"


# --8<-- [start:closing]
class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that closes its iterator however the response ends.

    When the client disconnects, Starlette cancels the response; closing the
    iterator explicitly (rather than whenever it is garbage-collected) closes
    the batcher's stream inside it at once, and its row is dropped at the next step.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator):  # type: ignore[type-var]
            await super().__call__(scope, receive, send)
            # --8<-- [end:closing]


def create_app(
    model: batchkit.StepModel[Any] | None = None,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 2.0,
    max_queue_size: int = batchkit.DEFAULT_MAX_QUEUE_SIZE,
    stream_buffer: int = MAX_NEW_TOKENS,
) -> FastAPI:
    """The service; ``model`` defaults to ``CharGRU()``."""
    step_model = model if model is not None else CharGRU()

    # --8<-- [start:lifespan]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Starts with the app; on shutdown, every admitted row runs to its end first.
        async with batchkit.StepBatcher(
            step_model,
            max_batch_size=max_batch_size,  # rows generated together
            max_wait_ms=max_wait_ms,  # when idle, how long the first request waits for batch-mates
            max_queue_size=max_queue_size,
            stream_buffer=stream_buffer,
            name="char-gru",
        ) as batcher:
            app.state.batcher = batcher
            yield
            # --8<-- [end:lifespan]

    app = FastAPI(title="batchkit streaming demo", lifespan=lifespan)

    # --8<-- [start:generate]
    @app.post("/generate", response_model=None)
    async def generate_route(
        body: GenerateRequest, request: Request, stream: bool = True
    ) -> GenerateResponse | EventStream:
        batcher: batchkit.StepBatcher[Prompt, str] = request.app.state.batcher
        try:
            # Checked here, before it is queued: a failing start() would fail every row started with it.
            prompt = Prompt(encode(body.prompt), body.max_new_tokens, body.temperature, body.seed)
            if not stream:
                items = await batcher.predict(prompt, timeout_ms=body.timeout_ms)
                return GenerateResponse(text="".join(items), tokens=len(items), finish_reason=finish_reason(items))
            tokens = batcher.stream(prompt, timeout_ms=body.timeout_ms)
            first = await anext(tokens)  # errors before the first token are still an HTTP status
        except batchkit.BatchkitError as error:
            raise HTTPException(status_code=status_of(error), detail=str(error)) from None

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(tokens):  # closed (client gone): the row is dropped
                items = [first]
                yield event({"token": first})
                try:
                    async for token in tokens:
                        items.append(token)
                        yield event({"token": token})
                except batchkit.BatchkitError as error:  # the response has started: an error event ends it
                    yield event({"status": status_of(error), "detail": str(error)}, "error")
                    return
                yield event({"tokens": len(items), "finish_reason": finish_reason(items)}, "end")

        return EventStream(events(), headers={"Cache-Control": "no-cache"})
        # --8<-- [end:generate]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        snapshot = request.app.state.batcher.stats()
        return {**dataclasses.asdict(snapshot), "mean_batch_size": snapshot.mean_batch_size}

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` under uvicorn; print the address once listening (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    print(f"listening on http://{host}:{sock.getsockname()[1]}", flush=True)  # tests read the URL off this line
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C once it has shut down cleanly
        server.run(sockets=[sock])
    print("stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is best for a model this small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = create_app(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    serve(app, args.host, args.port)


if __name__ == "__main__":
    main()
