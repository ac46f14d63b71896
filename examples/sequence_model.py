"""A variable-length sequence model behind one Batcher, with padding handled for you.

Run: ``python examples/sequence_model.py``. A tiny GRU tagger (built in code)
tags sentences of token ids of every length. ``pad_sequences(multiple_of=8)``
batches sentences of different lengths together, pads each batch to its
longest sentence (rounded up to a multiple of 8), passes the lengths to the
model, and cuts every caller's output back to its own sentence length.
``batch_cost=len`` with ``max_batch_cost`` bounds the padded tokens per batch.
"""

from __future__ import annotations

import anyio
import torch
from torch import nn

import batchkit


class Tagger(nn.Module):
    """Token ids -> scores over ``tags`` for every token."""

    def __init__(self, vocabulary: int = 1000, width: int = 32, tags: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width, padding_idx=0)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, tags)

    def forward(self, batch: batchkit.PaddedBatch) -> torch.Tensor:
        width = batch.values.shape[1]
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(batch.values), batch.lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        hidden, _ = self.rnn(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=width)
        return self.head(hidden)  # (batch, width, tags): per-token, so padding is stripped per caller


def build_batcher() -> batchkit.Batcher[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return batchkit.Batcher.from_module(
        Tagger(),
        max_batch_size=32,
        max_wait_ms=2,
        collate=batchkit.pad_sequences(multiple_of=8),
        batch_cost=len,
        max_batch_cost=32 * 48,  # at most 1,536 padded tokens per batch
    )


async def tag_all(sentences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tag every sentence concurrently; returns one (length, tags) tensor per sentence."""
    results: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
    async with build_batcher() as batcher:

        async def tag(i: int) -> None:
            results[i] = await batcher.predict(sentences[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(sentences)):
                tg.start_soon(tag, i)
        stats = batcher.stats()
    print(f"{len(sentences)} sentences in {stats.batches} batches (mean size {stats.mean_batch_size:.1f})")
    return results


def main() -> None:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (200,), generator=generator)
    sentences = [torch.randint(1, 1000, (int(n),), generator=generator) for n in lengths]
    tags = anyio.run(tag_all, sentences)
    for sentence, scores in list(zip(sentences, tags, strict=True))[:3]:
        print(f"{len(sentence):2d} tokens -> tags {scores.argmax(dim=1).tolist()}")


if __name__ == "__main__":
    main()
