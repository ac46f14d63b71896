"""``batchkit bench``: batched against naive serving (and against peers) on one model.

```bash
batchkit bench                 # the full run, about 5 minutes on 2 CPU cores
batchkit bench --quick         # under a minute
python -m batchkit.bench --model tiny --variants batchkit,floor --closed 1,64 --out /tmp/b
```

Writes ``results.json``, ``results.md`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ._loads import HEARTBEAT_S, Load, Trace, run_load, run_offline
from ._model import MODELS, Model, configure_threads, pick_device
from ._peers import PEERS, peer_variants
from ._report import markdown_table, plot, print_table
from ._results import Cell, machine_info, summarize, write_json
from ._variants import Setting, Variant, core_variants

__all__ = ["main"]

CORE = ("naive-inline", "naive-thread", "batchkit", "floor", "offline-ideal")
FAMILIES = (*CORE, *PEERS)


@dataclass(frozen=True)
class Plan:
    """Everything the options decide, with ``--quick`` and defaults applied."""

    model: str
    device: str
    threads: int | None
    families: tuple[str, ...]
    settings: tuple[Setting, ...]
    reference: Setting
    closed: tuple[int, ...]
    open_fractions: tuple[float, ...]
    open_rates: tuple[float, ...]
    warmup_s: float
    duration_s: float
    out: Path


def _or(given: str | None, default: str) -> str:
    """The option as given (an empty string included), else the default."""
    return default if given is None else given


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchkit bench",
        description="Serve one model naively, through batchkit and through other batchers; compare them.",
        epilog="Writes results.json, results.md and bench.png to --out. Peers not installed are skipped.",
    )
    parser.add_argument("--quick", action="store_true", help="short loads, fewer settings: under a minute")
    parser.add_argument("--model", choices=["auto", *MODELS], default="auto", help="auto: large on CUDA, else mlp")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: CPU cores - 1)")
    parser.add_argument("--variants", help=f"comma-separated, from: {', '.join(FAMILIES)} (default: all)")
    parser.add_argument(
        "--settings",
        help="batchkit settings as wait_ms:batch_size,... ('auto' wait allowed; default 0:64,2:64,auto:64,5:256)",
    )
    parser.add_argument("--reference", default="2:64", help="setting of the floor batcher and peers (default 2:64)")
    parser.add_argument("--closed", help="closed-loop concurrencies (default 1,16,64,256)")
    parser.add_argument("--open", help="open-loop rates, as fractions of offline capacity (default 0.25,0.5,0.8)")
    parser.add_argument("--rates", help="open-loop rates in requests/s (replaces --open)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring each cell (default 0.5)")
    parser.add_argument("--duration", type=float, help="seconds measured per cell (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    return parser


def make_plan(argv: Sequence[str] | None) -> Plan:
    args = _parser().parse_args(argv)
    quick = args.quick
    families = tuple(args.variants.split(",")) if args.variants else FAMILIES
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(FAMILIES)})")
    reference = Setting.parse(args.reference)
    if reference.wait_ms == "auto":
        raise SystemExit("--reference needs a fixed wait (the floor and the peers take no 'auto')")
    settings = args.settings or ("0:64,2:64" if quick else "0:64,2:64,auto:64,5:256")
    return Plan(
        model=args.model,
        device=args.device,
        threads=args.threads,
        families=families,
        settings=tuple(Setting.parse(s) for s in settings.split(",")),
        reference=reference,
        closed=_ints(_or(args.closed, "1,256" if quick else "1,16,64,256")),
        open_fractions=_floats(_or(args.open, "0.5" if quick else "0.25,0.5,0.8")),
        open_rates=_floats(_or(args.rates, "")),
        warmup_s=args.warmup if args.warmup is not None else (0.2 if quick else 0.5),
        duration_s=args.duration if args.duration is not None else (0.5 if quick else 2.0),
        out=args.out,
    )


def _variants(plan: Plan) -> tuple[list[Variant], dict[str, str]]:
    wanted = set(plan.families)
    core = [v for v in core_variants(list(plan.settings), plan.reference) if v.family in wanted]
    peers, skipped = peer_variants(plan.reference, wanted)
    return core + peers, skipped


async def _serve_and_load(variant: Variant, model: Model, load: Load, plan: Plan) -> Trace:
    async with variant.serve(model) as predict:
        return await run_load(predict, model, load, warmup_s=plan.warmup_s, duration_s=plan.duration_s)


def _measure(variant: Variant, model: Model, load: Load, plan: Plan) -> Cell:
    """One cell, on a fresh event loop (so no variant inherits another's threads or tasks)."""
    model.reset_counts()
    trace = asyncio.run(_serve_and_load(variant, model, load, plan))
    size = variant.setting.batch_size if variant.setting else None
    return summarize(variant.name, variant.family, size, load, trace, model.mean_batch_size)


def _offline_cells(model: Model, plan: Plan) -> list[Cell]:
    sizes = sorted({plan.reference.batch_size, *(s.batch_size for s in plan.settings)})
    cells = []
    for size in sizes:
        load = Load("offline", size)
        trace = run_offline(model, size, warmup_s=plan.warmup_s, duration_s=plan.duration_s)
        cells.append(summarize(f"offline-ideal[b={size}]", "offline-ideal", size, load, trace, float(size)))
    model.reset_counts()
    return cells


def _best(first: list[Cell], second: list[Cell]) -> list[Cell]:
    """Per batch size, the offline measurement with the higher throughput."""
    return [max(a, b, key=lambda cell: cell.throughput) for a, b in zip(first, second, strict=True)]


def _open_loads(plan: Plan, capacity: float) -> list[Load]:
    if plan.open_rates:
        return [Load("open", rate, rate / capacity) for rate in plan.open_rates]
    return [Load("open", fraction * capacity, fraction) for fraction in plan.open_fractions]


def _measure_all(variants: list[Variant], loads: list[Load], model: Model, plan: Plan, console: Console) -> list[Cell]:
    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    cells = []
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(variants) * len(loads))
        for variant in variants:
            for load in loads:
                progress.update(task, description=f"{variant.name} {load.label}")
                cells.append(_measure(variant, model, load, plan))
                progress.advance(task)
    return cells


def _describe(model: Model, plan: Plan, threads: int, console: Console) -> dict[str, Any]:
    """Time the model alone and say what runs; returns the JSON's ``model`` entry."""
    one_ms = model.seconds_per_batch(1) * 1000.0
    batch_ms = model.seconds_per_batch(plan.reference.batch_size) * 1000.0
    console.print(
        f"model {model.spec.name} ({model.parameters:,} parameters) on {model.device}, torch threads {threads}: "
        f"{one_ms:.3f} ms for 1 sample, {batch_ms:.3f} ms for a batch of {plan.reference.batch_size}"
    )
    return {
        "name": model.spec.name,
        "parameters": model.parameters,
        "ms_per_sample_at_batch_1": one_ms,
        "ms_per_reference_batch": batch_ms,
    }


def _write(plan: Plan, meta: dict[str, Any], cells: list[Cell], skipped: dict[str, str], console: Console) -> None:
    machine = meta["machine"]
    title = f"{meta['model']['name']} on {machine['device']}, {machine['torch_threads']} torch thread(s), "
    title += f"{machine['cpu_count']} CPU(s)"
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json(plan.out / "results.json", meta, cells, skipped)
    (plan.out / "results.md").write_text(f"{title}\n\n{markdown_table(cells)}")
    plot(cells, plan.out / "bench.png", title)
    print_table(cells, title, console)
    console.print(f"results in {plan.out}/ (results.json, results.md, bench.png)")


def run(plan: Plan, console: Console) -> list[Cell]:
    """Measure every (variant, load) cell, then write and show the results."""
    device = pick_device(plan.device)
    threads = configure_threads(plan.threads)
    model = Model(MODELS[plan.model if plan.model != "auto" else ("large" if device == "cuda" else "mlp")], device)
    variants, skipped = _variants(plan)
    for family, reason in skipped.items():
        console.print(f"[yellow]skipping {family}[/]: {escape(reason)}")
    model_info = _describe(model, plan, threads, console)

    offline = _offline_cells(model, plan)
    capacity = next(c.throughput for c in offline if c.max_batch_size == plan.reference.batch_size)
    loads = [Load("closed", c) for c in plan.closed] + _open_loads(plan, capacity)
    gc.collect()
    gc.freeze()  # what exists now is not garbage: keep collections short during the measurements
    try:
        served = _measure_all(variants, loads, model, plan, console)
    finally:
        gc.unfreeze()
    offline = _best(offline, _offline_cells(model, plan))  # a ceiling: keep the better of two tries
    cells = [c for c in offline if "offline-ideal" in plan.families] + served

    settings = {
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
        "reference": plan.reference.label,
        "open_loop_capacity_rps": capacity,
        "heartbeat_ms": HEARTBEAT_S * 1000.0,
    }
    meta = {"machine": machine_info(device, threads), "model": model_info, "settings": settings}
    _write(plan, meta, cells, skipped, console)
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``batchkit bench`` and ``python -m batchkit.bench``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # the console script is `batchkit`; `batchkit bench` names the command
        args = args[1:]
    run(make_plan(args), Console(width=None if sys.stdout.isatty() else 150))
    return 0


if __name__ == "__main__":
    sys.exit(main())
