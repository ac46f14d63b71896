"""A Ray Serve deployment whose replicas each batch with batchkit.

Run: ``python examples/ray_serve_app.py`` from the repository root (needs the ``ray`` and
``torch`` extras: ``pip install -e ".[ray,torch]"`` in a clone).
It starts a local Ray instance on this machine, deploys two replicas on
127.0.0.1:8000 and serves until Ctrl-C. Try::

    curl -X POST 127.0.0.1:8000/classify -d '{"x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}'
    curl 127.0.0.1:8000/classify/stats

Each replica is its own process with its own model and its own Batcher; Ray
routes requests between replicas (and autoscales them, with
``autoscaling_config``), batchkit batches inside each one. The code that calls
``predict`` is the same as in a single-process FastAPI app.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import batchkit
from batchkit.ray import batched_deployment


def build_model() -> torch.nn.Module:
    """A small classifier built in code: 8 features -> 3 class scores."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


# --8<-- [start:deployment]
def make_batcher() -> batchkit.Batcher[Any, Any]:
    """Runs once in each replica process."""
    torch.set_num_threads(1)
    return batchkit.Batcher.from_module(build_model(), max_batch_size=32, max_wait_ms=2, timeout_ms=5_000)


def decode(payload: dict[str, Any]) -> np.ndarray:
    return np.asarray(payload["x"], dtype=np.float32)


def encode(scores: torch.Tensor) -> dict[str, Any]:
    return {"scores": scores.tolist(), "label": int(scores.argmax())}


def build_app(num_replicas: int = 2) -> Any:
    """The Serve application: bind it and pass it to ``serve.run``."""
    deployment = batched_deployment(
        make_batcher,
        decode=decode,
        encode=encode,
        name="Classifier",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": 0.5},
    )
    return deployment.bind()
    # --8<-- [end:deployment]


def main() -> None:
    import time

    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(), route_prefix="/classify")
    print("serving on http://127.0.0.1:8000/classify (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
