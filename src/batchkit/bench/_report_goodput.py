"""Showing the goodput scenario: a rich table, Markdown with the targets, CSV, JSON and a plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._goodput import GoodputCell, Reference
from ._model import Model
from ._report import _ms
from ._results import machine_info

if TYPE_CHECKING:
    from ._goodput import GoodputPlan

__all__ = ["COLUMNS", "LEGEND", "headline", "legend", "markdown_table", "plot", "write_goodput"]

OVERLOAD_TARGET = 0.9
"""Issue #14: under overload, requests answered within their deadline >= 0.9x capacity."""
P99_TARGET = 1.1
"""Issue #14: the adaptive wait's p99 within 10 % of the best fixed wait's, below saturation."""


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _load(cell: GoodputCell) -> str:
    return f"{cell.load} !" if cell.load_unreached else cell.load


def _other(cell: GoodputCell) -> str:
    count = cell.errors + cell.wrong + cell.unanswered
    return str(count) if count else ""


COLUMNS: list[tuple[str, Callable[[GoodputCell], str]]] = [
    ("variant", lambda c: c.variant),
    ("load", _load),
    ("offered/s", lambda c: f"{c.offered_rps:,.0f}"),
    ("goodput/s", lambda c: f"{c.goodput_rps:,.0f}"),
    ("of optimum", lambda c: _share(c.of_optimum)),
    ("of capacity", lambda c: _share(c.of_capacity)),
    ("late", lambda c: str(c.late) if c.late else ""),
    ("refused", lambda c: str(c.refused) if c.refused else ""),
    ("timed out", lambda c: str(c.timed_out) if c.timed_out else ""),
    ("other", _other),
    ("p50 ms", lambda c: _ms(c.p50_ms)),
    ("p99 ms", lambda c: _ms(c.p99_ms)),
    ("batch", lambda c: f"{c.mean_batch_size:.1f}"),
    ("busy", lambda c: f"{c.model_busy:.0%}"),
    ("speed", lambda c: "-" if c.model_speed is None else f"{c.model_speed:.2f}"),
    ("lag p99", lambda c: _ms(c.lag_p99_ms)),
]

LEGEND = [
    "optimum (exact): the most requests a scheduler knowing every arrival in advance could answer within their "
    "deadlines, one batch at a time, on the measured cost curve (no event loop, no callers); every variant replays "
    "the same trace; optimum at Sx speed: the same with every batch 1/S times as long, S the median speed the model "
    "ran at in that trace's cells (what the machine, as it ran, allowed)",
    "goodput: requests answered correctly within their deadline, per second; of optimum: goodput / the optimum's; "
    "of capacity: goodput / the model's capacity (requests/s at its best batch size)",
    "poisson P%: Poisson arrivals at P % of capacity; bursty P%: on/off, twice that rate for half of each period and "
    "none for the other half (same mean)",
    "batchkit: Batcher(model, max_wait_ms=w, max_batch_size=b), not told the deadline; batchkit-deadline: the same, "
    "each predict(x, timeout_ms=<time left to its deadline>); floor and peers: at the reference setting, not told "
    "the deadline (none of them takes one)",
    "late: answered after the deadline; refused: QueueFullError; timed out: RequestTimeoutError (given up at or "
    "before the deadline); other: errors, wrong answers, and requests unanswered when the run ended",
    "p50/p99: latency of the answered requests (late ones included), from the planned arrival; batch: mean batch "
    "size; busy: share of the trace the model ran; speed: the model's speed against its cost curve (below 1: it ran "
    "slower than when measured alone, which the optimum assumes); lag p99: event-loop heartbeat lateness (ms)",
    "!: a pattern whose peak rate the load generator alone cannot issue on time here",
]


def legend(cells: list[GoodputCell]) -> list[str]:
    lines = LEGEND[:-1]
    if any(c.load_unreached for c in cells):
        lines.append(LEGEND[-1])
    return lines


def _optimum_rows(ref: Reference, capacity: float, unreached: bool) -> list[list[str]]:
    load = f"{ref.load} !" if unreached else ref.load
    row = ["optimum (exact)", load, f"{ref.offered_rps:,.0f}", f"{ref.optimum_rps:,.0f}"]
    row += ["100%" if ref.optimum else "-", _share(ref.optimum_rps / capacity)]
    rows = [row + [""] * (len(COLUMNS) - len(row))]
    if ref.speed is not None and ref.optimum_at_speed_rps is not None:
        share = ref.optimum_at_speed_rps / ref.optimum_rps if ref.optimum_rps else None
        slow = [
            f"optimum at {ref.speed:.2f}x speed",
            load,
            f"{ref.offered_rps:,.0f}",
            f"{ref.optimum_at_speed_rps:,.0f}",
        ]
        slow += [_share(share), _share(ref.optimum_at_speed_rps / capacity)]
        slow += [""] * (len(COLUMNS) - len(slow) - 2) + [f"{ref.speed:.2f}", ""]
        rows.append(slow)
    return rows


def _groups(
    cells: list[GoodputCell], references: list[Reference], capacity: float
) -> list[tuple[list[list[str]], list[list[str]]]]:
    """Per trace: the optimum's rows, then each variant's, in the order measured."""
    groups = []
    for ref in references:
        mine = [c for c in cells if c.load == ref.load]
        unreached = any(c.load_unreached for c in mine)
        rows = [[show(c) for _, show in COLUMNS] for c in mine]
        groups.append((_optimum_rows(ref, capacity, unreached), rows))
    return groups


def rich_table(cells: list[GoodputCell], references: list[Reference], capacity: float, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for name, _ in COLUMNS:
        left = name in ("variant", "load")
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for index, (best, rows) in enumerate(_groups(cells, references, capacity)):
        if index:
            table.add_section()
        for row in best:
            table.add_row(*(escape(text) for text in row), style="bold")
        for row in rows:
            table.add_row(*(escape(text) for text in row))
    return table


def markdown_table(cells: list[GoodputCell], references: list[Reference], capacity: float) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for best, rows in _groups(cells, references, capacity):
        lines += ["| " + " | ".join(f"**{text}**" if text else "" for text in row) + " |" for row in best]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"- {line}" for line in legend(cells))]
    summary = headline(cells, references, capacity)
    if summary:
        lines += ["", *(f"- {line}" for line in summary)]
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def headline(cells: list[GoodputCell], references: list[Reference], capacity: float) -> list[str]:
    """The issue's two targets, from this run: goodput under overload, and the adaptive wait's p99 below it."""
    lines = []
    for ref in references:
        if ref.load_fraction <= 1.0 + 1e-9:
            continue
        reachable = ref.optimum_rps / capacity
        slowed = ""
        if ref.speed is not None and ref.optimum_at_speed_rps is not None:
            slowed = f"; at the {ref.speed:.2f}x speed the model ran at, the optimum is "
            slowed += f"{ref.optimum_at_speed_rps / capacity:.2f}x capacity"
        for cell in cells:
            if cell.load != ref.load or not cell.family.startswith("batchkit"):
                continue
            verdict = f"target >= {OVERLOAD_TARGET:g}x: {_met(cell.of_capacity >= OVERLOAD_TARGET)}"
            if reachable < OVERLOAD_TARGET:
                verdict += f"; out of reach on this trace, where the optimum is {reachable:.2f}x"
            lines.append(
                f"{ref.load}: {cell.variant} answered {cell.goodput_rps:,.0f}/s in time, {cell.of_capacity:.2f}x "
                f"capacity ({verdict}), {_share(cell.of_optimum)} of the optimum{slowed}"
            )
    for ref in references:
        if ref.load_fraction > 0.9 + 1e-9:
            continue
        for family in ("batchkit", "batchkit-deadline"):
            mine = [c for c in cells if c.load == ref.load and c.family == family and c.p99_ms is not None]
            auto = [c for c in mine if c.max_wait_ms == "auto"]
            fixed = [c for c in mine if c.max_wait_ms != "auto"]
            if not auto or not fixed:
                continue
            best = min(fixed, key=lambda c: c.p99_ms or 0.0)
            for cell in auto:
                ratio = (cell.p99_ms or 0.0) / best.p99_ms if best.p99_ms else float("inf")
                lines.append(
                    f"{ref.load}: {cell.variant} p99 {_ms(cell.p99_ms)} ms against {_ms(best.p99_ms)} ms for the "
                    f"best fixed wait measured ({best.variant}): {ratio:.2f}x (target <= {P99_TARGET:g}x: "
                    f"{_met(ratio <= P99_TARGET)})"
                )
    return lines


def plot(cells: list[GoodputCell], references: list[Reference], capacity: float, path: Path, title: str) -> None:
    """Per pattern: goodput over offered load with the optimum and the capacity (top), as a share of the optimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(ref.pattern for ref in references))
    fig, axes = plt.subplots(2, max(1, len(patterns)), figsize=(6.5 * max(1, len(patterns)), 8), dpi=72, squeeze=False)
    variants = list(dict.fromkeys(c.variant for c in cells))
    colors = {variant: f"C{i % 10}" for i, variant in enumerate(variants)}
    for column, pattern in enumerate(patterns):
        top, bottom = axes[0][column], axes[1][column]
        refs = sorted((r for r in references if r.pattern == pattern), key=lambda r: r.load_fraction)
        xs = [r.load_fraction * 100 for r in refs]
        top.plot(xs, [r.optimum_rps for r in refs], "k--", lw=2, label="optimum (exact)", zorder=3)
        slowed = [(x, r.optimum_at_speed_rps) for x, r in zip(xs, refs, strict=True) if r.optimum_at_speed_rps]
        if slowed:
            top.plot(*zip(*slowed, strict=True), "--", color="dimgrey", lw=1, label="optimum at the speed it ran")
        top.plot(xs, [r.offered_rps for r in refs], ":", color="grey", label="offered")
        top.axhline(capacity, color="grey", lw=1, label="capacity")
        for variant in variants:
            mine = sorted((c for c in cells if c.variant == variant and c.pattern == pattern),
                          key=lambda c: c.load_fraction)  # fmt: skip
            if not mine:
                continue
            loads = [c.load_fraction * 100 for c in mine]
            top.plot(loads, [c.goodput_rps for c in mine], "o-", ms=3, color=colors[variant], label=variant)
            shares = [(x, c.of_optimum) for x, c in zip(loads, mine, strict=True) if c.of_optimum is not None]
            if shares:
                bottom.plot(*zip(*shares, strict=True), "o-", ms=3, color=colors[variant])
        top.set(title=f"{pattern} arrivals", xlabel="offered load (% of capacity)", ylabel="goodput (requests/s)")
        bottom.axhline(1.0, color="black", linestyle="--", lw=1)
        bottom.set(xlabel="offered load (% of capacity)", ylabel="goodput / optimum", ylim=(0, 1.1))
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = -(-len(labels) // 4)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.08 + 0.03 * rows, hspace=0.3, wspace=0.22)
    fig.savefig(path)
    plt.close(fig)


def write_csv(path: Path, cells: list[GoodputCell]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in fields(GoodputCell)])
        writer.writeheader()
        for cell in cells:
            writer.writerow(asdict(cell))


def write_goodput(
    plan: GoodputPlan, model: Model, settings: dict[str, Any], cost_curve: dict[str, Any], cells: list[GoodputCell],
    references: list[Reference], skipped: dict[str, str], console: Console,
) -> None:  # fmt: skip
    """results.json, results.csv, results.md and bench.png in ``plan.out``; the table and the targets on the console."""
    machine = machine_info(model.device, plan.threads)
    capacity = settings["capacity_rps"]
    title = f"goodput: {model.spec.name} on {machine['device']}, {plan.threads} torch thread(s), "
    title += f"{machine['cpu_count']} CPU(s), deadline {settings['deadline_ms']:.1f} ms"
    document = {
        "scenario": "goodput",
        "machine": machine,
        "model": {"name": model.spec.name, "parameters": model.parameters, "cost_curve": cost_curve},
        "settings": settings,
        "optimum": [asdict(ref) for ref in references],
        "results": [asdict(cell) for cell in cells],
        "skipped": skipped,
    }
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_csv(out / "results.csv", cells)
    (out / "results.md").write_text(f"{title}\n\n{markdown_table(cells, references, capacity)}")
    plot(cells, references, capacity, out / "bench.png", title)
    console.print(rich_table(cells, references, capacity, title))
    for line in legend(cells):
        console.print(escape(line), style="dim")
    for line in headline(cells, references, capacity):
        console.print(escape(line))
    console.print(f"results in {out}/ (results.json, results.csv, results.md, bench.png)")
