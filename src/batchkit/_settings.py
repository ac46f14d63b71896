"""Settings: every option of a batcher, validated once, in one immutable object.

``Settings.build`` checks the constructor's options; ``Settings.replace`` checks
a change made by ``configure`` and returns a new object, so the scheduler swaps
one reference and never sees a half-applied change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, TypedDict, cast

from ._collate import CollateArg
from ._shared import SharedExecutor

__all__ = ["DEFAULT_MAX_QUEUE_SIZE", "BatcherOptions", "ModuleBatcherOptions", "Settings", "check_ms"]

DEFAULT_MAX_QUEUE_SIZE = 10_000
"""Default bound on queued requests: enough for bursts, small enough to shed real overload."""

AUTO_SLOTS = {True: 16, False: 8}
"""With ``"auto"``: the most batches in flight an async model (True) or threads a sync one (False) may get."""


class ModuleBatcherOptions(TypedDict, total=False):
    """The ``Batcher`` options that ``Batcher.from_module`` passes on (it sets the slots itself)."""

    max_batch_size: int
    max_wait_ms: float | Literal["auto"]
    max_queue_size: int
    timeout_ms: float | None
    collate: CollateArg
    on_error: Literal["raise", "isolate"]
    run_timeout_ms: float | None
    allowed_batch_sizes: Sequence[int] | None
    max_latency_ms: float | None
    batch_cost: Callable[[Any], float] | None
    max_batch_cost: float | None
    batch_key: Callable[[Any], Hashable] | None
    executor: SharedExecutor | None
    weight: float
    dedup_key: Callable[[Any], Hashable] | None
    cache_size: int
    priority_aging_ms: float
    stream_buffer: int
    replace_hung: bool
    name: str | None


class BatcherOptions(ModuleBatcherOptions, total=False):
    """The keyword options of ``Batcher`` (see its docstring), for APIs that pass them on."""

    replicas: int | Literal["auto"]
    max_concurrent_batches: int | Literal["auto"]


def check_ms(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a float, or a ``TypeError``/``ValueError`` naming ``name``."""
    if type(value) is float and 0 < value < math.inf:  # the hot path: a per-call timeout_ms
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of milliseconds, got {type(value).__qualname__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "greater than 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        also = ' or "auto"' if name in ("replicas", "max_concurrent_batches") else ""
        raise TypeError(f"{name} must be an int{also}, got {type(value).__qualname__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__qualname__}")
    if value < 0:
        raise ValueError(f"{name} must be at least 0, got {value}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__qualname__}")
    return value


def _optional_seconds(name: str, value: float | None) -> float | None:
    return None if value is None else check_ms(name, value, allow_zero=False) / 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The validated options of one batcher (times in seconds)."""

    max_batch_size: int
    max_wait_ms: float | Literal["auto"]
    max_queue_size: int
    timeout_ms: float | None
    timeout: float | None
    max_batch_cost: float | None
    batch_cost: Callable[[Any], float] | None
    allowed_batch_sizes: tuple[int, ...] | None
    on_error: Literal["raise", "isolate"]
    run_timeout: float | None
    max_latency: float | None
    priority_aging: float
    replicas: int
    max_concurrent_batches: int
    limit: int
    """The largest batch to form: ``max_batch_size``, lowered to the largest allowed size under it."""
    slack: float
    """How soon a request without a deadline counts as due (its urgency): the default timeout, or 10 s."""
    stream_buffer: int = 1024
    """Items buffered for one streaming caller before it is cut off."""
    replace_hung: bool = False
    """After a run past run_timeout_ms: a fresh thread at once (True), or the slot waits for the call (False)."""
    batch_key: Callable[[Any], Hashable] | None = None
    """Requests whose keys differ never share a batch."""
    executor: SharedExecutor | None = None
    """Where batches take turns with other batchers' (None: this batcher's slots alone)."""
    weight: float = 1.0
    """This batcher's share of a shared executor's time, relative to the others'."""
    auto_concurrency: bool = False
    """``"auto"`` was given: batches in flight are tuned between 1 and the slots (``ConcurrencyTuner``)."""

    @property
    def slots(self) -> int:
        """Places a batch can run: threads of a synchronous model, or batches in flight of an async one."""
        return max(self.replicas, self.max_concurrent_batches)  # the other one is 1

    dedup_key: Callable[[Any], Hashable] | None = None
    """Requests with equal keys queued or running at the same time are computed once."""
    cache_size: int = 0
    """Results kept for this many dedup keys (0: no cache)."""

    @classmethod
    def build(
        cls,
        *,
        is_async: bool,
        max_batch_size: int = 32,
        max_wait_ms: float | Literal["auto"] = 2.0,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        timeout_ms: float | None = None,
        on_error: Literal["raise", "isolate"] = "raise",
        run_timeout_ms: float | None = None,
        allowed_batch_sizes: Sequence[int] | None = None,
        replicas: int | Literal["auto"] = 1,
        max_concurrent_batches: int | Literal["auto"] = 1,
        max_latency_ms: float | None = None,
        batch_cost: Callable[[Any], float] | None = None,
        max_batch_cost: float | None = None,
        priority_aging_ms: float = 1000.0,
        stream_buffer: int = 1024,
        replace_hung: bool = False,
        batch_key: Callable[[Any], Hashable] | None = None,
        executor: SharedExecutor | None = None,
        weight: float = 1.0,
        dedup_key: Callable[[Any], Hashable] | None = None,
        cache_size: int = 0,
        streams: bool = False,
    ) -> Settings:
        """Check every option (raising ``TypeError``/``ValueError`` naming the bad one).

        ``streams``: the model is a generator (one item per request per step).
        """
        if batch_cost is not None and not callable(batch_cost):
            raise TypeError("batch_cost must be a callable: input -> cost")
        if batch_key is not None and not callable(batch_key):
            raise TypeError("batch_key must be a callable: input -> hashable key")
        if executor is not None and not isinstance(executor, SharedExecutor):
            raise TypeError(f"executor must be a batchkit.SharedExecutor, got {type(executor).__qualname__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number, got {type(weight).__qualname__}")
        if not 1e-3 <= weight <= 1e3:  # shares beyond a million to one say nothing more, and overflow
            raise ValueError(f"weight must be between 0.001 and 1000, got {weight}")
        if weight != 1.0 and executor is None:
            raise ValueError("weight is a share of a shared executor: give executor= too")
        if dedup_key is not None and not callable(dedup_key):
            raise TypeError("dedup_key must be a callable: input -> hashable key")
        if _count("cache_size", cache_size) and dedup_key is None:
            raise ValueError("cache_size needs a dedup_key: the cache is keyed by it")
        if streams and dedup_key is not None:
            raise ValueError(
                "dedup_key (and cache_size) are for models that return one output per input; "
                "a generator fn streams items, which are not shared between callers"
            )
        if (batch_cost is None) != (max_batch_cost is None):
            raise ValueError("batch_cost and max_batch_cost go together")
        if on_error not in ("raise", "isolate"):
            raise ValueError(f"on_error must be 'raise' or 'isolate', got {on_error!r}")
        if is_async and replicas != 1:
            raise ValueError("replicas is for synchronous models; an async model takes max_concurrent_batches")
        if not is_async and max_concurrent_batches != 1:
            raise ValueError("max_concurrent_batches is for async models; a synchronous model takes replicas")
        auto = (max_concurrent_batches if is_async else replicas) == "auto"
        if auto:
            if is_async:
                max_concurrent_batches = AUTO_SLOTS[True]
            else:
                replicas = AUTO_SLOTS[False]
        _positive_int("replicas", replicas)
        _positive_int("max_concurrent_batches", max_concurrent_batches)
        allowed = None
        if allowed_batch_sizes is not None:
            allowed = tuple(sorted({_positive_int("allowed_batch_sizes", size) for size in allowed_batch_sizes}))
            if not allowed:
                raise ValueError("allowed_batch_sizes must name at least one size")
        base = cls(
            max_batch_size=1,
            max_wait_ms=0.0,
            max_queue_size=1,
            timeout_ms=None,
            timeout=None,
            max_batch_cost=None,
            batch_cost=batch_cost,
            allowed_batch_sizes=allowed,
            on_error=on_error,
            run_timeout=_optional_seconds("run_timeout_ms", run_timeout_ms),
            max_latency=_optional_seconds("max_latency_ms", max_latency_ms),
            priority_aging=check_ms("priority_aging_ms", priority_aging_ms, allow_zero=True) / 1000,
            replicas=cast("int", replicas),
            max_concurrent_batches=cast("int", max_concurrent_batches),
            limit=1,
            slack=10.0,
            stream_buffer=_positive_int("stream_buffer", stream_buffer),
            replace_hung=_flag("replace_hung", replace_hung),
            batch_key=batch_key,
            executor=executor,
            weight=float(weight),
            auto_concurrency=auto,
            dedup_key=dedup_key,
            cache_size=cache_size,
        )
        return base.replace(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue_size=max_queue_size,
            timeout_ms=timeout_ms,
            max_batch_cost=max_batch_cost,
        )

    def replace(
        self,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | Literal["auto"] | None = None,
        max_queue_size: int | None = None,
        timeout_ms: float | Literal[False] | None = False,
        max_batch_cost: float | None = None,
    ) -> Settings:
        """A copy with the live options changed (``None`` keeps one; ``timeout_ms=None`` removes it)."""
        size = self.max_batch_size if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
        wait = self.max_wait_ms if max_wait_ms is None else max_wait_ms
        if wait != "auto":
            wait = check_ms("max_wait_ms", wait, allow_zero=True)
        queue = self.max_queue_size if max_queue_size is None else _positive_int("max_queue_size", max_queue_size)
        if timeout_ms is False:
            timeout_ms = self.timeout_ms
        elif timeout_ms is not None:
            timeout_ms = check_ms("timeout_ms", timeout_ms, allow_zero=False)
        cost = self.max_batch_cost
        if max_batch_cost is not None:
            if self.batch_cost is None:
                raise ValueError("max_batch_cost needs a batch_cost function")
            cost = check_ms("max_batch_cost", max_batch_cost, allow_zero=False)
        limit = size
        if self.allowed_batch_sizes:
            # Padding goes up to the next allowed size: form batches no larger than the
            # largest allowed size that still fits max_batch_size, padding included.
            fitting = [s for s in self.allowed_batch_sizes if s <= size]
            if not fitting:
                raise ValueError(f"allowed_batch_sizes {self.allowed_batch_sizes} has no size <= max_batch_size={size}")
            limit = fitting[-1]
        return dataclasses.replace(
            self,
            max_batch_size=size,
            max_wait_ms=wait,
            max_queue_size=queue,
            timeout_ms=timeout_ms,
            timeout=None if timeout_ms is None else timeout_ms / 1000,
            max_batch_cost=cost,
            limit=limit,
            slack=10.0 if timeout_ms is None else timeout_ms / 1000,
        )
