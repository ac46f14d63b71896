"""A torch module behind a Batcher: ``Batcher.from_module``.

Run: ``python examples/torch_module.py`` (needs the ``torch`` extra). A small
image classifier built in code takes 3x224x224 images; 64 concurrent callers
each send one image and get their own logits back, batched on the way.
"""

from __future__ import annotations

import anyio
import torch

import batchkit


def build_model() -> torch.nn.Module:
    """3x224x224 image -> 10 logits: a strided convolution, pooling, a linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=8, stride=8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


async def main() -> None:
    model = build_model()
    # --8<-- [start:predict]
    batcher = batchkit.Batcher.from_module(model, max_batch_size=64, max_wait_ms=2)
    logits = await batcher.predict(torch.randn(3, 224, 224))  # one sample in, its logits out
    # --8<-- [end:predict]
    assert logits.shape == (10,)
    results: list[torch.Tensor] = [logits] * 64
    images = torch.randn(64, 3, 224, 224)

    async def one(i: int) -> None:
        results[i] = await batcher.predict(images[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(images)):
            tg.start_soon(one, i)
    with torch.inference_mode():
        torch.testing.assert_close(torch.stack(results), model.eval()(images), rtol=1e-4, atol=1e-4)
    stats = batcher.stats()
    print(f"{stats.requests} images in {stats.batches} batches")
    await batcher.aclose()


if __name__ == "__main__":
    anyio.run(main)
