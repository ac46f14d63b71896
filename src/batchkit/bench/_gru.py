"""The step model of ``batchkit bench --scenario generate``: a GRU that generates tokens, built in code.

One step embeds each row's last token, runs a ``GRUCell`` and picks the next
token greedily from a linear head (512 hidden units, 256 tokens, fixed seeded
weights). On one CPU core a step costs about 0.13 ms for 1 row and 1.5 ms for
32: about 3x less per row when batched, the gain a batcher can harvest.

The model has both APIs the benchmark needs: the four methods of
``batchkit.StepModel`` (``start``, ``step``, ``join``, ``select``) and whole
generations built from them (``generate``: every output at the end;
``generate_steps``: a generator yielding one item per request per step,
``batchkit.END`` for the rows already done). A whole generation runs until its
longest member is done and nothing joins it. Two kinds: ``padded`` (the usual
request-level batching: a padded batch in a ``generate()`` loop; every row is
computed at every step, finished rows' outputs discarded) and not (finished rows
dropped between steps with ``select``, so the batch shrinks: cheaper per step).

Each item is ``(tag, index, token)``: the request's tag, the step number and the
token, so a caller can check it got exactly its own items, in order.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import batchkit

__all__ = ["GRU", "Item", "Prompt", "State", "draw_length"]

Item = tuple[int, int, int]
"""``(tag, index, token)``."""

MAX_LENGTH = 256
MEDIAN_LENGTH = 16
SIGMA = 1.2


def draw_length(rng: random.Random) -> int:
    """A generation length, 1 to 256 steps: lognormal, median 16, clipped (mean about 30, p99 about 250)."""
    return max(1, min(MAX_LENGTH, round(rng.lognormvariate(math.log(MEDIAN_LENGTH), SIGMA))))


@dataclass(frozen=True)
class Prompt:
    """A request: its tag (carried by every item it gets), first token and generation length."""

    tag: int
    token: int
    length: int

    def expected(self) -> list[tuple[int, int]]:
        """``(tag, index)`` of the items this request must get, in order."""
        return [(self.tag, index) for index in range(self.length)]


@dataclass
class State:
    """The running rows: hidden state and last token (tensors), and per row its tag, step and length."""

    hidden: Any
    tokens: Any
    tags: list[int]
    index: list[int]
    lengths: list[int]


class GRU:
    """The step model; counts steps, rows and the time spent stepping (thread-safe)."""

    def __init__(self, *, hidden: int = 512, vocab: int = 256, seed: int = 0) -> None:
        import torch

        self._torch = torch
        self.hidden_size = hidden
        self.vocab = vocab
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden).eval()
        self.cell = torch.nn.GRUCell(hidden, hidden).eval()
        self.head = torch.nn.Linear(hidden, vocab).eval()
        self.parameters = sum(p.numel() for m in (self.embed, self.cell, self.head) for p in m.parameters())
        self._lock = threading.Lock()
        self.steps = 0
        self.rows = 0
        self.runs: list[tuple[float, float]] = []

    # -- the StepModel API ---------------------------------------------------------------

    def start(self, inputs: list[Prompt]) -> State:
        torch = self._torch
        return State(
            hidden=torch.zeros(len(inputs), self.hidden_size),
            tokens=torch.tensor([p.token for p in inputs], dtype=torch.long),
            tags=[p.tag for p in inputs],
            index=[0] * len(inputs),
            lengths=[p.length for p in inputs],
        )

    def step(self, state: State) -> tuple[list[Item], list[bool]]:
        begin = time.perf_counter()
        with self._torch.inference_mode():
            state.hidden = self.cell(self.embed(state.tokens), state.hidden)
            state.tokens = self.head(state.hidden).argmax(dim=1)
        tokens = state.tokens.tolist()
        items = list(zip(state.tags, state.index, tokens, strict=True))
        state.index = [i + 1 for i in state.index]
        finished = [i >= n for i, n in zip(state.index, state.lengths, strict=True)]
        end = time.perf_counter()
        with self._lock:
            self.steps += 1
            self.rows += len(tokens)
            self.runs.append((begin, end))
        return items, finished

    def join(self, a: State, b: State) -> State:
        torch = self._torch
        return State(
            hidden=torch.cat([a.hidden, b.hidden]),
            tokens=torch.cat([a.tokens, b.tokens]),
            tags=a.tags + b.tags,
            index=a.index + b.index,
            lengths=a.lengths + b.lengths,
        )

    def select(self, state: State, rows: list[int]) -> State:
        keep = self._torch.tensor(rows, dtype=self._torch.long)
        return State(
            hidden=state.hidden.index_select(0, keep),
            tokens=state.tokens.index_select(0, keep),
            tags=[state.tags[i] for i in rows],
            index=[state.index[i] for i in rows],
            lengths=[state.lengths[i] for i in rows],
        )

    # -- whole generations (request-level batching) ----------------------------------------

    def generate_steps(self, prompts: list[Prompt], *, padded: bool = False) -> Iterator[list[Any]]:
        """Yield one item per prompt per step (``batchkit.END`` once a prompt is done) until all are done.

        ``padded``: keep computing finished rows (their items discarded) until the longest is done;
        otherwise drop them between steps.
        """
        state = self.start(prompts)
        if padded:
            done = [False] * len(prompts)
            while not all(done):
                items, finished = self.step(state)
                yield [batchkit.END if was else item for was, item in zip(done, items, strict=True)]
                done = [was or now for was, now in zip(done, finished, strict=True)]
            return
        positions = list(range(len(prompts)))  # the prompt of each running row
        while positions:
            items, finished = self.step(state)
            out: list[Any] = [batchkit.END] * len(prompts)
            for position, item in zip(positions, items, strict=True):
                out[position] = item
            yield out
            keep = [row for row, done in enumerate(finished) if not done]
            if len(keep) < len(positions):
                positions = [positions[row] for row in keep]
                if keep:
                    state = self.select(state, keep)

    def generate_steps_padded(self, prompts: list[Prompt]) -> Iterator[list[Any]]:
        """``generate_steps`` computing every row at every step until the longest is done."""
        yield from self.generate_steps(prompts, padded=True)

    def generate(self, prompts: list[Prompt], *, padded: bool = False) -> list[list[Item]]:
        """Every prompt's items, returned when the longest is done (``padded``: as ``generate_steps``)."""
        outputs: list[list[Item]] = [[] for _ in prompts]
        for items in self.generate_steps(prompts, padded=padded):
            for output, item in zip(outputs, items, strict=True):
                if item is not batchkit.END:
                    output.append(item)
        return outputs

    def generate_padded(self, prompts: list[Prompt]) -> list[list[Item]]:
        """``generate`` computing every row at every step until the longest is done."""
        return self.generate(prompts, padded=True)

    # -- measuring -------------------------------------------------------------------------

    def reset_counts(self) -> None:
        with self._lock:
            self.steps = self.rows = 0
            self.runs = []

    def busy(self, start: float, stop: float) -> float:
        """The share of ``[start, stop]`` spent in ``step`` (above 1 when threads step in parallel)."""
        with self._lock:
            runs = list(self.runs)
        return sum(max(0.0, min(end, stop) - max(begin, start)) for begin, end in runs) / (stop - start)

    @property
    def mean_rows(self) -> float:
        """Rows per step."""
        return self.rows / self.steps if self.steps else 0.0

    def seconds_per_step(self, rows: int, *, repeat: int = 30) -> float:
        """Median wall time of one step of ``rows`` rows (after a warm-up)."""
        state = self.start([Prompt(tag=i, token=i % self.vocab, length=MAX_LENGTH) for i in range(rows)])
        times = []
        for _ in range(repeat + 3):
            begin = time.perf_counter()
            self.step(state)
            times.append(time.perf_counter() - begin)
        self.reset_counts()
        return sorted(times[3:])[repeat // 2]
