"""A shared executor: several batchers, one device, at most N batches at a time, in fair turns.

Each batcher keeps its own queue, options, worker and threads. Before its worker
starts a batch it asks the executor for a *turn*; the executor grants at most
``max_concurrent_batches`` turns at once across all its batchers, and when a turn
comes free it picks who goes next:

* **urgency first**: a waiting batcher whose batch would miss its earliest
  deadline if it let the longest of the other waiting batches run first goes
  now (earliest deadline first among such batchers);
* **otherwise by weight**: the batcher that has had the least device time for
  its weight goes (start-time fair queuing: each batcher's *virtual time*
  advances by ``seconds / weight`` per batch it ran; a batcher back from idle
  starts at the current virtual time, so idling banks no credit).

So a light model never waits behind more than the batches already running,
however heavily another model is loaded, and two saturated models share the
device in proportion to their weights.

The executor is thread-safe: batchers on different event loops may share it.
A turn is handed to a waiting worker by waking its loop (``call_soon_threadsafe``);
the worker takes the turn on its loop, or passes it on if nothing is due there
any more.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Lease", "SharedExecutor", "SharedExecutorStats"]


@dataclass(frozen=True)
class SharedExecutorStats:
    """A snapshot of a ``SharedExecutor``."""

    max_concurrent_batches: int
    running: int
    """Turns held now (batches running)."""
    waiting: int
    """Batchers with a batch due, waiting for a turn."""
    device_seconds: Mapping[str, float]
    """Per batcher (by name): seconds its batches held a turn."""
    batches: Mapping[str, int]
    """Per batcher (by name): batches it ran."""


class SharedExecutor:
    """Runs the batches of several batchers at most ``max_concurrent_batches`` at a time, in fair turns.

    ```python
    gpu = batchkit.SharedExecutor(max_concurrent_batches=1)
    embed = batchkit.Batcher(embed_fn, executor=gpu)             # light, latency-sensitive
    rerank = batchkit.Batcher(rerank_fn, executor=gpu, weight=2)  # heavy, twice the device share
    ```

    Share one executor among the batchers that use one device (a GPU, or the
    CPU's cores) so that they take turns instead of running their batches on
    top of each other. See the module documentation for the rule that picks the
    next batcher. Batchers keep their own queue, options and ``stats()``; the
    executor's ``stats()`` shows how the device time was shared.
    """

    def __init__(self, max_concurrent_batches: int = 1, *, name: str = "shared") -> None:
        if isinstance(max_concurrent_batches, bool) or not isinstance(max_concurrent_batches, int):
            raise TypeError(f"max_concurrent_batches must be an int, got {type(max_concurrent_batches).__qualname__}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be at least 1, got {max_concurrent_batches}")
        self.max_concurrent_batches = max_concurrent_batches
        self.name = name
        self._lock = threading.Lock()
        self._free = max_concurrent_batches  # turns neither held nor promised to a waiter
        self._waiting: list[Lease] = []
        self._leases: list[Lease] = []
        self._vclock = 0.0  # the virtual time of the latest batcher to get a turn
        self._device_seconds: dict[str, float] = {}
        self._batches: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SharedExecutor(max_concurrent_batches={self.max_concurrent_batches}, name={self.name!r})"

    def __copy__(self) -> SharedExecutor:
        return self  # a shared resource, like the device it stands for: copies share it

    def __deepcopy__(self, memo: dict[int, object]) -> SharedExecutor:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SharedExecutor belongs to one process and cannot be pickled")

    def join(self, name: str, weight: float, wake: Callable[[], None]) -> Lease:
        """A seat for one batcher's worker; ``wake()`` (from any thread) makes it look for a turn."""
        lease = Lease(self, name, weight, wake)
        with self._lock:
            self._leases.append(lease)
        return lease

    def stats(self) -> SharedExecutorStats:
        """A snapshot; safe from any thread."""
        with self._lock:
            held = sum(lease.held for lease in self._leases)
            return SharedExecutorStats(
                max_concurrent_batches=self.max_concurrent_batches,
                running=held,
                waiting=len(self._waiting),
                device_seconds=dict(self._device_seconds),
                batches=dict(self._batches),
            )

    # -- turns (called through Lease, under no lock) -------------------------------

    def _acquire(self, lease: Lease, deadline: float, expected: float, now: float) -> bool:
        with self._lock:
            if lease.promised:
                lease.promised -= 1
                self._grant(lease)
                return True
            if lease.waiting:
                lease.deadline, lease.expected = deadline, expected  # stay in line, with fresh urgency
                return False
            lease.vtime = max(lease.vtime, self._vclock)  # back from idle: no banked credit
            if self._free:
                self._free -= 1
                self._grant(lease)
                return True
            lease.waiting = True
            lease.deadline, lease.expected, lease.since = deadline, expected, now
            self._waiting.append(lease)
            return False

    def _grant(self, lease: Lease) -> None:
        lease.held += 1
        self._vclock = max(self._vclock, lease.vtime)

    def _release(
        self, lease: Lease, seconds: float, now: float, *, ran: bool, wants: tuple[float, float] | None
    ) -> None:
        with self._lock:
            lease.held -= 1
            if ran:
                lease.vtime += seconds / lease.weight
                self._device_seconds[lease.name] = self._device_seconds.get(lease.name, 0.0) + seconds
                self._batches[lease.name] = self._batches.get(lease.name, 0) + 1
            if wants is not None and not lease.waiting:  # it has more to run: it competes for this turn too
                lease.vtime = max(lease.vtime, self._vclock)
                lease.waiting = True
                (lease.deadline, lease.expected), lease.since = wants, now
                self._waiting.append(lease)
            wake = self._pass_on(now)
        if wake is not None:
            wake()

    def _withdraw(self, lease: Lease, now: float) -> None:
        """``lease`` no longer wants a turn: leave the line; a turn promised to it goes to the next."""
        wakes: list[Callable[[], None]] = []
        with self._lock:
            if lease.waiting:
                lease.waiting = False
                self._waiting.remove(lease)
            while lease.promised:
                lease.promised -= 1
                wake = self._pass_on(now)
                if wake is not None:
                    wakes.append(wake)
        for wake in wakes:
            wake()

    def _leave(self, lease: Lease, now: float) -> None:
        """``lease``'s worker stopped: give back its turns and its place."""
        self._withdraw(lease, now)
        wakes: list[Callable[[], None]] = []
        with self._lock:
            while lease.held:
                lease.held -= 1
                wake = self._pass_on(now)
                if wake is not None:
                    wakes.append(wake)
            if lease in self._leases:
                self._leases.remove(lease)
        for wake in wakes:
            wake()

    def _pass_on(self, now: float) -> Callable[[], None] | None:
        """A turn came free (under the lock): promise it to the next waiter, or keep it free."""
        if not self._waiting:
            self._free += 1
            return None
        chosen = self._next(now)
        self._waiting.remove(chosen)
        chosen.waiting = False
        chosen.promised += 1
        return chosen.wake

    def _next(self, now: float) -> Lease:
        waiting = self._waiting
        horizon = max(lease.expected for lease in waiting)  # the longest another might hold the turn
        urgent = [lease for lease in waiting if lease.deadline - now - lease.expected <= horizon]
        if urgent:
            return min(urgent, key=lambda lease: lease.deadline)
        return min(waiting, key=lambda lease: (lease.vtime, lease.since))


class Lease:
    """One batcher's seat at a ``SharedExecutor``: asks for turns and gives them back."""

    __slots__ = (
        "deadline",
        "executor",
        "expected",
        "held",
        "name",
        "promised",
        "since",
        "vtime",
        "waiting",
        "wake",
        "weight",
    )

    def __init__(self, executor: SharedExecutor, name: str, weight: float, wake: Callable[[], None]) -> None:
        self.executor = executor
        self.name = name
        self.weight = weight
        self.wake = wake
        self.vtime = 0.0
        self.held = 0  # turns held by running batches
        self.promised = 0  # turns handed to this seat that its worker has not taken yet
        self.waiting = False
        self.deadline = math.inf  # the earliest deadline of the batch it waits to run
        self.expected = 0.0  # that batch's expected run time
        self.since = 0.0

    def acquire(self, deadline: float, expected: float, now: float) -> bool:
        """Take a turn now (True), or wait in line to be woken (False)."""
        return self.executor._acquire(self, deadline, expected, now)

    def release(
        self, seconds: float, now: float, *, ran: bool = True, wants: tuple[float, float] | None = None
    ) -> None:
        """A batch that held a turn for ``seconds`` ended (``ran=False``: the turn went unused).

        ``wants``: the deadline and expected run time of the next batch this
        seat has due, so that it competes for the turn it gives back (else a
        seat that just ran would always lose it to one that waits, whatever the
        weights).
        """
        self.executor._release(self, seconds, now, ran=ran, wants=wants)

    def withdraw(self, now: float) -> None:
        """Nothing is due any more: stop waiting, pass on a promised turn."""
        if self.waiting or self.promised:
            self.executor._withdraw(self, now)

    def leave(self, now: float) -> None:
        """The worker stopped: give everything back."""
        self.executor._leave(self, now)
