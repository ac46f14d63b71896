"""Prometheus metrics for batchers (needs the ``prometheus`` extra: ``prometheus-client``).

```python
import batchkit.prometheus

batcher = batchkit.Batcher(model, name="embedder")
batchkit.prometheus.register(batcher)          # prometheus_client's global registry
```

Stats are read at scrape time only; see ``BatcherCollector`` for the metrics.
``import batchkit`` never imports this module or ``prometheus_client``.
"""

from ._prometheus import BATCH_SIZE_BUCKETS, BatcherCollector, StatsSource, register, unregister

__all__ = ["BATCH_SIZE_BUCKETS", "BatcherCollector", "StatsSource", "register", "unregister"]
