"""Serving a ``torch.nn.Module``: placement, inference mode, CUDA streams, pinned memory.

``module_replicas`` (behind ``Batcher.from_module``) builds one *slot function*
per module copy, as a ``Replicas``: ``pipeline_depth`` copies (default 1) on each
placement, the module itself first. Every module object runs on its own slot's
thread only (see "The torch runtime" in docs/design.md).

* On CUDA, each slot has its own stream. It waits for the thread's current
  stream (where collate built the batch), then copies host inputs in (staged in
  pinned memory), runs the module and copies outputs back, all on its stream;
  the thread synchronizes the stream before split or any caller reads a result.
* Results are ordinary tensors in pageable memory; a numpy batch gets numpy back.

Inputs may be any pytree of tensors, arrays and numbers; tensors are moved to the
device and floating ones cast to the module's dtype (a float64 numpy input to a
float32 model is the most common crash in serving code). A dict is passed as
keyword arguments, a plain tuple as positional arguments, anything else as the
single argument. Outputs come back on the CPU unless ``outputs_on="device"``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ._runner import Replicas

__all__ = ["ModuleFn", "module_replicas"]

DeviceLike = str | torch.device


def _leaves(tree: Any) -> list[Any]:
    """The leaves of a pytree, in order."""
    found: list[Any] = []
    _map(lambda leaf: found.append(leaf), tree)
    return found


def _numpy_batch(batch: Any) -> bool:
    """True when the batch came as numpy (arrays, numbers), with no tensor in it: its outputs go back as numpy."""
    leaves = _leaves(batch)
    return any(isinstance(leaf, np.ndarray) for leaf in leaves) and not any(
        isinstance(leaf, torch.Tensor) for leaf in leaves
    )


def _to_numpy(leaf: Any) -> Any:
    """A CPU tensor as a numpy array (sharing its memory; split copies the rows); bfloat16 as float32."""
    if not isinstance(leaf, torch.Tensor) or leaf.device.type != "cpu":
        return leaf
    if leaf.dtype == torch.bfloat16:
        leaf = leaf.float()
    return leaf.numpy()


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to each leaf of a pytree, rebuilding its containers."""
    if isinstance(tree, dict):
        return type(tree)((k, _map(fn, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return type(tree)(*(_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, v) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(
            tree, **{f.name: _map(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree) if f.init}
        )
    return fn(tree)


def _record_stream(output: Any, consumer: Any) -> None:
    """Tell the caching allocator that ``consumer`` uses the CUDA tensors of ``output``.

    Only CUDA tensors: a model may return a CPU tensor too (a length, a count),
    and ``record_stream`` raises on one.
    """

    def record(leaf: Any) -> None:
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(consumer)

    _map(record, output)


class ModuleFn:
    """One slot's batch function: moves a batch to the device, runs the module, brings results back."""

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype | None,
        outputs_on: Literal["cpu", "device"],
    ) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.outputs_on = outputs_on
        self.stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def _to_device(self, leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            leaf = torch.from_numpy(np.ascontiguousarray(leaf))
        if not isinstance(leaf, torch.Tensor):
            return leaf
        dtype = self.dtype if self.dtype is not None and leaf.is_floating_point() else None
        if self.stream is not None and leaf.device.type == "cpu":
            leaf = leaf.pin_memory()  # staging buffer: lets the copy run asynchronously
        return leaf.to(device=self.device, dtype=dtype, non_blocking=True)

    def _to_host(self, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu":
            # A blocking copy on the current stream (the model's): it lands in ordinary
            # (pageable) host memory, never in a pinned buffer a caller would then hold,
            # and returns once that stream's work up to the copy is done.
            return leaf.to("cpu")
        return leaf

    def _call(self, batch: Any) -> Any:
        inputs = _map(self._to_device, batch)
        if type(inputs) is dict:
            output = self.module(**inputs)
        elif type(inputs) is tuple:
            output = self.module(*inputs)
        else:
            output = self.module(inputs)
        if self.outputs_on == "cpu":
            output = _map(self._to_host, output)
        return output

    def __call__(self, batch: Any) -> Any:
        numpy_out = self.outputs_on == "cpu" and _numpy_batch(batch)
        with torch.inference_mode():
            output = self._call(batch) if self.stream is None else self._call_on_stream(batch)
        if numpy_out:
            output = _map(_to_numpy, output)
        return output

    def _call_on_stream(self, batch: Any) -> Any:
        """One batch on this slot's CUDA stream, ordered against the thread's current stream both ways."""
        stream = self.stream
        # The thread's current stream: where collate just built the batch (a torch.stack
        # of CUDA inputs, pad_sequences' padding), and where split will cut the outputs.
        consumer = torch.cuda.current_stream(self.device)
        stream.wait_stream(consumer)  # the model reads the batch only after it is written
        with torch.cuda.stream(stream):
            output = self._call(batch)  # copies in, forward, copies out: all on `stream`, in order
        stream.synchronize()  # the host reads nothing before the stream's work is done
        if self.outputs_on == "device":
            # Allocated on `stream`, read next on `consumer` (split's clones, the callers):
            # the allocator must not hand their blocks back to `stream` before those reads.
            _record_stream(output, consumer)
        return output


def _placement(module: torch.nn.Module) -> tuple[set[torch.device], set[torch.dtype]]:
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return devices, dtypes


def _resolve_device(module: torch.nn.Module, device: DeviceLike | None) -> torch.device:
    devices, _ = _placement(module)
    if len(devices) > 1:
        raise ValueError(
            f"the module's parameters span several devices ({', '.join(sorted(map(str, devices)))}); "
            "from_module serves a module that lives on one device"
        )
    current = next(iter(devices)) if devices else torch.device("cpu")
    if current.type == "meta":
        raise ValueError("the module's parameters are on the meta device: load its weights before serving it")
    if device is None:
        if current.type != "cpu":
            return current
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else current
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    if current.type != "cpu" and current != target:
        raise ValueError(
            f"the module is on {current} but device={str(device)!r}; "
            "move it yourself (module.to(...)) or leave device=None to serve it where it is"
        )
    return target


def _resolve_dtype(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    _, dtypes = _placement(module)
    if dtype is None:
        return next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtypes and dtypes != {dtype}:
        have = ", ".join(sorted(str(d) for d in dtypes))
        raise ValueError(
            f"the module's parameters are {have} but dtype={dtype}; convert the module first "
            "(for example module.to(dtype)) or leave dtype=None to use the module's own"
        )
    return dtype


def module_replicas(
    module: torch.nn.Module,
    *,
    device: DeviceLike | None = None,
    dtype: torch.dtype | None = None,
    outputs_on: Literal["cpu", "device"] = "cpu",
    replicas: int | Sequence[DeviceLike] = 1,
    pipeline_depth: int | None = None,
) -> Replicas:
    """The slot functions that serve ``module`` (see ``Batcher.from_module``)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_module serves a torch.nn.Module, got {type(module).__qualname__}")
    if outputs_on not in ("cpu", "device"):
        raise ValueError(f"outputs_on must be 'cpu' or 'device', got {outputs_on!r}")
    if isinstance(replicas, int):
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        primary = _resolve_device(module, device)
        placements = [primary] * replicas
    else:
        placements = [_resolve_device(module, d) if i == 0 else torch.device(d) for i, d in enumerate(replicas)]
        if not placements:
            raise ValueError("replicas must name at least one device")
    input_dtype = _resolve_dtype(module, dtype)
    if pipeline_depth is None:
        pipeline_depth = 1
    if isinstance(pipeline_depth, bool) or not isinstance(pipeline_depth, int) or pipeline_depth < 1:
        raise ValueError(f"pipeline_depth must be a positive int, got {pipeline_depth!r}")

    # One slot per module copy: pipeline_depth copies on each placement. A module
    # object only ever runs on its own slot's thread (see "The torch runtime" in
    # docs/design.md): two batches overlap only on two copies the user asked for.
    slots = [place for place in placements for _ in range(pipeline_depth)]
    # The copies first, from the module where it is now (the CPU, usually), each
    # straight to its device; then the module itself moves to the first slot's.
    copies = [_copy_to(module, place) for place in slots[1:]]
    first = module.to(slots[0]).eval()
    return Replicas(
        [ModuleFn(m, place, input_dtype, outputs_on) for m, place in zip([first, *copies], slots, strict=True)]
    )


def _copy_to(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are copied once each, straight onto ``device``.

    ``copy.deepcopy`` of a module copies each tensor where it is (a GPU module:
    a second copy on that GPU, even if the copy is meant for another device).
    Here each tensor is copied with one ``.to(device, copy=True)`` and handed to
    deepcopy through its memo, so the structure (submodules, hooks, tied
    weights, which stay tied) is copied, and no tensor is copied twice.
    """
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach().to(device, copy=True), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(module, memo).to(device).eval()
