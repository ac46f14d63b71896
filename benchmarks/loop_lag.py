"""Event-loop lag while a CPU-heavy torch model serves 128 concurrent clients.

Two ways to serve the same MLP (built here, ``torch.set_num_threads(1)``):

``naive``
    each client calls ``model(x[None])`` inline, on the event loop, one sample
    at a time: what an async web handler does without batchkit.
``batchkit``
    each client awaits ``batcher.predict(x)``; the model runs on the batcher's
    worker thread, in batches.

While the clients run, a probe task asks to sleep 1 ms in a loop and records by
how much each wake-up was late: that is the delay every other coroutine on the
loop (health checks, socket reads, other handlers) would see. The script prints
the probe's lag percentiles, the clients' throughput and their latency.

Run::

    python benchmarks/loop_lag.py                      # asyncio, 128 clients, 5 s per mode
    python benchmarks/loop_lag.py --backend trio --seconds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel
import torch

import batchkit

PROBE_INTERVAL = 0.001


def build_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(256, width), torch.nn.ReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers).eval()


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_mode(mode: str, model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    inputs = torch.randn(args.clients, 256)
    lags: list[float] = []
    latencies: list[float] = []
    served = 0
    stop_at = 0.0

    @torch.inference_mode()
    def batch_fn(batch: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = model(batch)
        return output

    batcher: batchkit.Batcher[torch.Tensor, torch.Tensor] = batchkit.Batcher(
        batch_fn, max_batch_size=args.clients, max_wait_ms=args.wait_ms, name="loop-lag"
    )

    async def client(i: int) -> None:
        nonlocal served
        x = inputs[i]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            if mode == "naive":
                with torch.inference_mode():
                    y = model(x[None])[0]
                await anyio.lowlevel.checkpoint()  # a handler yields when it writes its response
            else:
                y = await batcher.predict(x)
            latencies.append(time.perf_counter() - t0)
            assert y.shape == (10,)
            served += 1

    async def probe() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await anyio.sleep(PROBE_INTERVAL)
            lags.append(time.perf_counter() - t0 - PROBE_INTERVAL)

    async with batcher:
        await batcher.predict(inputs[0])  # warm-up: thread started, first batch run
        stop_at = time.perf_counter() + args.seconds
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            for i in range(args.clients):
                tg.start_soon(client, i)
        elapsed = time.perf_counter() - start
    stats = batcher.stats()
    return {
        "mode": mode,
        "lag_p50_ms": quantile(lags, 0.5) * 1000,
        "lag_p99_ms": quantile(lags, 0.99) * 1000,
        "lag_max_ms": max(lags) * 1000 if lags else float("nan"),
        "probes": len(lags),
        "req_per_s": served / elapsed,
        "latency_p50_ms": quantile(latencies, 0.5) * 1000,
        "latency_p99_ms": quantile(latencies, 0.99) * 1000,
        "mean_batch": stats.mean_batch_size if mode == "batchkit" else 1.0,
        "lag_mean_ms": statistics.fmean(lags) * 1000 if lags else float("nan"),
    }


async def main_async(args: argparse.Namespace) -> None:
    model = build_model(args.width, args.depth)
    with torch.inference_mode():
        x = torch.randn(1, 256)
        t0 = time.perf_counter()
        for _ in range(50):
            model(x)
        one = (time.perf_counter() - t0) / 50
    print(
        f"loop_lag: backend={args.backend}, clients={args.clients}, {args.seconds:g} s per mode, "
        f"MLP 256-{args.width}x{args.depth}-10, torch {torch.__version__} with {torch.get_num_threads()} thread, "
        f"one sample inline: {one * 1000:.2f} ms, probe sleeps {PROBE_INTERVAL * 1000:g} ms"
    )
    rows = [await run_mode(mode, model, args) for mode in args.modes]
    print()
    print(
        "| mode | loop lag p50 (ms) | loop lag p99 (ms) | loop lag max (ms) | probes | req/s | latency p50 (ms) |"
        " latency p99 (ms) | mean batch |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['lag_p50_ms']:.2f} | {r['lag_p99_ms']:.2f} | {r['lag_max_ms']:.2f} | {r['probes']} "
            f"| {r['req_per_s']:,.0f} | {r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['mean_batch']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--wait-ms", type=float, default=1.0)
    parser.add_argument("--modes", nargs="+", choices=["naive", "batchkit"], default=["naive", "batchkit"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    anyio.run(main_async, args, backend=args.backend)


if __name__ == "__main__":
    main()
