"""Repeated inputs computed once: ``dedup_key`` and ``cache_size``.

Run: ``python examples/repeated_inputs.py [asyncio|trio]``. A search service
embeds queries; popular queries come in many times at once. Identical queries
in progress share one computation, recent ones are answered from a cache, and
every caller gets an array of its own.
"""

from __future__ import annotations

import sys
from collections import Counter

import anyio
import numpy as np

import batchkit

rows = Counter[str]()  # what the model computed, query by query


# --8<-- [start:batcher]
def normalized(query: str) -> str:
    return " ".join(query.lower().split())


def embed(queries: list[str]) -> list[np.ndarray]:
    """A stand-in for a real embedding model: one vector per query, by its normalized text."""
    rows.update(normalized(q) for q in queries)
    return [np.frombuffer(normalized(q).encode().ljust(8)[:8], dtype=np.uint8).astype(np.float32) for q in queries]


embedder = batchkit.Batcher(
    embed,
    collate=None,
    max_batch_size=32,
    dedup_key=normalized,  # "Cheap Flights" and "cheap  flights" are one query
    cache_size=1000,  # results of the last 1000 queries
)
# --8<-- [end:batcher]


# --8<-- [start:serve]
async def main() -> None:
    queries = ["cheap flights", "Cheap Flights", "weather", "cheap  flights", "news", "weather"] * 20
    vectors: list[np.ndarray] = []

    async def search(query: str) -> None:
        vectors.append(await embedder.predict(query))

    async with embedder:
        async with anyio.create_task_group() as tg:
            for query in queries:
                tg.start_soon(search, query)
        later = await embedder.predict("WEATHER")  # from the cache: no model call

    vectors[0][:] = 0  # every caller's array is its own: changing one changes no other
    assert not any((v == 0).all() for v in vectors[1:])
    stats = embedder.stats()
    print(f"{stats.requests} requests, {sum(rows.values())} rows computed: {dict(rows)}")
    print(f"deduplicated {stats.deduplicated}, cache hits {stats.cache_hits}, cache misses {stats.cache_misses}")
    print(f"'WEATHER' from the cache: {later[:7].astype(int).tolist()}")
    # --8<-- [end:serve]


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
