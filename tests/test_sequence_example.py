"""examples/sequence_model.py: variable-length sequences through pad_sequences and from_module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sequence_model

pytestmark = pytest.mark.anyio


async def test_each_sentence_gets_its_own_unpadded_tags() -> None:
    generator = torch.Generator().manual_seed(3)
    sentences = [torch.randint(1, 1000, (n,), generator=generator) for n in (1, 17, 5, 33, 8, 8, 2, 40)]
    results = await sequence_model.tag_all(sentences)
    torch.manual_seed(0)
    reference = sequence_model.Tagger().eval()  # same seed as build_batcher: same weights
    with torch.inference_mode():
        for sentence, scores in zip(sentences, results, strict=True):
            alone = reference(sequence_model.batchkit.PaddedBatch(sentence[None], torch.tensor([len(sentence)]), None))
            assert scores.shape == (len(sentence), 5)
            assert torch.allclose(scores, alone[0], atol=1e-5)


def test_the_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    sequence_model.main()
    out = capsys.readouterr().out
    assert "200 sentences in" in out
    assert "tokens -> tags" in out
