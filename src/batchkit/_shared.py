"""A shared executor: several batchers, one device, at most N batches at a time, in fair turns.

Each batcher keeps its own queue, options, worker and threads. Before its worker
starts a batch it asks the executor for a *turn*; the executor grants at most
``max_concurrent_batches`` turns at once across all its batchers, and when a turn
comes free it picks who goes next:

* **urgency first, within a round**: a waiting batcher whose batch would miss
  its earliest deadline if it let the longest batch of another waiting batcher
  run first goes now (earliest deadline first among such batchers), unless it
  is ahead of the least-served batcher by more than that batch: an overloaded
  batcher with deadlines cannot take more than its share by being urgent;
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
any more; a worker that is gone, or whose loop is not running, cannot take it,
and it goes to the next in line. A turn belongs to a run: it comes back when the
run ends, even if its worker stopped meanwhile (see ``Worker``).
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
    """Per open batcher (by name; batchers of one name add up): seconds its batches held a turn."""
    batches: Mapping[str, int]
    """Per open batcher (by name): batches it ran."""


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
        self._promised = 0  # turns promised to a seat that has not taken them yet
        self._waiting: list[Lease] = []
        self._leases: list[Lease] = []
        self._vclock = 0.0  # the virtual time of the latest batcher to get a turn

    def __repr__(self) -> str:
        return f"SharedExecutor(max_concurrent_batches={self.max_concurrent_batches}, name={self.name!r})"

    def __copy__(self) -> SharedExecutor:
        return self  # a shared resource, like the device it stands for: copies share it

    def __deepcopy__(self, memo: dict[int, object]) -> SharedExecutor:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SharedExecutor belongs to one process and cannot be pickled")

    def join(self, name: str, weight: float, wake: Callable[[], bool]) -> Lease:
        """A seat for one batcher's worker.

        ``wake()`` is called (from any thread) when a turn is promised to the
        seat; it returns False when its worker cannot take it now (gone, or its
        loop not running), and the turn goes to the next in line.
        """
        lease = Lease(self, name, weight, wake)
        with self._lock:
            self._leases.append(lease)
        return lease

    def stats(self) -> SharedExecutorStats:
        """A snapshot; safe from any thread. Batchers that have stopped no longer count."""
        with self._lock:
            seconds: dict[str, float] = {}
            batches: dict[str, int] = {}
            for lease in self._leases:
                seconds[lease.name] = seconds.get(lease.name, 0.0) + lease.device_seconds
                batches[lease.name] = batches.get(lease.name, 0) + lease.batches
            return SharedExecutorStats(
                max_concurrent_batches=self.max_concurrent_batches,
                running=self.max_concurrent_batches - self._free - self._promised,
                waiting=len(self._waiting),
                device_seconds=seconds,
                batches=batches,
            )

    # -- turns (called through Lease, under no lock) -------------------------------

    def _acquire(self, lease: Lease, deadline: float, expected: float, now: float) -> bool:
        with self._lock:
            if lease.promised:
                lease.promised -= 1
                self._promised -= 1
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
                lease.device_seconds += seconds
                lease.batches += 1
            if wants is not None and not lease.waiting and not lease.gone:  # it competes for this turn too
                lease.vtime = max(lease.vtime, self._vclock)
                lease.waiting = True
                (lease.deadline, lease.expected), lease.since = wants, now
                self._waiting.append(lease)
            chosen = self._pass_on(now)
        self._deliver(chosen, now)

    def _withdraw(self, lease: Lease, now: float, *, leave: bool = False) -> None:
        """``lease`` no longer wants a turn: out of the line; a turn promised to it goes to the next."""
        chosen: list[Lease] = []
        with self._lock:
            if leave and not lease.gone:
                lease.gone = True
                self._leases.remove(lease)
            if lease.waiting:
                lease.waiting = False
                self._waiting.remove(lease)
            while lease.promised:
                lease.promised -= 1
                self._promised -= 1
                next_lease = self._pass_on(now)
                if next_lease is not None:
                    chosen.append(next_lease)
        for next_lease in chosen:
            self._deliver(next_lease, now)

    def _pass_on(self, now: float) -> Lease | None:
        """A turn came free (under the lock): promise it to the next in line, or keep it free."""
        if not self._waiting:
            self._free += 1
            return None
        chosen = self._next(now)
        self._waiting.remove(chosen)
        chosen.waiting = False
        chosen.promised += 1
        self._promised += 1
        return chosen

    def _deliver(self, lease: Lease | None, now: float) -> None:
        """Tell ``lease`` (outside the lock) that a turn is promised to it; if it cannot take it, pass it on."""
        if lease is not None and not lease.wake():
            self._withdraw(lease, now)

    def _next(self, now: float) -> Lease:
        """Who goes next: an urgent batcher not ahead of its share, else the least served for its weight.

        A batcher is urgent when its batch would miss its deadline behind the
        longest batch another waiting batcher might run first. It may jump the
        line only while its virtual time is within that same length of the
        least-served one's: so urgency reorders turns within a round, but an
        overloaded batcher with deadlines (always urgent) cannot take more than
        its share from batchers without them.
        """
        waiting = self._waiting
        if len(waiting) == 1:
            return waiting[0]
        least = min(lease.vtime for lease in waiting)
        urgent: Lease | None = None
        for lease in waiting:
            horizon = max(other.expected for other in waiting if other is not lease)
            in_time = lease.deadline - now - lease.expected > horizon
            if not in_time and lease.vtime - least <= horizon and (urgent is None or lease.deadline < urgent.deadline):
                urgent = lease
        if urgent is not None:
            return urgent
        return min(waiting, key=lambda lease: (lease.vtime, lease.since))


class Lease:
    """One batcher's seat at a ``SharedExecutor``: asks for turns and gives them back."""

    __slots__ = (
        "batches",
        "deadline",
        "device_seconds",
        "executor",
        "expected",
        "gone",
        "held",
        "name",
        "promised",
        "since",
        "vtime",
        "waiting",
        "wake",
        "weight",
    )

    def __init__(self, executor: SharedExecutor, name: str, weight: float, wake: Callable[[], bool]) -> None:
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
        self.device_seconds = 0.0  # for stats()
        self.batches = 0
        self.gone = False  # its worker stopped: it takes no more turns (those it holds come back on release)

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
        """The worker stopped: out of the line, promised turns passed on (each held turn comes back
        through ``release`` when its run ends)."""
        self.executor._withdraw(self, now, leave=True)
