"""Worker threads and slots: where batches run, away from the event loop.

A *slot* is one place a batch can run at a time. A synchronous model gets one
slot per replica, each with its own dedicated thread (and its own copy of the
model, when the batcher serves a module on several devices). An async model gets
``max_concurrent_batches`` slots and no threads.

Each slot owns its thread rather than borrowing a pool's: the model always runs
on the same thread (thread-local state, CUDA streams and BLAS pools stay put),
batches on one slot run strictly in order, and ``aclose()`` joins the thread so
nothing outlives the batcher. A job reports its own result back to the event
loop (see ``Worker``).

``Replicas`` lets a batch function come with one variant per slot (the copies
of a module on several devices, say); ``Batcher`` gives slot *i* ``fns[i]``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from queue import SimpleQueue
from typing import Any

__all__ = ["Replicas", "Slot", "ThreadRunner"]


class ThreadRunner:
    """A single daemon thread that runs submitted jobs one after another."""

    __slots__ = ("_jobs", "_thread")

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` to run on the worker thread after the jobs before it."""
        self._jobs.put(job)

    def stop(self, *, join: bool) -> None:
        """Let the thread exit once its queued jobs are done; optionally wait for it."""
        self._jobs.put(None)
        if join:
            self._thread.join()

    def _main(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            job()
            del job  # an idle thread must not keep its last batch (inputs, outputs) alive


class Replicas:
    """One batch function per slot; calling it calls the first."""

    __slots__ = ("__weakref__", "fns")

    def __init__(self, fns: Sequence[Callable[[Any], Any]]) -> None:
        if not fns:
            raise ValueError("Replicas needs at least one function")
        self.fns = list(fns)

    def __call__(self, batch: Any) -> Any:
        return self.fns[0](batch)


class Slot:
    """One place a batch runs: a replica of the model and its thread (None for an async model)."""

    __slots__ = ("batch", "deadline", "fn", "hung", "index", "replacements", "returned", "runner", "turn")

    def __init__(self, index: int, fn: Callable[[Any], Any], runner: ThreadRunner | None) -> None:
        self.index = index
        self.fn = fn
        self.runner = runner
        self.batch: Any = None  # the batch it runs now; a late result for any other batch is ignored
        self.deadline: float | None = None  # when the running batch counts as hung
        self.hung = False  # blocked: its call ran past run_timeout_ms and has not returned yet
        self.replacements = 0  # threads given to it after hung calls (replace_hung)
        self.turn: Any = None  # the batch holding a shared executor's turn on this slot
        self.returned: Any = None  # the last batch whose call returned on this slot's thread
