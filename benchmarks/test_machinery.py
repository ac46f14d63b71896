"""pytest-benchmark: 20,000 concurrent requests through each batcher, identity model.

```bash
pytest benchmarks/test_machinery.py --benchmark-columns=min,median,mean,stddev,rounds
```

``requests_per_s`` in each benchmark's extra info is REQUESTS / mean round time.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from machinery import PEERS, REQUESTS, ROUNDS

pytestmark = pytest.mark.filterwarnings("ignore")  # ray and its dependencies warn on import


def _collect_garbage() -> None:
    """Start each round from a collected heap: no round pays for an earlier one's garbage."""
    gc.collect()


@pytest.mark.parametrize("name", list(ROUNDS))
def test_machinery(benchmark: Any, name: str) -> None:
    if name in PEERS:
        pytest.importorskip(PEERS[name])
    round_ = ROUNDS[name]
    asyncio.run(round_())  # warm up: imports, thread start, first-call paths
    benchmark.pedantic(lambda: asyncio.run(round_()), setup=_collect_garbage, rounds=10, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["requests"] = REQUESTS
        benchmark.extra_info["requests_per_s"] = REQUESTS / benchmark.stats.stats.mean
