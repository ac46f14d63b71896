"""batchkit: async micro-batching of model inference, inside your application.

```python
batcher = batchkit.Batcher(model_fn, max_batch_size=64, max_wait_ms=2)
y = await batcher.predict(x)      # one sample in, its own result out
```
"""

from ._batcher import Batcher
from ._collate import Collator
from ._decorator import batch
from ._errors import (
    BatcherClosedError,
    BatchkitError,
    BatchSizeMismatchError,
    InvalidInputError,
    ModelTimeoutError,
    QueueFullError,
    RequestTimeoutError,
    StreamBufferFullError,
)
from ._padding import PaddedBatch, PadSequences, pad_sequences
from ._settings import DEFAULT_MAX_QUEUE_SIZE, BatcherOptions
from ._shared import SharedExecutor, SharedExecutorStats
from ._stats import BatcherStats, LatencySummary
from ._step import StepBatcher, StepModel
from ._stream import END
from ._sync import SyncBatcher
from ._worker import current_batch_key

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_QUEUE_SIZE",
    "END",
    "BatchSizeMismatchError",
    "Batcher",
    "BatcherClosedError",
    "BatcherOptions",
    "BatcherStats",
    "BatchkitError",
    "Collator",
    "InvalidInputError",
    "LatencySummary",
    "ModelTimeoutError",
    "PadSequences",
    "PaddedBatch",
    "QueueFullError",
    "RequestTimeoutError",
    "SharedExecutor",
    "SharedExecutorStats",
    "StepBatcher",
    "StepModel",
    "StreamBufferFullError",
    "SyncBatcher",
    "__version__",
    "batch",
    "current_batch_key",
    "pad_sequences",
]
