"""One process, several processes, Ray Serve replicas: the same model and load, side by side.

Run: ``python benchmarks/scaling.py [--seconds 10] [--concurrency 64]`` (needs the
``dev`` and ``ray`` extras). Every setup serves the numpy MLP of
``examples/fastapi_app.py`` on 127.0.0.1 and gets the same closed-loop HTTP load
(``--concurrency`` clients, each sending ``POST /predict`` as soon as its last
answer came back):

* ``uvicorn x1, naive``: one process, the model called inline in the handler;
* ``uvicorn x1, batchkit``: one process, one Batcher;
* ``uvicorn x2, batchkit``: two worker processes, a Batcher in each;
* ``ray serve x2, batchkit``: two Ray Serve replicas, a Batcher in each, behind
  Serve's HTTP proxy.

Each process limits BLAS to one thread, so that processes, not threads, are what
scales. Prints a table: requests/s, p50 and p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                if (await client.post(url, json={"item_id": 0}, headers=auth())).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def auth() -> dict[str, str]:
    import fastapi_app

    return {"authorization": fastapi_app.TOKEN}


async def closed_loop(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    """``concurrency`` clients, each with its own connection (a shared httpx client is a bottleneck)."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client_loop(worker: int) -> None:
        item = worker
        async with httpx.AsyncClient(timeout=60, headers=auth()) as client:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                response = await client.post(url, json={"item_id": item})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                item += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"rps": len(ms) / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def uvicorn_setup(workers: int, mode: str) -> tuple[str, Any]:
    port = free_port()
    factory = f"scaling_apps:{mode}_app"
    command = [sys.executable, "-m", "uvicorn", factory, "--factory", "--workers", str(workers)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{Path(__file__).parent}"}
    process = subprocess.Popen(command, cwd=EXAMPLES, env=env)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return f"http://127.0.0.1:{port}/predict", stop


def ray_setup(replicas: int) -> tuple[str, Any]:
    import ray
    from ray import serve

    import batchkit
    from batchkit.ray import batched_deployment

    def make_batcher() -> batchkit.Batcher[Any, Any]:
        import fastapi_app

        return batchkit.Batcher(fastapi_app.MLP(), max_batch_size=64, max_wait_ms=2)

    def decode(payload: dict[str, Any]) -> Any:
        import fastapi_app

        return fastapi_app.make_input(int(payload["item_id"]))

    def encode(logits: Any) -> dict[str, Any]:
        import fastapi_app

        label, score = fastapi_app.postprocess(logits)
        return {"label": label, "score": score}

    port = free_port()
    env = {**ONE_THREAD, "PYTHONPATH": str(EXAMPLES)}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = batched_deployment(
        make_batcher, decode=decode, encode=encode, num_replicas=replicas, ray_actor_options={"num_cpus": 1}
    )
    serve.run(deployment.bind(), route_prefix="/predict")

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}/predict", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--only", default="", help="run only the setups whose name contains this")
    args = parser.parse_args(argv)
    setups: list[tuple[str, Any]] = [
        ("uvicorn x1, naive", lambda: uvicorn_setup(1, "naive")),
        ("uvicorn x1, batchkit", lambda: uvicorn_setup(1, "batchkit")),
        ("uvicorn x2, batchkit", lambda: uvicorn_setup(2, "batchkit")),
    ]
    if not args.skip_ray:
        setups.append(("ray serve x2, batchkit", lambda: ray_setup(2)))
    rows = []
    for name, setup in [(n, s) for n, s in setups if args.only in n]:
        url, stop = setup()
        try:
            asyncio.run(wait_until_up(url))
            asyncio.run(closed_loop(url, 1.0, args.concurrency))  # warm up
            result = asyncio.run(closed_loop(url, args.seconds, args.concurrency))
        finally:
            stop()
        rows.append((name, result))
        print(
            f"{name:24} {result['rps']:8.0f} req/s  p50 {result['p50']:7.1f} ms  p99 {result['p99']:7.1f} ms",
            flush=True,
        )
    print(f"\n| setup ({args.concurrency} clients) | requests/s | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |")


if __name__ == "__main__":
    main()
