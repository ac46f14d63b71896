"""pytest-benchmark: ``AutoCollate`` stacking a batch and splitting the output back.

```bash
pytest benchmarks/test_collate.py --benchmark-columns=mean,rounds --benchmark-sort=name
```

One round is ``collate(items)`` then ``split(output, n, batch)``: what batchkit adds per
batch around the model call, for 128-float samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from batchkit._collate import AutoCollate

SIZES = [1, 4, 16, 64, 256]
FEATURES = 128


def numpy_sample() -> Any:
    return np.ones(FEATURES, dtype=np.float32)


def torch_sample() -> Any:
    torch = pytest.importorskip("torch")
    return torch.ones(FEATURES)


def nested_sample() -> Any:
    """A dict of arrays and a tuple: the shape of a tokenizer's output."""
    return {"input_ids": np.ones(FEATURES, dtype=np.int64), "pair": (numpy_sample(), np.float32(1.0))}


SAMPLES: dict[str, Callable[[], Any]] = {"numpy": numpy_sample, "torch": torch_sample, "nested": nested_sample}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_collate_and_split(benchmark: Any, kind: str, size: int) -> None:
    collator = AutoCollate()
    sample = SAMPLES[kind]()
    try:
        collator.key(sample)
    except TypeError as exc:
        pytest.skip(f"AutoCollate cannot batch {kind} inputs here: {exc}")
    items = [sample] * size

    def round_trip() -> Any:
        batch = collator.collate(items)
        return collator.split(batch, size, batch)  # an identity model: the output is the batch

    assert len(round_trip()) == size
    benchmark(round_trip)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["per_item_us"] = benchmark.stats.stats.mean / size * 1e6
