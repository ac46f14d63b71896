"""Every program in examples/ that the docs show runs, and does what it says."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import batchkit

from ._examples import EXAMPLES


def run_example(*args: str) -> str:
    """Run ``python examples/<args>``; fail with its output unless it exits 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_decorator_example(backend: str) -> None:
    out = run_example("decorator.py", backend)
    counts = [tuple(map(int, m)) for m in re.findall(r"(\d+) requests in (\d+) batches", out)]
    assert len(counts) == 3, out  # the function, and the method on two instances
    for requests, batches in counts:
        assert requests == 100
        assert batches < requests, out


def test_trio_example() -> None:
    pytest.importorskip("trio")
    out = run_example("trio_app.py")
    match = re.search(r"(\d+) requests from (\d+) connections in (\d+) batches", out)
    assert match, out
    requests, connections, batches = map(int, match.groups())
    assert (requests, connections) == (200, 40)
    assert batches < requests  # connections share batches


@pytest.mark.skipif(not hasattr(batchkit, "SyncBatcher"), reason="batchkit.SyncBatcher is not exported yet")
def test_sync_callers_example() -> None:
    out = run_example("sync_callers.py")
    match = re.search(r"(\d+) predictions from (\d+) threads in (\d+) model calls", out)
    assert match, out
    predictions, threads, calls = map(int, match.groups())
    assert (predictions, threads) == (320, 32)
    assert calls < predictions


def test_quickstart_example() -> None:
    out = run_example("quickstart.py")
    assert re.search(r"^batchkit: \d+ batches, mean size", out, re.MULTILINE), out


def test_readme_example() -> None:
    out = run_example("readme.py")
    match = re.search(r"^handler: (\d+) requests in (\d+) batches", out, re.MULTILINE)
    assert match, out
    requests, batches = map(int, match.groups())
    assert requests == 100
    assert batches < requests
    assert "BatcherStats(requests=2, batches=2, completed=2" in out  # the context-manager batcher's stats


def test_torch_module_example() -> None:
    pytest.importorskip("torch")
    out = run_example("torch_module.py")
    match = re.search(r"^(\d+) images in (\d+) batches", out, re.MULTILINE)
    assert match, out
    images, batches = map(int, match.groups())
    assert images == 65  # one alone, then 64 concurrent callers
    assert batches < images


def test_metrics_example() -> None:
    pytest.importorskip("prometheus_client")
    out = run_example("metrics.py")
    assert "100 requests, 100 completed, 0 failed" in out, out
    assert 'batchkit_completed_total{batcher="doubler"} 100.0' in out, out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_generator_stream_example(backend: str) -> None:
    out = run_example("generator_stream.py", backend)
    assert "countdown 1: [1]\ncountdown 3: [3, 2, 1]\ncountdown 5: [5, 4, 3, 2, 1]\n" in out, out
    assert "5 streams, 0 failed" in out, out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_several_models_example(backend: str) -> None:
    out = run_example("several_models.py", backend)
    served = {name: (int(n), int(b)) for name, n, b in re.findall(r"(\w+): (\d+) requests in (\d+) batches", out)}
    assert set(served) == {"embedder", "reranker", "classifier"}, out
    for requests, batches in served.values():
        assert requests == 300
        assert batches < requests, out
    rows = re.search(r"embedder rows computed: (\d+) for (\d+) distinct inputs", out)
    assert rows, out
    assert rows.group(1) == rows.group(2), out  # dedup_key and the cache: each distinct input computed once
    assert "most batches running at once: 1\n" in out, out  # one SharedExecutor turn
    assert "classifier batches mixing customers: 0\n" in out, out
    shares = re.search(r"device time: (.*)", out)
    assert shares, out
    assert {part.split()[0] for part in shares.group(1).split(", ")} == set(served)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_small_batches_example(backend: str) -> None:
    out = run_example("small_batches.py", backend)
    found = re.findall(
        r"^(.+?): (\d+) requests in (\d+) batches, mean size ([\d.]+)\n  flushes: (.*)\n  limited by (\w+): ", out, re.M
    )
    cases = {title: (float(mean), flushes, limit) for title, _, _, mean, flushes, limit in found}
    assert list(cases) == [
        "one caller at a time",
        "64 concurrent callers",
        "200 requests/s, max_wait_ms=0",
        "200 requests/s, max_wait_ms=20",
    ], out
    alone, concurrent, no_wait, wait = cases.values()
    assert alone == (1.0, "20 timer (1.0 each)", "arrivals"), out  # nobody to batch with
    assert (concurrent[2], concurrent[0] > 8) == ("model", True), out  # full batches, a busy model
    assert "full" in concurrent[1], out
    assert re.fullmatch(r"\d+ idle \([\d.]+ each\)", no_wait[1]), out  # sent whenever the slot was free
    assert re.fullmatch(r"\d+ timer \([\d.]+ each\)", wait[1]), out
    assert no_wait[2] == wait[2] == "arrivals", out
    assert wait[0] > no_wait[0], out  # waiting longer makes the batches larger


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_repeated_inputs_example(backend: str) -> None:
    out = run_example("repeated_inputs.py", backend)
    assert "121 requests, 3 rows computed" in out, out  # three distinct queries, each computed once
    counts = re.search(r"deduplicated (\d+), cache hits (\d+), cache misses (\d+)", out)
    assert counts, out
    deduplicated, hits, misses = map(int, counts.groups())
    assert deduplicated + hits == 121 - 3, out  # every other request was answered without the model
    assert hits >= 1, out  # "WEATHER", asked after the rest were answered
    assert hits + misses == 121, out
