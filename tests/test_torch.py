"""Batcher.from_module: serving a torch.nn.Module on the CPU here, on CUDA where present."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from torch import nn

import batchkit
from batchkit._collate import AutoCollate
from tests.test_batching import gather, gather_settled

pytestmark = pytest.mark.anyio

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class Probe(nn.Module):
    """Records how it is called: batch sizes, inference mode, training flag, thread."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            {
                "size": len(x),
                "inference": torch.is_inference_mode_enabled(),
                "training": self.training,
                "thread": threading.get_ident(),
                "dtype": x.dtype,
            }
        )
        return self.linear(x)


async def test_serves_a_module_with_one_line_and_matches_the_unbatched_output() -> None:
    model = mlp()
    inputs = [torch.randn(8) for _ in range(20)]
    with torch.no_grad():
        expected = [model(x[None])[0] for x in inputs]
    async with batchkit.Batcher.from_module(model, max_batch_size=8, max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
        stats = batcher.stats()
    for r, e in zip(results, expected, strict=True):
        assert r.device.type == "cpu"
        assert torch.allclose(r, e, atol=1e-6)
    assert stats.batches < 20
    assert stats.batch_sizes.keys() <= set(range(1, 9))


async def test_runs_in_eval_and_inference_mode_off_the_event_loop() -> None:
    probe = Probe().train()
    async with batchkit.Batcher.from_module(probe, max_wait_ms=20) as batcher:
        await gather(batcher, [torch.randn(4) for _ in range(5)])
    assert probe.calls
    assert all(c["inference"] and not c["training"] for c in probe.calls)
    assert all(c["thread"] != threading.get_ident() for c in probe.calls)


async def test_numpy_float64_inputs_are_cast_to_the_module_dtype() -> None:
    probe = Probe()
    async with batchkit.Batcher.from_module(probe, max_wait_ms=20) as batcher:
        result = await batcher.predict(np.ones(4, dtype=np.float64))
    assert probe.calls[0]["dtype"] == torch.float32
    assert isinstance(result, np.ndarray)  # numpy in, numpy out
    assert result.dtype == np.float32


async def test_module_results_are_ordinary_tensors_that_own_their_memory() -> None:
    async with batchkit.Batcher.from_module(mlp(), max_wait_ms=20) as batcher:
        results = await gather(batcher, [torch.randn(8) for _ in range(6)])
    for r in results:
        assert isinstance(r, torch.Tensor)
        assert not r.is_inference()
        assert not r.is_pinned()
        assert r.untyped_storage().nbytes() == 4 * r.element_size()  # its own row, not the batch
        r.add_(1)  # in place: raises on an inference tensor
        assert (r.requires_grad_() * 2).sum().grad_fn is not None  # usable in autograd


async def test_numpy_in_numpy_out_and_tensor_in_tensor_out() -> None:
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(x), x.sum(dim=1).to(torch.bfloat16)

    async with batchkit.Batcher.from_module(TwoOutputs(), max_wait_ms=20) as batcher:
        from_array, from_list, from_tensor = await gather(
            batcher, [np.ones(8, dtype=np.float64), [1.0] * 8, torch.ones(8)]
        )
    for logits, total in (from_array, from_list):
        assert isinstance(logits, np.ndarray)
        assert logits.dtype == np.float32
        assert logits.shape == (4,)
        assert logits.flags.owndata
        assert isinstance(total, np.generic)
        assert total.dtype == np.float32
        assert float(total) == 8.0
    logits, total = from_tensor
    assert isinstance(logits, torch.Tensor)
    assert isinstance(total, torch.Tensor)
    assert total.dtype == torch.bfloat16
    np.testing.assert_allclose(from_array[0], logits.numpy(), rtol=1e-6)


async def test_dict_inputs_become_keyword_arguments_and_dict_outputs_are_split() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"weighted": (tokens * weights).sum(dim=1) * self.scale, "first": tokens[:, 0]}

    inputs = [{"tokens": torch.full((3,), float(i)), "weights": torch.ones(3)} for i in range(6)]
    async with batchkit.Batcher.from_module(TwoInputs(), max_wait_ms=20) as batcher:
        results = await gather(batcher, inputs)
    for i, r in enumerate(results):
        assert set(r) == {"weighted", "first"}
        assert r["weighted"].item() == pytest.approx(6.0 * i)
        assert r["first"].item() == pytest.approx(float(i))


async def test_tuple_inputs_become_positional_arguments() -> None:
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    async with batchkit.Batcher.from_module(Add(), max_wait_ms=20) as batcher:
        results = await gather(batcher, [(torch.tensor([1.0]), torch.tensor([float(i)])) for i in range(4)])
    assert [r.item() for r in results] == [1.0, 2.0, 3.0, 4.0]


async def test_replicas_are_independent_copies_that_all_serve() -> None:
    probe = Probe()
    entered = threading.Barrier(2, timeout=10)

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = probe

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            entered.wait()  # both replicas must be running at once to pass
            return self.inner(x)

    model = Slow()
    async with batchkit.Batcher.from_module(model, replicas=2, max_batch_size=1, max_wait_ms=0) as batcher:
        with anyio.fail_after(20):
            results = await gather(batcher, [torch.randn(4) for _ in range(4)])
    assert len(results) == 4
    assert len(probe.calls) == 2  # the first replica is the module itself; the copy has its own Probe
    assert len({c["thread"] for c in probe.calls}) == 1


def test_replicas_copy_each_tensor_once_straight_to_its_device() -> None:
    """A replica's tensors are copied from the source module, once each, by .to(device): never deep-copied in place."""
    deep_copied: list[str] = []

    class Watched(nn.Parameter):
        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            deep_copied.append("parameter")  # a deepcopy copies on the device the tensor is on
            return super().__deepcopy__(memo)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.embed.weight = Watched(self.embed.weight.detach().clone())
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight  # tied weights stay tied in each copy
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    model = Tied()
    batcher = batchkit.Batcher.from_module(model, replicas=2, pipeline_depth=2)
    modules = [fn.module for fn in batcher.fn.fns]  # type: ignore[attr-defined]
    assert modules[0] is model
    assert len({id(m) for m in modules}) == 4
    assert deep_copied == []
    for copy_ in modules[1:]:
        assert copy_.head.weight is copy_.embed.weight
        assert copy_.embed.weight is not model.embed.weight
        assert copy_.steps is not model.steps
        assert torch.equal(copy_.embed.weight, model.embed.weight)


@cuda
@pytest.mark.cuda
def test_cuda_a_replica_never_passes_through_the_first_device() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4096, 4096).cuda()  # 64 MiB of weights on cuda:0
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    batcher = batchkit.Batcher.from_module(model, replicas=["cuda:0", "cpu"])
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < size // 2  # no second copy on cuda:0, even briefly
    copy_ = batcher.fn.fns[1].module  # type: ignore[attr-defined]
    assert next(copy_.parameters()).device.type == "cpu"
    assert torch.equal(copy_.weight, model.weight.cpu())


async def test_pipeline_depth_runs_copies_never_one_module_on_two_threads() -> None:
    """pipeline_depth=2 overlaps two batches on two copies of the module, each on a thread of its own."""
    lock = threading.Lock()
    overlapped = threading.Event()
    running = peak = 0
    threads_of: dict[int, set[int]] = {}

    class Overlapping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(3.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nonlocal running, peak
            with lock:
                threads_of.setdefault(id(self), set()).add(threading.get_ident())
                running += 1
                peak = max(peak, running)
                if running == 2:
                    overlapped.set()
            overlapped.wait(timeout=10)  # the first batch holds on until a second one runs beside it
            with lock:
                running -= 1
            return x * self.scale

    model = Overlapping()
    assert len(batchkit.Batcher.from_module(mlp()).fn.fns) == 1  # type: ignore[attr-defined]  # default: one slot
    batcher = batchkit.Batcher.from_module(model, pipeline_depth=2, max_batch_size=2, max_wait_ms=0)
    slot_fns = batcher.fn.fns  # type: ignore[attr-defined]
    assert len(slot_fns) == 2
    assert slot_fns[0].module is model
    assert slot_fns[1].module is not model  # a copy: its own state, hooks and activations
    async with batcher:
        with anyio.fail_after(30):
            results = await gather(batcher, [torch.full((1,), float(i)) for i in range(4)])
    assert [r.item() for r in results] == [0.0, 3.0, 6.0, 9.0]
    assert peak == 2
    assert len(threads_of) == 2
    assert all(len(threads) == 1 for threads in threads_of.values())  # each module on one thread only


async def test_allowed_batch_sizes_with_a_module() -> None:
    probe = Probe()
    async with batchkit.Batcher.from_module(probe, max_wait_ms=20, allowed_batch_sizes=(4, 8)) as batcher:
        results = await gather(batcher, [torch.randn(4) for _ in range(5)])
    assert len(results) == 5
    assert {c["size"] for c in probe.calls} <= {4, 8}


async def test_a_sequence_model_with_padding() -> None:
    class Tagger(nn.Module):
        """Token ids -> per-token tag scores, with a GRU: padding must not leak into results."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8, padding_idx=0)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, batch: batchkit.PaddedBatch) -> torch.Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(
                self.embed(batch.values), batch.lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=batch.values.shape[1])
            return self.head(out)

    model = Tagger()
    sentences = [torch.randint(1, 50, (n,)) for n in (5, 2, 9, 1, 6)]
    with torch.inference_mode():
        expected = [model(batchkit.PaddedBatch(s[None], torch.tensor([len(s)]), None))[0] for s in sentences]
    async with batchkit.Batcher.from_module(
        model, max_wait_ms=30, collate=batchkit.pad_sequences(multiple_of=4)
    ) as batcher:
        results = await gather(batcher, sentences)
    for s, r, e in zip(sentences, results, expected, strict=True):
        assert r.shape == (len(s), 3)
        assert torch.allclose(r, e, atol=1e-5)


def test_dtype_mismatch_is_a_clear_error_at_construction() -> None:
    with pytest.raises(ValueError, match=r"parameters are torch.float32 but dtype=torch.float16"):
        batchkit.Batcher.from_module(mlp(), dtype=torch.float16)


def test_meta_device_and_missing_cuda_are_clear_errors() -> None:
    with torch.device("meta"):
        ghost = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        batchkit.Batcher.from_module(ghost)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            batchkit.Batcher.from_module(mlp(), device="cuda")


def test_from_module_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        batchkit.Batcher.from_module(lambda x: x)
    with pytest.raises(ValueError, match="outputs_on"):
        batchkit.Batcher.from_module(mlp(), outputs_on="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        batchkit.Batcher.from_module(mlp(), replicas=0)


async def test_bad_input_to_a_module_fails_for_its_caller_only() -> None:
    async with batchkit.Batcher.from_module(mlp(), max_wait_ms=20) as batcher:
        outcomes = await gather_settled(batcher, [torch.randn(8), "text", torch.randn(8)])
    assert isinstance(outcomes[1], TypeError)
    assert outcomes[0].shape == outcomes[2].shape == (4,)


def test_only_cuda_tensors_are_recorded_on_the_consumer_stream() -> None:
    """outputs_on="device": a model may return CPU tensors too (a length, a count); record_stream raises on them."""
    from batchkit._torch import _record_stream

    recorded: list[Any] = []

    class FakeCudaTensor(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

        def record_stream(self, stream: Any) -> None:
            recorded.append(stream)

    on_device = torch.zeros(2).as_subclass(FakeCudaTensor)
    output = {"logits": on_device, "lengths": torch.tensor([3, 1]), "tag": "x"}
    _record_stream(output, "consumer")  # a real CPU tensor's record_stream raises NotImplementedError
    assert recorded == ["consumer"]


@cuda
@pytest.mark.cuda
async def test_cuda_a_model_returning_a_cpu_tensor_with_outputs_on_device() -> None:
    class WithLengths(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x * 2, "count": (x > 0).sum(dim=1).cpu()}  # one output left on the host

    inputs = [torch.full((3,), float(i)) for i in range(8)]
    async with batchkit.Batcher.from_module(
        WithLengths(), device="cuda", outputs_on="device", max_wait_ms=20
    ) as batcher:
        results = await gather(batcher, inputs)
    for i, r in enumerate(results):
        assert r["y"].device.type == "cuda"
        assert r["count"].device.type == "cpu"
        assert torch.equal(r["y"].cpu(), torch.full((3,), 2.0 * i))
        assert r["count"].item() == (3 if i else 0)


@cuda
@pytest.mark.cuda
async def test_cuda_streams_pinned_staging_and_results_on_the_host() -> None:
    model = mlp()
    inputs = [torch.randn(8) for _ in range(64)]
    with torch.no_grad():
        expected = [model(x[None])[0] for x in inputs]
    batcher = batchkit.Batcher.from_module(model, max_batch_size=16, max_wait_ms=5)
    slot_fns = batcher.fn.fns  # type: ignore[attr-defined]
    assert len(slot_fns) == 1  # one slot per module copy, on CUDA too
    assert slot_fns[0].stream is not None  # type: ignore[attr-defined]
    assert slot_fns[0].stream != torch.cuda.default_stream()  # type: ignore[attr-defined]
    assert next(model.parameters()).is_cuda
    async with batcher:
        results = await gather(batcher, inputs)
    for r, e in zip(results, expected, strict=True):
        assert r.device.type == "cpu"
        assert torch.allclose(r, e.cpu(), atol=1e-4)


@cuda
@pytest.mark.cuda
async def test_cuda_out_of_memory_halves_the_batch() -> None:
    class Hungry(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 4:
                torch.empty(1 << 46, dtype=torch.uint8, device=x.device)  # 64 TiB: a real OOM
            return x * 2

    async with batchkit.Batcher.from_module(Hungry(), device="cuda", max_batch_size=16, max_wait_ms=20) as batcher:
        results = await gather(batcher, [torch.full((2,), float(i)) for i in range(16)])
        stats = batcher.stats()
    assert [r[0].item() for r in results] == [2.0 * i for i in range(16)]
    assert stats.oom_splits >= 2
    assert stats.batch_size_limit == 4


@cuda
@pytest.mark.cuda
async def test_cuda_padding_is_built_on_the_device() -> None:
    seen: list[tuple[str, str, str]] = []

    class Tagger(nn.Module):
        def forward(self, batch: batchkit.PaddedBatch) -> torch.Tensor:
            seen.append((batch.values.device.type, batch.lengths.device.type, batch.mask.device.type))
            return batch.values * batch.mask

    sentences = [torch.arange(1.0, n + 1, device="cuda") for n in (3, 7, 1, 12)]
    async with batchkit.Batcher.from_module(
        Tagger(), device="cuda", max_wait_ms=30, collate=batchkit.pad_sequences(multiple_of=8)
    ) as batcher:
        results = await gather(batcher, sentences)
    assert seen
    assert all(s == ("cuda", "cuda", "cuda") for s in seen)
    for s, r in zip(sentences, results, strict=True):
        assert r.device.type == "cpu"
        assert torch.equal(r, s.cpu())


class _SlowCollate(AutoCollate):
    """Stacks the batch behind ~0.1 s of GPU work queued on the worker thread's current stream."""

    def collate(self, items: list[Any]) -> Any:
        torch.cuda._sleep(200_000_000)  # type: ignore[no-untyped-call]
        return super().collate(items)


@cuda
@pytest.mark.cuda
async def test_cuda_the_model_waits_for_the_batch_collate_built() -> None:
    """collate stacks CUDA inputs on the thread's stream; the model runs on its own and must wait for it."""

    class Reader(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2  # reads the whole batch at once

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1 << 20, generator=generator).cuda() for _ in range(32)]  # 4 MiB each
    torch.cuda.synchronize()
    async with batchkit.Batcher.from_module(
        Reader(), device="cuda", collate=_SlowCollate(), max_batch_size=8, max_wait_ms=20
    ) as batcher:
        results = await gather(batcher, inputs)
    for x, r in zip(inputs, results, strict=True):
        assert torch.equal(r, x.cpu() * 2)


@cuda
@pytest.mark.cuda
async def test_cuda_outputs_are_read_after_the_models_stream_finishes() -> None:
    class Slow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.cuda._sleep(200_000_000)  # type: ignore[no-untyped-call]
            return x + 1

    for outputs_on in ("cpu", "device"):
        inputs = [torch.randn(1 << 16) for _ in range(16)]
        async with batchkit.Batcher.from_module(
            Slow(), device="cuda", outputs_on=outputs_on, max_batch_size=8, max_wait_ms=20
        ) as batcher:
            results = await gather(batcher, inputs)
        for x, r in zip(inputs, results, strict=True):
            assert r.device.type == ("cpu" if outputs_on == "cpu" else "cuda")
            assert torch.equal(r.cpu(), x + 1)


@cuda
@pytest.mark.cuda
async def test_cuda_results_are_not_pinned_and_own_their_memory() -> None:
    model = mlp()
    for views in (False, True):
        async with batchkit.Batcher.from_module(
            model, device="cuda", collate=AutoCollate(views=views), max_wait_ms=20
        ) as batcher:
            results = await gather(batcher, [torch.randn(8) for _ in range(16)])
            arrays = await gather(batcher, [np.random.rand(8) for _ in range(16)])
        for r in results:
            assert r.device.type == "cpu"
            assert not r.is_pinned()  # pinned host memory is scarce: never handed to a caller
            if not views:
                assert not r.is_inference()
                assert r.untyped_storage().nbytes() == 4 * r.element_size()
        for a in arrays:
            assert isinstance(a, np.ndarray)
            assert a.dtype == np.float32
            assert views or a.flags.owndata


@cuda
@pytest.mark.cuda
async def test_cuda_out_of_memory_recovers_and_frees_what_it_took() -> None:
    hungry = True

    class SometimesHungry(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if hungry and len(x) > 4:
                torch.empty(1 << 46, dtype=torch.uint8, device=x.device)  # 64 TiB: a real OOM
            return x * 2

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    async with batchkit.Batcher.from_module(
        SometimesHungry(), device="cuda", max_batch_size=8, max_wait_ms=50
    ) as batcher:
        first = await gather(batcher, [torch.full((2,), float(i)) for i in range(8)])
        assert batcher.stats().batch_size_limit == 4
        hungry = False  # memory is back: after 64 clean batches at the cap, the cap doubles
        for _ in range(70):
            await gather(batcher, [torch.full((2,), 1.0) for _ in range(4)])
        later = await gather(batcher, [torch.full((2,), float(i)) for i in range(8)])
        stats = batcher.stats()
    assert [r[0].item() for r in first] == [2.0 * i for i in range(8)]
    assert [r[0].item() for r in later] == [2.0 * i for i in range(8)]
    assert stats.batch_size_limit == 8
    assert 8 in stats.batch_sizes
    del first, later
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline  # nothing of the failed attempts is kept
