"""From raw traces to the numbers reported: one ``Cell`` per (variant, load)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import batchkit

from ._loads import HEARTBEAT_S, Load, Trace

__all__ = ["LAG_JITTER_MS", "REACH", "Cell", "machine_info", "percentiles_ms", "summarize", "write_json"]


REACH = 0.95
"""An open-loop rate is reachable when the generator alone issues this share of its arrivals on time."""
LAG_JITTER_MS = 2 * HEARTBEAT_S * 1000.0
"""Heartbeat lateness below this is the timer's own jitter, not a blocked loop."""


@dataclass(frozen=True)
class Cell:
    """The outcome of one variant under one load. Times in milliseconds."""

    variant: str
    family: str
    max_batch_size: int | None
    """The batching setting (None for the naive variants)."""
    load: str
    load_kind: str
    load_value: float
    throughput: float
    """Requests answered per second in the measurement window."""
    requests: int
    """Requests sent in the window and answered."""
    unfinished: int
    """Requests cancelled after the drain time (counted in the latencies as a lower bound)."""
    errors: int
    p50_ms: float | None
    """Latency percentiles; None when no request was sent in the window."""
    p95_ms: float | None
    p99_ms: float | None
    mean_batch_size: float
    model_busy: float
    """Share of the window the model was running: how well it was kept fed."""
    lag_p99_ms: float | None
    """Heartbeat lateness; None where no event loop is involved (offline-ideal)."""
    lag_max_ms: float | None
    load_reach: float | None = None
    """Open loop: the share of arrivals the load generator alone issues on time at this rate."""

    @property
    def blocks_loop(self) -> bool:
        """The loop lag p99 exceeds the variant's own p50 latency (and the timer's jitter): its latency hides
        what it costs every other coroutine."""
        if self.lag_p99_ms is None or self.p50_ms is None:
            return False
        return self.lag_p99_ms > max(self.p50_ms, LAG_JITTER_MS)

    @property
    def load_unreached(self) -> bool:
        """An open-loop rate the load generator alone cannot issue on time on this machine."""
        return self.load_reach is not None and self.load_reach < REACH


def percentiles_ms(values: list[float], qs: tuple[float, ...]) -> list[float | None]:
    """The ``qs`` percentiles of ``values`` (seconds), in milliseconds; None for each when there are none."""
    if not values:
        return [None] * len(qs)
    return [float(v) * 1000.0 for v in np.percentile(np.asarray(values), qs)]


def summarize(
    variant: str, family: str, max_batch_size: int | None, load: Load, trace: Trace, mean_batch_size: float
) -> Cell:
    latencies = trace.latencies + trace.unfinished
    p50, p95, p99 = percentiles_ms(latencies, (50, 95, 99))
    lag_p99: float | None = None
    lag_max: float | None = None
    if trace.lags:
        (lag_p99,) = percentiles_ms(trace.lags, (99,))
        lag_max = max(trace.lags) * 1000.0
    return Cell(
        variant=variant,
        family=family,
        max_batch_size=max_batch_size,
        load=load.label,
        load_kind=load.kind,
        load_value=load.value,
        throughput=trace.completions / trace.window_s,
        requests=len(trace.latencies),
        unfinished=len(trace.unfinished),
        errors=trace.errors,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_batch_size=mean_batch_size,
        model_busy=trace.model_busy,
        lag_p99_ms=lag_p99,
        lag_max_ms=lag_max,
        load_reach=load.reach,
    )


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "batchkit": batchkit.__version__,
        "device": device,
        "torch_threads": threads,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: Path, meta: dict[str, Any], cells: list[Cell], skipped: dict[str, str]) -> None:
    document = {**meta, "results": [asdict(cell) for cell in cells], "skipped": skipped}
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
