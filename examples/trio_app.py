"""A trio TCP service on loopback that batches its clients' requests with batchkit.

Run: ``python examples/trio_app.py``. The server speaks a line protocol: a
client sends four numbers on a line, the server answers with the model's three
outputs. Each connection is handled by its own task, as trio servers are; all of
them share one ``Batcher``, so requests from different connections go into the
same batches. The program starts the server on a free port, runs a nursery of
clients against it, checks every answer, prints the batcher's stats and stops.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import trio

import batchkit

WEIGHTS = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


def model(batch: np.ndarray) -> np.ndarray:
    """(batch, 4) -> (batch, 3); runs on the batcher's worker thread, never on trio's loop."""
    return np.tanh(batch @ WEIGHTS)


async def handle(batcher: batchkit.Batcher[np.ndarray, np.ndarray], stream: trio.SocketStream) -> None:
    """One connection: read lines of four numbers, answer each with the model's output."""
    buffer = b""
    async with stream:
        while data := await stream.receive_some(4096):
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                x = np.array(line.split(), dtype=np.float32)
                y = await batcher.predict(x)
                await stream.send_all(" ".join(f"{v:.6f}" for v in y).encode() + b"\n")


async def client(port: int, seed: int, n_requests: int) -> None:
    """Send ``n_requests`` lines one after another and check each answer."""
    rng = np.random.default_rng(seed)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buffer = b""
        for _ in range(n_requests):
            x = rng.standard_normal(4).astype(np.float32)
            await stream.send_all(" ".join(f"{v:.6f}" for v in x).encode() + b"\n")
            while b"\n" not in buffer:
                buffer += await stream.receive_some(4096)
            line, buffer = buffer.split(b"\n", 1)
            expected = model(np.array([f"{v:.6f}" for v in x], dtype=np.float32)[None])[0]
            np.testing.assert_allclose(np.array(line.split(), dtype=np.float32), expected, atol=1e-5)


async def main(n_clients: int = 40, n_requests: int = 5) -> batchkit.BatcherStats:
    async with batchkit.Batcher(model, max_batch_size=32, max_wait_ms=2, name="trio-demo") as batcher:
        async with trio.open_nursery() as server_nursery:
            listeners = await server_nursery.start(
                partial(trio.serve_tcp, partial(handle, batcher), 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with trio.fail_after(60):
                async with trio.open_nursery() as clients:
                    for seed in range(n_clients):
                        clients.start_soon(client, port, seed, n_requests)
            server_nursery.cancel_scope.cancel()  # stop accepting; close the connections
        stats = batcher.stats()
    print(f"{stats.completed} requests from {n_clients} connections in {stats.batches} batches")
    print(f"mean batch size {stats.mean_batch_size:.1f}, p50 latency {stats.latency_ms.p50:.2f} ms")
    return stats


if __name__ == "__main__":
    trio.run(main)
