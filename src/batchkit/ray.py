"""Ray Serve integration: a deployment whose replicas each run their own batchkit ``Batcher``.

Ray Serve scales out (replicas across processes and machines, autoscaling, HTTP
routing); batchkit batches inside each replica. ``batched_deployment`` writes the
glue once (needs the ``ray`` extra):

```python
from ray import serve
from batchkit.ray import batched_deployment

def make_batcher():                       # runs in each replica process
    return batchkit.Batcher.from_module(build_model(), max_batch_size=32, max_wait_ms=2)

Classifier = batched_deployment(
    make_batcher,
    decode=lambda payload: np.asarray(payload["x"], dtype=np.float32),
    encode=lambda y: {"y": y.tolist()},
    num_replicas=2,
)
serve.run(Classifier.bind(), route_prefix="/classify")
```

Each replica builds its batcher in its own process (``make_batcher`` must be
picklable; a module-level function is), serves ``POST`` requests by decoding
the JSON body, awaiting ``batcher.predict`` and encoding the result, answers
``GET .../stats`` with the replica's ``stats()``, and drains its batcher when
Serve stops it. Python callers through a ``DeploymentHandle`` send inputs
directly: ``await handle.remote(x)``. Errors map to HTTP statuses: a full queue
is 503, a timeout 504, an input the collator refuses (`InvalidInputError`) 400;
a `TypeError` the model itself raises is a 500, like any model bug.

Why not ``@serve.batch``? It batches per replica too, but runs the batch
function on the replica's event loop (a synchronous model then blocks every
request of that replica), has no shape bucketing, OOM halving or error
isolation, and ties the model code to Ray. With batchkit the same model code
runs in a plain FastAPI app, in tests, and in Serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ._extras import require

require("ray.serve", "ray", "batchkit.ray")

from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from ._batcher import Batcher  # noqa: E402
from ._errors import (  # noqa: E402
    BatcherClosedError,
    InvalidInputError,
    ModelTimeoutError,
    QueueFullError,
    RequestTimeoutError,
)

__all__ = ["batched_deployment"]


def _identity(value: Any) -> Any:
    return value


def _error_response(error: Exception) -> JSONResponse | None:
    status = {
        QueueFullError: 503,
        BatcherClosedError: 503,
        RequestTimeoutError: 504,
        ModelTimeoutError: 504,
        InvalidInputError: 400,  # bad input only: a TypeError the model raised is a 500
    }
    for kind, code in status.items():
        if isinstance(error, kind):
            return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=code)
    return None


def batched_deployment(
    make_batcher: Callable[[], Batcher[Any, Any]],
    *,
    decode: Callable[[Any], Any] = _identity,
    encode: Callable[[Any], Any] = _identity,
    name: str = "BatchedModel",
    **deployment_options: Any,
) -> Any:
    """A Ray Serve deployment whose replicas each serve one ``Batcher``.

    Args:
        make_batcher: builds the replica's batcher; called once per replica, in
            the replica's process.
        decode: turns a request's JSON body into the model input.
        encode: turns the model output into a JSON-serializable response.
        name: the deployment's name.
        **deployment_options: passed to ``ray.serve.deployment`` (for example
            ``num_replicas``, ``autoscaling_config``, ``ray_actor_options``).
            ``max_ongoing_requests`` defaults to 256 here, not Serve's 5: a replica
            can only batch the requests Serve lets in at once.

    Returns:
        A ``ray.serve.Deployment``; ``.bind()`` it and ``serve.run`` the result.
    """

    class BatchedReplica:
        def __init__(self) -> None:
            self.batcher = make_batcher()

        async def __call__(self, request: Any) -> Any:
            if not isinstance(request, Request):  # a DeploymentHandle call: a Python value
                return await self.batcher.predict(request)
            if request.method == "GET":
                if request.url.path.rstrip("/").endswith("/stats"):
                    return dataclasses.asdict(self.batcher.stats())
                return JSONResponse({"error": "not found"}, status_code=404)
            try:
                output = await self.batcher.predict(decode(await request.json()))
            except Exception as exc:
                response = _error_response(exc)
                if response is None:
                    raise
                return response
            return encode(output)

        async def __del__(self) -> None:  # Ray Serve awaits this when it stops the replica
            await self.batcher.aclose()

    BatchedReplica.__name__ = BatchedReplica.__qualname__ = name
    deployment_options.setdefault("max_ongoing_requests", 256)
    return serve.deployment(name=name, **deployment_options)(BatchedReplica)
