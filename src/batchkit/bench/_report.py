"""Showing results: a rich table, the same as Markdown, and a throughput/latency plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._results import Cell

__all__ = ["COLUMNS", "LEGEND", "headline", "legend", "markdown_table", "plot", "print_table", "rich_table"]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _variant(cell: Cell) -> str:
    return f"{cell.variant} *" if cell.blocks_loop else cell.variant


def _load(cell: Cell) -> str:
    return f"{cell.load} !" if cell.load_unreached else cell.load


COLUMNS: list[tuple[str, Callable[[Cell], str]]] = [
    ("variant", _variant),
    ("load", _load),
    ("req/s", lambda c: f"{c.throughput:,.0f}"),
    ("p50 ms", lambda c: _ms(c.p50_ms)),
    ("p95 ms", lambda c: _ms(c.p95_ms)),
    ("p99 ms", lambda c: _ms(c.p99_ms)),
    ("batch", lambda c: f"{c.mean_batch_size:.1f}"),
    ("busy", lambda c: f"{c.model_busy:.0%}"),
    ("lag p99 ms", lambda c: _ms(c.lag_p99_ms)),
    ("lag max ms", lambda c: _ms(c.lag_max_ms)),
    ("unfinished", lambda c: str(c.unfinished + c.errors) if c.unfinished + c.errors else ""),
]

LEGEND = [
    "naive-inline: the model called in the coroutine; naive-thread: one thread per call (asyncio.to_thread)",
    "floor: a minimal batcher written for the benchmark, at the reference setting: the least overhead batching has",
    "offline-ideal: full batches back to back, no event loop, no callers: the throughput ceiling",
    "w=, b=: max_wait_ms and max_batch_size; closed N: N clients, each waiting for its answer; "
    "open R/s: Poisson arrivals (share of offline-ideal)",
    "batch: mean batch size; busy: share of the time the model ran (above 100 % when threads run it in parallel)",
    "lag: how late a 1 ms heartbeat on the event loop woke, that is how long any other coroutine waited",
    "unfinished: requests unanswered when the drain ended, cancelled (their wait counts as a lower bound)",
    "*: loop lag p99 above the variant's own p50 latency: it blocks the event loop, so its latency hides the cost",
    "!: a rate the load generator alone cannot issue on time here; those latencies measure the generator too",
]


def legend(cells: list[Cell]) -> list[str]:
    """The legend lines that apply to ``cells`` (the markers only when some row carries them)."""
    lines = LEGEND[:-2]
    if any(c.blocks_loop for c in cells):
        lines.append(LEGEND[-2])
    if any(c.load_unreached for c in cells):
        lines.append(LEGEND[-1])
    return lines


def _by_load(cells: list[Cell]) -> list[Cell]:
    order = {"offline": 0, "closed": 1, "open": 2}
    return sorted(cells, key=lambda c: (order[c.load_kind], c.load_value))


def rich_table(cells: list[Cell], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("variant", "load") else "right")
    previous = None
    for cell in _by_load(cells):
        if previous is not None and cell.load != previous:
            table.add_section()
        previous = cell.load
        table.add_row(*(escape(show(cell)) for _, show in COLUMNS))
    return table


def markdown_table(cells: list[Cell]) -> str:
    """The table in Markdown, then the headline ratios."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(show(cell) for _, show in COLUMNS) + " |" for cell in _by_load(cells)]
    lines += ["", *(f"- {line}" for line in legend(cells))]
    summary = headline(cells)
    if summary:
        lines += ["", summary[0], "", *(f"- {line.strip()}" for line in summary[1:])]
    return "\n".join(lines) + "\n"


def print_table(cells: list[Cell], title: str, console: Console) -> None:
    console.print(rich_table(cells, title))
    for line in legend(cells):
        console.print(escape(line), style="dim")
    for line in headline(cells):
        console.print(escape(line))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def headline(cells: list[Cell]) -> list[str]:
    """The ratios that matter, at the heaviest closed-loop load measured (all from this run)."""
    closed = [c for c in cells if c.load_kind == "closed"]
    if not closed:
        return []
    top = max(c.load_value for c in closed)
    at_top = {c.variant: c for c in closed if c.load_value == top}
    offline = {c.max_batch_size: c.throughput for c in cells if c.load_kind == "offline"}
    inline, thread = at_top.get("naive-inline"), at_top.get("naive-thread")
    lines = [f"At saturation (closed loop, {top:g} clients):"]
    for cell in at_top.values():
        if cell.family != "batchkit":
            continue
        parts = [f"{cell.throughput:,.0f} req/s"]
        ideal = offline.get(cell.max_batch_size)
        if ideal is not None:
            parts.append(f"{_ratio(cell.throughput, ideal)} of offline-ideal")
        if inline is not None:
            parts.append(f"{_ratio(cell.throughput, inline.throughput)} naive-inline")
        if thread is not None:
            parts.append(f"{_ratio(cell.throughput, thread.throughput)} naive-thread")
        parts.append(f"loop lag p99 {_ms(cell.lag_p99_ms)} ms")
        lines.append(f"  {cell.variant}: " + ", ".join(parts))
    if len(lines) == 1:
        return []
    if inline is not None:
        line = f"  naive-inline: loop lag p99 {_ms(inline.lag_p99_ms)} ms, max {_ms(inline.lag_max_ms)} ms"
        if inline.blocks_loop:
            line += f" (its own p50 of {_ms(inline.p50_ms)} ms is low because it blocks everything else)"
        lines.append(line)
    return lines


def _curve(cells: list[Cell], variant: str, kind: str, x: str, y: str) -> list[tuple[float, float, Cell]]:
    """Points ``(x, y, cell)`` of one variant under one kind of load, in load order (concurrency or rate)."""
    chosen = [c for c in cells if c.variant == variant and c.load_kind == kind and getattr(c, y) is not None]
    return [(getattr(c, x), getattr(c, y), c) for c in sorted(chosen, key=lambda c: c.load_value)]


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """Closed loop: throughput against p99 latency; open loop: p99 latency over the offered load; loop lag.

    Concurrency is written at both ends of each closed-loop line, the offline
    ceilings are labelled, and a point whose loop lag p99 exceeds its own p50
    latency (a variant blocking the loop) is crossed out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(14, 5.2), dpi=72)
    variants = list(dict.fromkeys(c.variant for c in cells if c.load_kind != "offline"))
    colors = {variant: f"C{i % 10}" for i, variant in enumerate(variants)}
    ceilings = [c for c in cells if c.load_kind == "offline"]
    styles: list[Any] = ["--", ":", "-."]
    panels = [
        (axes[0], "closed", "throughput", "p99_ms", "closed loop (numbers: concurrency)", "throughput (requests/s)"),
        (axes[1], "open", "load_value", "p99_ms", "open loop", "offered load (requests/s)"),
        (axes[2], "closed", "load_value", "lag_p99_ms", "event-loop lag, closed loop", "concurrency"),
    ]
    blocked = False
    for ax, kind, x, y, name, xlabel in panels:
        for variant in variants:
            points = _curve(cells, variant, kind, x, y)
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, "o-", ms=3, color=colors[variant])
            crossed = [(px, py) for px, py, cell in points if cell.blocks_loop]
            if crossed and y != "lag_p99_ms":
                blocked = True
                ax.plot(*zip(*crossed, strict=True), "x", ms=9, mew=2, color="black", zorder=3)
            if name.startswith("closed"):
                for px, py, cell in (points[0], points[-1]) if len(points) > 1 else points[:1]:
                    ax.annotate(f"{cell.load_value:g}", (px, py), xytext=(3, 3), textcoords="offset points", fontsize=7)
        if x != "lag_p99_ms" and kind in ("closed", "open") and y == "p99_ms":
            for i, ceiling in enumerate(ceilings):
                ax.axvline(ceiling.throughput, color="grey", linestyle=styles[i % 3], linewidth=1)
                label = f"{ceiling.variant}: {ceiling.throughput:,.0f}/s"
                ax.text(ceiling.throughput, 0.98, label, transform=ax.get_xaxis_transform(), rotation=90,
                        ha="right", va="top", fontsize=7, color="dimgrey")  # fmt: skip
        if kind == "open":
            for rate in sorted({c.load_value for c in cells if c.load_kind == "open" and c.load_unreached}):
                ax.axvline(rate, color="red", linestyle=":", linewidth=1)
                ax.text(rate, 0.02, "beyond the load generator", transform=ax.get_xaxis_transform(), rotation=90,
                        ha="left", va="bottom", fontsize=7, color="red")  # fmt: skip
        ylabel = "heartbeat lag p99 (ms)" if y == "lag_p99_ms" else "p99 latency (ms)"
        ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log", title=name)
        if x == "load_value" and kind == "closed":
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[v], marker="o", ms=3) for v in variants]
    handles += [Line2D([], [], color="grey", linestyle=styles[i % 3]) for i in range(len(ceilings))]
    labels = variants + [f"{c.variant} (ceiling)" for c in ceilings]
    if blocked:
        handles.append(Line2D([], [], color="black", marker="x", ms=8, mew=2, linestyle=""))
        labels.append("loop lag p99 > own p50: blocks the event loop (see right panel)")
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = -(-len(labels) // 4)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.12 + 0.035 * rows, wspace=0.28)
    fig.savefig(path)
    plt.close(fig)
