"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class RecordingModel:
    """A synchronous batch function that records every batch it is given.

    ``gate`` (when set) makes each call wait until the test opens it, so a test
    can hold a batch "running" while it queues, cancels or times out others.
    """

    def __init__(self, fn: Any = None, *, gated: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[int] = set()
        self.fn = fn
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, batch: Any) -> Any:
        self.batches.append(list(batch))
        self.threads.add(threading.get_ident())
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        return self.fn(batch) if self.fn is not None else batch

    @property
    def seen(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("batchkit")]
    assert not leaked, f"leaked threads: {leaked}"
