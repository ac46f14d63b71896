"""batchkit.prometheus: a collector that reads stats() at scrape time."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import anyio
import pytest

import batchkit

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from batchkit._sync import SyncBatcher  # noqa: E402
from batchkit.prometheus import BatcherCollector, register, unregister  # noqa: E402

pytestmark = pytest.mark.anyio


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Expose the registry as Prometheus text, parse it back: {(sample name, labels): value}."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_scrape_matches_stats(anyio_backend: str) -> None:
    def model(batch: list[int]) -> list[int]:
        if -1 in batch:
            raise ValueError("negative")
        return batch

    registry = CollectorRegistry()
    async with batchkit.Batcher(
        model, collate=None, max_batch_size=4, max_wait_ms=5, replicas=3, name="toy"
    ) as batcher:
        register(batcher, registry)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(batcher.predict, i)
            with pytest.raises(ValueError, match="negative"):
                await batcher.predict(-1)
        stats = batcher.stats()
        samples = scrape(registry)

    assert value(samples, "batchkit_requests_total", batcher="toy") == stats.requests == 11
    assert value(samples, "batchkit_completed_total", batcher="toy") == stats.completed == 10
    assert value(samples, "batchkit_failed_total", batcher="toy") == stats.failed == 1
    assert value(samples, "batchkit_batches_total", batcher="toy") == stats.batches
    for counter in ("rejected", "timed_out", "cancelled", "oom_splits", "hung_batches", "cache_hits", "deduplicated"):
        assert value(samples, f"batchkit_{counter}_total", batcher="toy") == 0
    assert value(samples, "batchkit_pending_requests", batcher="toy") == 0
    assert value(samples, "batchkit_in_flight_requests", batcher="toy") == 0
    assert value(samples, "batchkit_batch_size_limit", batcher="toy") == 4
    assert value(samples, "batchkit_concurrency_limit", batcher="toy") == stats.concurrency_limit == 3
    # The histogram: cumulative buckets, count = batches, sum = requests batched.
    assert value(samples, "batchkit_batch_size_bucket", batcher="toy", le="+Inf") == stats.batches
    assert value(samples, "batchkit_batch_size_bucket", batcher="toy", le="4.0") == stats.batches
    assert value(samples, "batchkit_batch_size_bucket", batcher="toy", le="1.0") == stats.batch_sizes.get(1, 0)
    assert value(samples, "batchkit_batch_size_count", batcher="toy") == stats.batches
    assert value(samples, "batchkit_batch_size_sum", batcher="toy") == 11
    # Quantiles, in seconds.
    for quantile, attribute in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
        got = value(samples, "batchkit_latency_seconds", batcher="toy", quantile=quantile)
        assert got == pytest.approx(getattr(stats.latency_ms, attribute) / 1000)
    assert value(samples, "batchkit_run_time_seconds", batcher="toy", quantile="1") > 0
    assert ("batchkit_queue_wait_seconds", (("batcher", "toy"), ("quantile", "0.9"))) in samples


async def test_scrape_reports_dedup_and_the_cache(anyio_backend: str) -> None:
    registry = CollectorRegistry()
    options = {"collate": None, "max_wait_ms": 5, "dedup_key": str, "cache_size": 4, "name": "shared"}
    async with batchkit.Batcher(lambda batch: batch, **options) as batcher:
        register(batcher, registry)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(batcher.predict, "x")  # one computation, four callers sharing it
            await batcher.predict("x")  # from the cache
        stats = batcher.stats()
        samples = scrape(registry)
    assert value(samples, "batchkit_deduplicated_total", batcher="shared") == stats.deduplicated == 4
    assert value(samples, "batchkit_cache_hits_total", batcher="shared") == stats.cache_hits == 1
    assert value(samples, "batchkit_cache_misses_total", batcher="shared") == stats.cache_misses == 5


def test_several_batchers_share_one_registry() -> None:
    registry = CollectorRegistry()
    a: batchkit.Batcher[int, int] = batchkit.Batcher(lambda b: b, name="a")
    b: batchkit.Batcher[int, int] = batchkit.Batcher(lambda b: b, name="b")
    collector = register(a, registry)
    assert register(b, registry) is collector
    assert register(a, registry, name="a") is collector  # registering again is harmless
    assert collector.names == ["a", "b"]
    samples = scrape(registry)
    assert value(samples, "batchkit_requests_total", batcher="a") == 0
    assert value(samples, "batchkit_requests_total", batcher="b") == 0

    with pytest.raises(ValueError, match="already reported"):
        register(batchkit.Batcher(lambda b: b, name="a"), registry)
    register(batchkit.Batcher(lambda b: b, name="a"), registry, name="a2")  # kept only while alive

    unregister(b, registry)
    unregister(b, registry)  # no error
    del b
    gc.collect()
    assert collector.names == ["a"]  # "a2" was garbage collected: no dangling series


def test_a_sync_batcher_is_labelled_by_its_name() -> None:
    registry = CollectorRegistry()
    with SyncBatcher(lambda b: b, collate=None, name="threads") as batcher:
        register(batcher, registry)
        assert batcher.predict(3) == 3
        samples = scrape(registry)
    assert value(samples, "batchkit_completed_total", batcher="threads") == 1


def test_collector_can_be_registered_directly_and_describes_itself() -> None:
    registry = CollectorRegistry()
    collector = BatcherCollector([batchkit.Batcher(lambda b: b, name="x")], namespace="myapp")
    registry.register(collector)
    names = {family.name for family in collector.describe()}
    assert {"myapp_requests", "myapp_batch_size", "myapp_latency_seconds"} <= names
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(BatcherCollector(namespace="myapp"))  # same names: the registry refuses


async def test_scraping_from_another_thread_under_load(anyio_backend: str) -> None:
    """prometheus_client serves scrapes on its own thread, while the loop updates the stats."""
    registry = CollectorRegistry()
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrape(registry)
            except BaseException as error:
                errors.append(error)
                return

    async with batchkit.Batcher(lambda b: b, collate=None, max_batch_size=8, max_wait_ms=0, name="busy") as batcher:
        register(batcher, registry)
        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            with anyio.fail_after(60):
                for _ in range(20):
                    async with anyio.create_task_group() as tg:
                        for i in range(50):
                            tg.start_soon(batcher.predict, i)
        finally:
            stop.set()
            thread.join(30)
    assert not errors
    assert value(scrape(registry), "batchkit_completed_total", batcher="busy") == 1000


def test_import_batchkit_does_not_import_prometheus_client() -> None:
    code = "import sys, batchkit; assert 'prometheus_client' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
