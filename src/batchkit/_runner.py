"""Worker threads: where a synchronous model runs, away from the event loop.

Each batcher owns one dedicated thread rather than borrowing a pool's: the model
always runs on the same thread (thread-local state, CUDA streams and BLAS pools
stay put), batches run strictly in order, and ``aclose()`` can join the thread so
nothing outlives the batcher. The thread receives plain callables; a job reports
its own result back to the event loop (see ``Batcher._run_batch_sync``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue

__all__ = ["ThreadRunner"]


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

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _main(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            job()
