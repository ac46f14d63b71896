"""Showing the generate scenario: a rich table, the same in Markdown with the targets, and a plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._generate import BASELINE, GENERATE_FAMILIES, GenCell, write_json
from ._report import _ms

__all__ = ["COLUMNS", "LEGEND", "headline", "legend", "markdown_table", "plot", "write_generate"]


def _load(cell: GenCell) -> str:
    return f"{cell.load} !" if cell.load_unreached else cell.load


COLUMNS: list[tuple[str, Callable[[GenCell], str]]] = [
    ("variant", lambda c: c.variant),
    ("load", _load),
    ("tok/s", lambda c: f"{c.tokens_per_s:,.0f}"),
    ("req/s", lambda c: f"{c.throughput:,.0f}"),
    ("first p50", lambda c: _ms(c.first_p50_ms)),
    ("first p99", lambda c: _ms(c.first_p99_ms)),
    ("total p50", lambda c: _ms(c.p50_ms)),
    ("total p99", lambda c: _ms(c.p99_ms)),
    ("rows/step", lambda c: f"{c.mean_rows:.1f}"),
    ("busy", lambda c: f"{c.model_busy:.0%}"),
    ("lag p99", lambda c: _ms(c.lag_p99_ms)),
    ("unfinished", lambda c: str(c.unfinished + c.errors) if c.unfinished + c.errors else ""),
    ("wrong", lambda c: str(c.wrong) if c.wrong else ""),
]

LEGEND = [
    "model: a GRU generating one token per step (1 row ~0.13 ms, 32 rows ~1.5 ms per step on one core); each request "
    "asks for 1 to 256 steps (lognormal, median 16)",
    "naive-thread: one request per thread (asyncio.to_thread), no batching",
    "request-padded: request-level batching (the targets' baseline): a Batcher whose fn generates the whole batch, "
    "every row computed at every step until the longest is done (finished rows padded, outputs discarded), every "
    "output returned at the end; request: the same with finished rows dropped between steps (the batch shrinks)",
    "stream-padded, stream: a Batcher whose fn is a generator (an item per request per step, END once done), "
    "finished rows padded or dropped; ray-serve-stream: @serve.batch on an async generator (steps on a thread), "
    "finished rows dropped; all of these run a batch until its longest member is done and nothing joins it",
    "step: StepBatcher, requests join and leave the running batch between steps",
    "w=, b=: max_wait_ms and max_batch_size; closed N: N clients, each waiting for its whole answer; open R/s: "
    "Poisson arrivals at a share of request-padded's closed-loop saturation throughput, the same for every variant",
    "tok/s: items delivered per second; first: time to first item; total: time to the last item (ms, from arrival)",
    "rows/step: mean rows per model step (padded rows included); busy: share of the time the model stepped; "
    "lag p99: heartbeat lateness (ms)",
    "unfinished: requests unanswered when the drain ended (their wait counts as a lower bound); wrong: requests "
    "whose items were not exactly their own, in order",
    "!: a rate the load generator alone cannot issue on time here; those latencies measure the generator too",
]


def legend(cells: list[GenCell]) -> list[str]:
    lines = LEGEND[:-1]
    if any(c.load_unreached for c in cells):
        lines.append(LEGEND[-1])
    return lines


def _ordered(cells: list[GenCell]) -> list[GenCell]:
    order = {"closed": 0, "open": 1}
    return sorted(cells, key=lambda c: (order[c.load_kind], c.load_value, GENERATE_FAMILIES.index(c.family)))


def rich_table(cells: list[GenCell], title: str) -> Table:
    table = Table(title=title)
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("variant", "load") else "right")
    previous = None
    for cell in _ordered(cells):
        if previous is not None and cell.load != previous:
            table.add_section()
        previous = cell.load
        table.add_row(*(escape(show(cell)) for _, show in COLUMNS))
    return table


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


BASELINES = {BASELINE: "request-level batching, finished rows padded", "request": "finished rows dropped"}
"""What ``step`` is compared with: the targets' baseline (issue #13's request-level batching) first."""


def headline(cells: list[GenCell]) -> list[str]:
    """StepBatcher against request-level batching: the two targets (against ``request-padded``), measured here.

    The ratios against ``request`` (finished rows dropped, a cheaper baseline) are shown too, without a target.
    """
    step = {c.load: c for c in cells if c.family == "step"}
    lines: list[str] = []
    for family, what in BASELINES.items():
        base = {c.load: c for c in cells if c.family == family}
        target = family == BASELINE
        closed = [c for c in step.values() if c.load_kind == "closed" and c.load in base]
        if closed:
            s = max(closed, key=lambda c: c.load_value)
            r = base[s.load]
            ratio = s.tokens_per_s / r.tokens_per_s if r.tokens_per_s else float("inf")
            verdict = f" (target >= 3x: {_met(ratio >= 3.0)})" if target else " (no target: a cheaper baseline)"
            lines.append(
                f"Saturation ({s.load}): step {s.tokens_per_s:,.0f} tok/s, {family} ({what}) {r.tokens_per_s:,.0f} "
                f"tok/s: {ratio:.2f}x{verdict}; requests/s {s.throughput:,.0f} against {r.throughput:,.0f}"
            )
        opened = [c for c in step.values() if c.load_kind == "open" and c.load in base and c.load_fraction]
        if opened:
            s = min(opened, key=lambda c: abs((c.load_fraction or 0.0) - 0.8))
            r = base[s.load]
            if s.p99_ms is not None and r.p99_ms:
                ratio = s.p99_ms / r.p99_ms
                verdict = f" (target <= 0.5x at 80 %: {_met(ratio <= 0.5)})" if target else " (no target)"
                lines.append(
                    f"Open loop {s.load}: total latency p99 step {_ms(s.p99_ms)} ms, {family} {_ms(r.p99_ms)} ms: "
                    f"{ratio:.2f}x{verdict}"
                )
    return lines


def markdown_table(cells: list[GenCell]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(show(cell) for _, show in COLUMNS) + " |" for cell in _ordered(cells)]
    lines += ["", *(f"- {line}" for line in legend(cells))]
    summary = headline(cells)
    if summary:
        lines += ["", *(f"- {line}" for line in summary)]
    return "\n".join(lines) + "\n"


def plot(cells: list[GenCell], path: Path, title: str) -> None:
    """Left: tokens/s at saturation (bars); right: total latency p99 (solid) and first-item p99 (dashed) over load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=72)
    families = [f for f in GENERATE_FAMILIES if any(c.family == f for c in cells)]
    colors = {family: f"C{i}" for i, family in enumerate(families)}
    closed = [c for c in cells if c.load_kind == "closed"]
    if closed:
        top = max(c.load_value for c in closed)
        shown = [c for c in _ordered(closed) if c.load_value == top]
        bars.bar(range(len(shown)), [c.tokens_per_s for c in shown], color=[colors[c.family] for c in shown])
        bars.set_xticks(range(len(shown)), [c.family for c in shown], rotation=20, fontsize=8)
        for i, c in enumerate(shown):
            bars.text(i, c.tokens_per_s, f"{c.tokens_per_s:,.0f}", ha="center", va="bottom", fontsize=8)
        bars.set(ylabel="tokens/s", title=f"throughput, closed loop {top:g} clients")
    for family in families:
        points = sorted((c for c in cells if c.family == family and c.load_kind == "open"), key=lambda c: c.load_value)
        xs = [c.load_fraction if c.load_fraction is not None else c.load_value for c in points]
        for attr, style in (("p99_ms", "-"), ("first_p99_ms", "--")):
            ys = [getattr(c, attr) for c in points]
            if xs and all(y is not None for y in ys):
                lines.plot(
                    xs, ys, style, marker="o", ms=3, color=colors[family], label=f"{family}" if style == "-" else None
                )
    xlabel = f"offered load (share of {BASELINE}'s saturation throughput)"
    lines.set(xlabel=xlabel, ylabel="p99 ms (solid: total, dashed: first item)", yscale="log", title="open loop")
    lines.grid(True, which="both", alpha=0.3)
    if lines.get_legend_handles_labels()[0]:
        lines.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_generate(
    out: Path, meta: dict[str, Any], cells: list[GenCell], skipped: dict[str, str], console: Console
) -> None:
    machine = meta["machine"]
    title = f"gru generation on {machine['device']}, {machine['torch_threads']} torch thread(s), "
    title += f"{machine['cpu_count']} CPU(s)"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", meta, cells, skipped)
    (out / "results.md").write_text(f"{title}\n\n{markdown_table(cells)}")
    plot(cells, out / "bench.png", title)
    console.print(rich_table(cells, title))
    for line in legend(cells):
        console.print(escape(line), style="dim")
    for line in headline(cells):
        console.print(escape(line))
    console.print(f"results in {out}/ (results.json, results.md, bench.png)")
