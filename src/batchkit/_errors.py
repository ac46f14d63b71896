"""The batchkit exception tree.

```text
Exception
 └── BatchkitError                  every error batchkit itself raises
      ├── QueueFullError            max_queue_size requests already pending
      ├── BatcherClosedError        predict() after aclose()
      ├── RequestTimeoutError       the call's deadline passed (also a TimeoutError)
      ├── ModelTimeoutError         a batch ran longer than run_timeout_ms (also a TimeoutError)
      ├── BatchSizeMismatchError    fn returned a batch of the wrong length
      ├── InvalidInputError         the collator cannot batch this input (also a TypeError)
      └── StreamBufferFullError     a stream's caller fell stream_buffer items behind
```

Errors raised by the model function are not wrapped: every caller of the failing
batch receives the model's own exception, so ``except ValueError`` works the same
with and without batchkit. An input that cannot be batched raises
``InvalidInputError`` for that caller only, so an integration can tell bad input
(HTTP 400) from a model bug (500).
"""

from __future__ import annotations

__all__ = [
    "BatchSizeMismatchError",
    "BatcherClosedError",
    "BatchkitError",
    "InvalidInputError",
    "ModelTimeoutError",
    "QueueFullError",
    "RequestTimeoutError",
    "StreamBufferFullError",
]


class BatchkitError(Exception):
    """Base class of every error raised by batchkit itself."""


class QueueFullError(BatchkitError):
    """The batcher already holds ``max_queue_size`` pending requests.

    Raised at once by ``predict`` so that an overloaded service sheds load
    instead of growing its memory without bound.
    """


class BatcherClosedError(BatchkitError):
    """The batcher is closed (or closing) and accepts no new requests."""


class RequestTimeoutError(BatchkitError, TimeoutError):
    """The request's deadline (``timeout_ms``) passed before its result was ready, or could not be met.

    A request that times out while still queued is never sent to the model. One
    whose answer is predicted after its deadline (the work queued ahead of it, or
    its batch's expected run time) fails at once, before it takes a batch slot.
    """


class ModelTimeoutError(BatchkitError, TimeoutError):
    """The model ran one batch for longer than ``run_timeout_ms``.

    Every caller of that batch gets this error. An async model is cancelled. A
    synchronous call cannot be interrupted: its slot waits for it to return
    (the model is never called twice at once), or with ``replace_hung=True``
    a fresh thread takes its place at once.
    """


class BatchSizeMismatchError(BatchkitError):
    """The model returned a batch whose length differs from its input's."""


class InvalidInputError(BatchkitError, TypeError):
    """The collator cannot batch this input (an unsupported type or structure).

    Raised by ``predict`` before the request is queued, for that caller only. It
    is also a ``TypeError``, as before it existed.
    """


class StreamBufferFullError(BatchkitError):
    """A streaming caller fell ``stream_buffer`` items behind and was cut off.

    The other rows of its batch never wait for a slow reader: what is buffered
    for one caller is bounded, and past the bound its stream ends with this error.
    """
