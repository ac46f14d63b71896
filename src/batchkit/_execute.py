"""Running one batch: collate → fn → split, with OOM halving, error isolation and padding.

``Executor.run`` is called on a worker thread (``run_async`` on the loop, for an
async model) and never raises: it returns an ``Outcome`` that the batcher turns
into answers on the event loop.

Three things can make one batch into several model calls:

* **Out of memory.** If the model raises ``torch.cuda.OutOfMemoryError`` (or
  ``MemoryError``) on a batch of more than one request, the batch is split in
  halves and each half retried, recursively down to single requests. The
  largest size that then fit is reported so the batcher can cap later batches
  there, unless some input ran out of memory even alone: then that input is the
  cause, and it alone fails. A request fails only if it fails alone.
* **Error isolation** (``on_error="isolate"``). If the model raises on a batch,
  the batch is bisected the same way to find the poison inputs: only they fail,
  their batch-mates get results. It costs O(k log n) extra calls for k poison
  inputs among n, and nothing when no error happens.
* **Allowed sizes** (``allowed_batch_sizes``). A batch is padded up to the next
  allowed size (repeating its last input) and the padded rows' outputs are
  dropped, so a compiled model or a CUDA graph sees only static shapes.
"""

from __future__ import annotations

import bisect
import copy
import sys
import time
import types
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

import anyio

from ._collate import Collator, mismatch_error

__all__ = ["Executor", "Failed", "Outcome", "is_out_of_memory"]


class Failed:
    """Marks the output of a request that failed on its own (after a split)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Outcome:
    """What one batch run produced, handed from the worker thread to the loop."""

    __slots__ = ("error", "fit", "lone_oom", "outputs", "seconds", "splits")

    def __init__(self, error: BaseException | None = None) -> None:
        self.outputs: list[Any] | None = None  # one per request; a Failed marks a lone failure
        self.error = error  # set when the whole batch failed
        self.seconds = 0.0
        self.fit: int | None = None  # after an OOM: the largest size that then succeeded
        self.splits = 0  # how many times a (sub-)batch was halved
        self.lone_oom = False  # some input ran out of memory on its own

    @property
    def oom_fit(self) -> int | None:
        """The largest size that fit after an OOM, when batch size (not one input) was the cause."""
        return None if self.lone_oom else self.fit


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``MemoryError`` and torch's CUDA out-of-memory error."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Executor:
    """Runs batches for one batcher; holds no per-batch state."""

    __slots__ = ("_allowed", "_collator", "_isolate")

    def __init__(self, collator: Collator, *, isolate: bool, allowed_sizes: Sequence[int] | None) -> None:
        self._collator = collator
        self._isolate = isolate
        self._allowed = sorted(set(allowed_sizes)) if allowed_sizes else None

    def _pad(self, items: list[Any]) -> list[Any]:
        allowed = self._allowed
        if allowed is None:
            return items
        size = allowed[bisect.bisect_left(allowed, len(items))]
        return items + [items[-1]] * (size - len(items))

    def _splittable(self, error: BaseException, n: int, outcome: Outcome) -> bool:
        if n < 2:
            return False
        if is_out_of_memory(error):
            if outcome.fit is None:
                outcome.fit = 0
            _release_cached_memory()
            return True
        return self._isolate and isinstance(error, Exception)

    def _plan(self, items: list[Any], outcome: Outcome, *, top: bool) -> Generator[Any, Any, list[Any]]:
        """The splitting algorithm, written once for sync and async models.

        Yields each collated (sub-)batch for the driver to run through the model,
        and receives the model's output (or has the model's exception thrown in).
        Returns one output per item; a ``Failed`` marks an item that failed alone.
        """
        collator = self._collator
        padded = self._pad(items)
        try:
            batch = collator.collate(padded)
            outputs = collator.split((yield batch), len(padded), batch)
            if len(outputs) != len(padded):  # a custom collator's split is checked too
                raise mismatch_error(len(outputs), len(padded))
        except GeneratorExit:
            raise
        except BaseException as exc:
            if self._splittable(exc, len(items), outcome):
                outcome.splits += 1
                mid = len(items) // 2
                first = yield from self._plan(items[:mid], outcome, top=False)
                return first + (yield from self._plan(items[mid:], outcome, top=False))
            if is_out_of_memory(exc):
                outcome.lone_oom = outcome.lone_oom or len(items) == 1
            if top:
                raise
            return [Failed(error) for error in copies(_settled(exc), len(items))]
        if outcome.fit is not None:
            outcome.fit = max(outcome.fit, len(items))
        return list(outputs[: len(items)])

    def run(self, fn: Callable[[Any], Any], items: list[Any]) -> Outcome:
        """Run ``fn`` on ``items`` (splitting as needed), on this thread; never raises."""
        outcome = Outcome()
        start = time.perf_counter()
        plan = self._plan(items, outcome, top=True)
        batch: Any = None
        output: Any = None
        try:
            batch = next(plan)
            while True:
                try:
                    output = fn(batch)
                except BaseException as exc:
                    batch = plan.throw(answerable(exc))
                else:
                    batch = plan.send(output)
        except StopIteration as done:
            outcome.outputs = done.value
        except BaseException as exc:
            outcome.error = _settled(exc)
        finally:
            plan.close()
        outcome.seconds = time.perf_counter() - start
        try:
            return outcome
        finally:
            del outcome, plan, batch, output  # see _RELEASE

    def run_stream(self, fn: Callable[[Any], Any], items: list[Any], emit: Emit) -> Outcome:
        """Iterate a generator model on this thread, emitting each step's items; never raises.

        No splitting: once items have gone out, a batch cannot be retried in parts.
        """
        outcome = Outcome()
        start = time.perf_counter()
        collator = self._collator
        padded = self._pad(items)
        batch: Any = None
        steps: Any = None
        output: Any = None
        try:
            batch = collator.collate(padded)
            steps = fn(batch)
            try:
                for output in steps:
                    if not emit(_rows(collator, output, len(items), len(padded), batch)):
                        break  # every caller has gone: stop generating
            finally:
                steps.close()
        except BaseException as exc:
            outcome.error = _settled(answerable(exc))
        outcome.seconds = time.perf_counter() - start
        try:
            return outcome
        finally:
            del outcome, batch, steps, output  # see _RELEASE

    async def run_stream_async(
        self, fn: Callable[[Any], Any], items: list[Any], emit: Emit, cancel_requested: Callable[[], bool]
    ) -> Outcome:
        """``run_stream`` for an async generator model, on the event loop; a real cancellation propagates."""
        cancelled = anyio.get_cancelled_exc_class()
        outcome = Outcome()
        start = time.perf_counter()
        collator = self._collator
        padded = self._pad(items)
        batch: Any = None
        steps: Any = None
        output: Any = None
        try:
            batch = collator.collate(padded)
            steps = fn(batch)
            try:
                async for output in steps:
                    if not emit(_rows(collator, output, len(items), len(padded), batch)):
                        break
            finally:
                await steps.aclose()
        except cancelled as exc:
            if cancel_requested():
                raise
            outcome.error = _settled(_stray_cancellation(exc))
        except BaseException as exc:
            outcome.error = _settled(answerable(exc))
        outcome.seconds = time.perf_counter() - start
        try:
            return outcome
        finally:
            del outcome, batch, steps, output  # see _RELEASE

    async def run_async(
        self, fn: Callable[[Any], Awaitable[Any]], items: list[Any], cancel_requested: Callable[[], bool]
    ) -> Outcome:
        """``run`` for an async model, awaited on the event loop.

        A real cancellation (``cancel_requested()``) propagates. Any other
        exception the model raises goes to the callers, as it does for a
        synchronous model: ``BaseException`` subclasses included, and a
        ``CancelledError`` the model raised on its own (say, from awaiting a
        future that someone else cancelled).
        """
        cancelled = anyio.get_cancelled_exc_class()
        outcome = Outcome()
        start = time.perf_counter()
        plan = self._plan(items, outcome, top=True)
        batch: Any = None
        output: Any = None
        try:
            batch = next(plan)
            while True:
                try:
                    output = await fn(batch)
                except cancelled as exc:
                    if cancel_requested():
                        raise
                    batch = plan.throw(_stray_cancellation(exc))
                except BaseException as exc:
                    batch = plan.throw(answerable(exc))
                else:
                    batch = plan.send(output)
        except StopIteration as done:
            outcome.outputs = done.value
        except cancelled as exc:
            if cancel_requested():
                raise
            outcome.error = _settled(_stray_cancellation(exc))
        except BaseException as exc:
            outcome.error = _settled(exc)
        finally:
            plan.close()
        outcome.seconds = time.perf_counter() - start
        try:
            return outcome
        finally:
            del outcome, plan, batch, output  # see _RELEASE


class ModelCancelledError(RuntimeError):
    """The model raised a cancellation of its own (it was not being cancelled)."""


Emit = Callable[[list[Any]], bool]
"""Hands one step's items (one per request) on; False when no request listens any more."""


def _rows(collator: Collator, output: Any, n: int, padded: int, batch: Any) -> list[Any]:
    rows = collator.split(output, padded, batch)
    if len(rows) != padded:
        raise mismatch_error(len(rows), padded)
    return list(rows[:n])


_HERE = __file__

_RELEASE = """The frame that calls the model is linked from the model's own frame (``f_back``),
which a failed batch's traceback keeps. So those frames drop their locals before
returning, and their own entries are taken out of the traceback (``_settled``):
an error answer then leaves no reference cycle (outcome -> error -> traceback ->
frame -> outcome) for the cycle collector, and keeps no batch alive after its
callers let go of the error."""


def _settled(error: BaseException, depth: int = 0) -> BaseException:
    """``error`` with this module's frames taken out of its traceback (and its causes').

    Those frames hold the batch's ``Outcome``, which holds the error: a reference
    cycle per failed batch that only the cycle collector would free, keeping the
    batch's inputs alive until it runs. What is left starts at the model's frames.
    """
    kept = []
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != _HERE:
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    error.__traceback__ = rebuilt
    if depth < 8:
        for linked in (error.__cause__, error.__context__):
            if linked is not None:
                _settled(linked, depth + 1)
    return error


def copies(error: BaseException, n: int) -> list[BaseException]:
    """One exception object per caller, so that tracebacks (and attributes) do not pile up on one."""
    return [error] + [_twin(error) for _ in range(n - 1)]


def _twin(error: BaseException) -> BaseException:
    """A copy of ``error``: its class, ``args``, its attributes (deep-copied where they can be), its chain.

    Made without calling ``__init__``, whose signature ``copy.copy`` would have
    to guess from ``args`` (it fails for ``__init__(self, message, code)``).
    """
    kind = type(error)
    try:
        twin = kind.__new__(kind, *error.args)
        twin.args = error.args
    except Exception:
        return error  # an exception class that cannot be made this way: share it
    attributes = getattr(error, "__dict__", None)
    if attributes:
        try:
            twin.__dict__.update(copy.deepcopy(attributes))
        except Exception:
            twin.__dict__.update(attributes)
    twin.__cause__ = error.__cause__
    twin.__context__ = error.__context__
    twin.__suppress_context__ = error.__suppress_context__
    twin.__traceback__ = error.__traceback__
    return twin


def answerable(error: BaseException) -> BaseException:
    """``error``, or a ``RuntimeError`` in its place where it cannot be raised into a caller.

    ``StopIteration`` and ``StopAsyncIteration`` would end the caller's coroutine
    (asyncio refuses them on a future; PEP 479 turns them into ``RuntimeError``).
    """
    if isinstance(error, (StopIteration, StopAsyncIteration)):
        wrapped = RuntimeError(f"the model raised {type(error).__name__}")
        wrapped.__cause__ = error
        return wrapped
    return error


def _stray_cancellation(cause: BaseException) -> ModelCancelledError:
    error = ModelCancelledError(
        "the model raised CancelledError without being cancelled (did it await a task or future that "
        "something else cancelled?); its batch fails, the batcher keeps serving"
    )
    error.__cause__ = cause
    return error
