"""Showing results: a rich table, the same as Markdown, and a throughput/latency plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._results import Cell

__all__ = ["COLUMNS", "headline", "markdown_table", "plot", "print_table", "rich_table"]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


COLUMNS: list[tuple[str, Callable[[Cell], str]]] = [
    ("variant", lambda c: c.variant),
    ("load", lambda c: c.load),
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
    summary = headline(cells)
    if summary:
        lines += ["", summary[0], "", *(f"- {line.strip()}" for line in summary[1:])]
    return "\n".join(lines) + "\n"


def print_table(cells: list[Cell], title: str, console: Console) -> None:
    console.print(rich_table(cells, title))
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
        lines.append(f"  naive-inline: loop lag p99 {_ms(inline.lag_p99_ms)} ms, max {_ms(inline.lag_max_ms)} ms")
    return lines


def _curve(cells: list[Cell], variant: str, kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    """Points of one variant under one kind of load, in load order (concurrency or rate)."""
    points = sorted(
        (c.load_value, getattr(c, x), getattr(c, y))
        for c in cells
        if c.variant == variant and c.load_kind == kind and getattr(c, y) is not None
    )
    return [p[1] for p in points], [p[2] for p in points]


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """Throughput against p99 latency (closed and open loop), and loop lag against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), dpi=72)
    variants = list(dict.fromkeys(c.variant for c in cells if c.load_kind != "offline"))
    colors = {variant: f"C{i % 10}" for i, variant in enumerate(variants)}
    ceilings = [c for c in cells if c.load_kind == "offline"]
    styles: list[Any] = ["--", ":", "-."]
    for ax, kind in zip(axes[:2], ("closed", "open"), strict=True):
        for variant in variants:
            ax.plot(*_curve(cells, variant, kind, "throughput", "p99_ms"), "o-", ms=3, color=colors[variant])
        for i, ceiling in enumerate(ceilings):
            ax.axvline(ceiling.throughput, color="grey", linestyle=styles[i % 3], linewidth=1)
        ax.set(xlabel="throughput (requests/s)", ylabel="p99 latency (ms)", yscale="log", title=f"{kind} loop")
    for variant in variants:
        axes[2].plot(*_curve(cells, variant, "closed", "load_value", "lag_p99_ms"), "o-", ms=3, color=colors[variant])
    axes[2].set(xlabel="concurrency", ylabel="heartbeat lag p99 (ms)", xscale="log", yscale="log")
    axes[2].set_title("event-loop lag, closed loop")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[v], marker="o", ms=3) for v in variants]
    handles += [Line2D([], [], color="grey", linestyle=styles[i % 3]) for i in range(len(ceilings))]
    labels = variants + [c.variant for c in ceilings]
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.16 + 0.04 * (len(labels) // 6), wspace=0.3)
    fig.savefig(path)
    plt.close(fig)
