"""The embedded benchmark models: plain MLPs built in code, nothing to download.

``mlp`` is sized so that one sample costs about 1 ms on one CPU core; batched,
a sample costs several times less, which is the gain a batcher can harvest.
``tiny`` costs microseconds and is for tests; ``large`` is for a GPU.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["MODELS", "Model", "ModelSpec", "configure_threads", "pick_device"]


@dataclass(frozen=True)
class ModelSpec:
    """Shape of an MLP: ``features -> hidden x layers -> features``."""

    name: str
    features: int
    hidden: int
    layers: int


MODELS = {
    "tiny": ModelSpec("tiny", features=16, hidden=32, layers=1),
    "mlp": ModelSpec("mlp", features=512, hidden=1280, layers=3),
    "large": ModelSpec("large", features=1024, hidden=8192, layers=4),
}


def pick_device(requested: str) -> str:
    """``auto`` means CUDA when torch sees a GPU, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return requested


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads; by default leave one core to the event loop."""
    import torch

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    return threads


class Model:
    """A torch MLP on one device that counts the batches it is given.

    ``model(batch)`` runs a stacked batch; ``run_list(items)`` stacks a list of
    samples and returns a list of outputs (what list-based batchers call).
    Outputs are copied to the CPU, so GPU work is finished when a call returns.
    """

    def __init__(self, spec: ModelSpec, device: str, *, seed: int = 0) -> None:
        import torch

        self._torch = torch
        self.spec = spec
        self.device = device
        torch.manual_seed(seed)
        layers: list[Any] = [torch.nn.Linear(spec.features, spec.hidden), torch.nn.ReLU()]
        for _ in range(spec.layers - 1):
            layers += [torch.nn.Linear(spec.hidden, spec.hidden), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(spec.hidden, spec.features))
        self.net = torch.nn.Sequential(*layers).to(device).eval()
        self.parameters = sum(p.numel() for p in self.net.parameters())
        self._lock = threading.Lock()
        self.calls = 0
        self.samples = 0
        self.runs: list[tuple[float, float, int]] = []  # (start, end, batch size) of each call, time.perf_counter()

    def sample(self) -> Any:
        """One random input on the model's device."""
        return self._torch.randn(self.spec.features, device=self.device)

    def __call__(self, batch: Any) -> Any:
        start = time.perf_counter()
        with self._torch.inference_mode():
            output = self.net(batch).cpu()
        end = time.perf_counter()
        with self._lock:
            self.calls += 1
            self.samples += len(batch)
            self.runs.append((start, end, len(batch)))
        return output

    def run_list(self, items: list[Any]) -> list[Any]:
        return list(self(self._torch.stack(items)).unbind(0))

    def run_one(self, item: Any) -> Any:
        return self(item.unsqueeze(0))[0]

    def reset_counts(self) -> None:
        with self._lock:
            self.calls = self.samples = 0
            self.runs = []

    def busy(self, start: float, stop: float) -> float:
        """The share of ``[start, stop]`` during which the model was running."""
        with self._lock:
            runs = list(self.runs)
        overlap = sum(max(0.0, min(end, stop) - max(begin, start)) for begin, end, _ in runs)
        return overlap / (stop - start)

    def run_log(self) -> list[tuple[float, float, int]]:
        """``(start, end, batch size)`` of every call since the last ``reset_counts()``."""
        with self._lock:
            return list(self.runs)

    @property
    def mean_batch_size(self) -> float:
        return self.samples / self.calls if self.calls else 0.0

    def seconds_per_batch(self, batch_size: int, *, repeat: int = 20) -> float:
        """Median wall time of one call on a batch of ``batch_size`` (after a warm-up)."""
        batch = self._torch.stack([self.sample() for _ in range(batch_size)])
        times = []
        for _ in range(repeat + 3):
            start = time.perf_counter()
            self(batch)
            times.append(time.perf_counter() - start)
        self.reset_counts()
        return sorted(times[3:])[repeat // 2]
