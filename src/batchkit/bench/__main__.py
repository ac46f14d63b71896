"""``batchkit bench``: batched against naive serving (and against peers) on one model.

```bash
batchkit bench                 # the full run, about 5 minutes on 2 CPU cores
batchkit bench --quick         # about 30 seconds
batchkit bench --scenario generate --quick   # a model that answers in steps: step-level batching, under a minute
batchkit bench --scenario goodput --quick    # requests answered within their deadline, against the optimum
python -m batchkit.bench --model tiny --variants batchkit,floor --closed 1,64 --out /tmp/b
```

Writes ``results.json``, ``results.md`` and ``bench.png`` to ``--out`` (the goodput scenario also
``results.csv``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._extras import require
from ._arrivals import PATTERNS
from ._generate import GENERATE_FAMILIES, GenPlan, run_generate
from ._goodput import GOODPUT_FAMILIES, GoodputPlan, run_goodput
from ._loads import HEARTBEAT_S, Load, Trace, generator_reach, run_load, run_offline
from ._model import MODELS, Model, configure_threads, pick_device
from ._peers import PEERS, peer_variants
from ._results import REACH, Cell, machine_info, summarize, write_json
from ._variants import Setting, Variant, core_variants

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["cli", "main"]

CORE = ("naive-inline", "naive-thread", "batchkit", "floor", "offline-ideal")
FAMILIES = (*CORE, *PEERS)
SCENARIOS = ("serve", "generate", "goodput")


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
    scenario: str = "serve"
    patterns: tuple[str, ...] = ()
    """goodput: the arrival patterns."""
    deadline_ms: float | None = None
    """goodput: every request's deadline (None: 4x a full batch's run time)."""


# Option types: each turns the text into a value or raises ArgumentTypeError (a one-line error).
T = TypeVar("T")


def _number(text: str, kind: Callable[[str], T], what: str) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _list_of(item: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A comma-separated list of ``item`` (an empty string is an empty list)."""

    def parse(text: str) -> tuple[T, ...]:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    return parse


def _setting(text: str) -> Setting:
    wait, colon, size = text.partition(":")
    if not colon or (wait != "auto" and _is_bad_wait(wait)) or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not wait_ms:batch_size (for example 2:64 or auto:64)")
    return Setting.parse(text)


def _is_bad_wait(wait: str) -> bool:
    try:
        value = float(wait)
    except ValueError:
        return True
    return not (math.isfinite(value) and value >= 0)


def _fixed_setting(text: str) -> Setting:
    setting = _setting(text)
    if setting.wait_ms == "auto":
        raise argparse.ArgumentTypeError("needs a fixed wait (the floor and the peers take no 'auto')")
    return setting


def _family(text: str) -> str:
    if text not in FAMILIES and text not in GENERATE_FAMILIES and text not in GOODPUT_FAMILIES:
        known = ", ".join(dict.fromkeys((*FAMILIES, *GENERATE_FAMILIES, *GOODPUT_FAMILIES)))
        raise argparse.ArgumentTypeError(f"unknown variants: {text} (choose from {known})")
    return text


def _pattern(text: str) -> str:
    if text not in PATTERNS:
        raise argparse.ArgumentTypeError(f"unknown pattern {text!r} (choose from {', '.join(PATTERNS)})")
    return text


def _parser(prog: str = "batchkit bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve one model naively, through batchkit and through other batchers; compare them.",
        epilog="Writes results.json, results.md and bench.png to --out (goodput: results.csv too). Peers not installed "
        "are skipped.",
    )
    _add_options(parser)
    return parser


def _add_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="short loads, fewer settings: about 30 s on 2 CPU cores")
    add(
        "--scenario",
        choices=SCENARIOS,
        default="serve",
        help="serve: one-shot requests (default); generate: a GRU answering in 1-256 steps, step-level batching; "
        "goodput: requests with a deadline (Poisson and bursty arrivals), each variant against the exact optimum",
    )
    add("--model", choices=["auto", *MODELS], default="auto", help="auto: large on CUDA, else mlp")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--threads", type=_positive_int, help="torch intra-op threads (default: CPU cores - 1)")
    add(
        "--variants",
        type=_list_of(_family),
        help=f"comma-separated, from: {', '.join(FAMILIES)}; generate: {', '.join(GENERATE_FAMILIES)}; goodput: "
        f"{', '.join(GOODPUT_FAMILIES)} (default: all)",
    )
    add(
        "--settings",
        type=_list_of(_setting),
        help="batchkit settings as wait_ms:batch_size,... ('auto' wait allowed; default 0:64,2:64,auto:64,5:256; "
        "goodput: 2:64,auto:64)",
    )
    add(
        "--reference",
        type=_fixed_setting,
        help="setting of the floor and peers (default 2:64); generate: of every batching variant (default 2:32)",
    )
    add("--closed", type=_list_of(_positive_int), help="closed-loop concurrencies (default 1,16,64,256; generate: 64)")
    add(
        "--open",
        type=_list_of(_positive_float),
        help="open-loop rates, as fractions of offline capacity (default 0.25,0.5,0.8); generate: of request-level "
        "batching's (request-padded's) saturation throughput (default 0.5,0.8); goodput: of the capacity from the "
        "cost curve (default 0.5,0.8,1,1.1,1.5)",
    )
    add("--rates", type=_list_of(_positive_float), help="open-loop rates in requests/s (replaces --open)")
    add("--patterns", type=_list_of(_pattern), help=f"goodput: arrival patterns, {', '.join(PATTERNS)} (default: both)")
    add(
        "--deadline-ms",
        type=_positive_float,
        help="goodput: every request's deadline, from its arrival (default: 4x the run time of a full batch)",
    )
    add("--warmup", type=_non_negative_float, help="seconds before measuring each cell (default 0.5)")
    add("--duration", type=_positive_float, help="seconds measured per cell (default 2; goodput: 3, the trace)")
    add("--out", type=Path, default=Path("bench-results"), help="output folder")


def _or(given: tuple[T, ...] | None, default: tuple[T, ...]) -> tuple[T, ...]:
    """The option as given (an empty list included), else the default."""
    return default if given is None else given


def make_plan(argv: Sequence[str] | None) -> Plan:
    parser = _parser()
    args = parser.parse_args(argv)
    quick = args.quick
    if args.scenario != "goodput":
        for option, given in (("--patterns", args.patterns), ("--deadline-ms", args.deadline_ms)):
            if given is not None:
                parser.error(f"{option} is for --scenario goodput")
    if args.scenario == "generate":
        return _generate_plan(parser, args)
    if args.scenario == "goodput":
        return _goodput_plan(parser, args)
    settings = args.settings or _list_of(_setting)("0:64,2:64" if quick else "0:64,2:64,auto:64,5:256")
    plan = Plan(
        model=args.model,
        device=args.device,
        threads=args.threads,
        families=args.variants or FAMILIES,
        settings=settings,
        reference=args.reference or Setting.parse("2:64"),
        closed=_or(args.closed, (1, 256) if quick else (1, 16, 64, 256)),
        open_fractions=_or(args.open, (0.5,) if quick else (0.25, 0.5, 0.8)),
        open_rates=_or(args.rates, ()),
        warmup_s=args.warmup if args.warmup is not None else (0.2 if quick else 0.5),
        duration_s=args.duration if args.duration is not None else (0.5 if quick else 2.0),
        out=args.out,
    )
    foreign = [f for f in plan.families if f not in FAMILIES]
    if foreign:
        scenario = "generate" if all(f in GENERATE_FAMILIES for f in foreign) else "goodput"
        parser.error(f"variants {', '.join(foreign)} are for --scenario {scenario}")
    served = set(plan.families) - {"offline-ideal"}
    if served and not (plan.closed or plan.open_fractions or plan.open_rates):
        parser.error("no load to measure: give --closed, --open or --rates")
    return plan


def _generate_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """The plan of ``--scenario generate``: its own variants, loads and durations."""
    quick = args.quick
    families = args.variants or GENERATE_FAMILIES
    foreign = [f for f in families if f not in GENERATE_FAMILIES]
    if foreign:
        parser.error(
            f"--scenario generate has no variants {', '.join(foreign)} (it has {', '.join(GENERATE_FAMILIES)})"
        )
    if args.settings is not None:
        parser.error("--settings is for --scenario serve; generate batches at --reference")
    if args.model != "auto" or args.device == "cuda":
        parser.error("--scenario generate runs its own GRU on the CPU: no --model, no --device cuda")
    plan = Plan(
        model="gru",
        device="cpu",
        threads=args.threads,
        families=families,
        settings=(),
        reference=args.reference or Setting.parse("2:32"),
        closed=_or(args.closed, (64,)),
        open_fractions=_or(args.open, (0.8,) if quick else (0.5, 0.8)),
        open_rates=_or(args.rates, ()),
        warmup_s=args.warmup if args.warmup is not None else (0.3 if quick else 1.0),
        duration_s=args.duration if args.duration is not None else (1.0 if quick else 5.0),
        out=args.out,
        scenario="generate",
    )
    if not (plan.closed or plan.open_fractions or plan.open_rates):
        parser.error("no load to measure: give --closed, --open or --rates")
    return plan


def _goodput_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """The plan of ``--scenario goodput``: its own variants, loads (fractions of capacity) and trace length."""
    quick = args.quick
    families = args.variants or GOODPUT_FAMILIES
    foreign = [f for f in families if f not in GOODPUT_FAMILIES]
    if foreign:
        parser.error(f"--scenario goodput has no variants {', '.join(foreign)} (it has {', '.join(GOODPUT_FAMILIES)})")
    if args.closed is not None:
        parser.error("--closed is not for --scenario goodput: it replays open-loop traces (--open, --rates)")
    plan = Plan(
        model=args.model,
        device=args.device,
        threads=args.threads,
        families=families,
        settings=args.settings or _list_of(_setting)("2:64,auto:64"),
        reference=args.reference or Setting.parse("2:64"),
        closed=(),
        open_fractions=_or(args.open, (0.5, 0.8, 1.0, 1.1, 1.5)),
        open_rates=_or(args.rates, ()),
        warmup_s=args.warmup if args.warmup is not None else (0.2 if quick else 0.5),
        duration_s=args.duration if args.duration is not None else (1.0 if quick else 3.0),
        out=args.out,
        scenario="goodput",
        patterns=args.patterns or PATTERNS,
        deadline_ms=args.deadline_ms,
    )
    if not (plan.open_fractions or plan.open_rates):
        parser.error("no load to measure: give --open or --rates")
    return plan


def goodput(plan: Plan, console: Console) -> None:
    """Run ``--scenario goodput``."""
    device = pick_device(plan.device)
    threads = configure_threads(plan.threads)
    model = Model(MODELS[plan.model if plan.model != "auto" else ("large" if device == "cuda" else "mlp")], device)
    goodput_plan = GoodputPlan(
        threads=threads,
        families=plan.families,
        settings=plan.settings,
        reference=plan.reference,
        fractions=plan.open_fractions,
        rates=plan.open_rates,
        patterns=plan.patterns,
        deadline_ms=plan.deadline_ms,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        out=plan.out,
    )
    run_goodput(goodput_plan, model, console)


def generate(plan: Plan, console: Console) -> None:
    """Run ``--scenario generate``."""
    threads = configure_threads(plan.threads)
    gen_plan = GenPlan(
        families=plan.families,
        reference=plan.reference,
        closed=plan.closed,
        open_fractions=plan.open_fractions,
        open_rates=plan.open_rates,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        threads=threads,
        out=plan.out,
    )
    run_generate(gen_plan, console)


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
        loads = [Load("open", rate, rate / capacity) for rate in plan.open_rates]
    else:
        loads = [Load("open", fraction * capacity, fraction) for fraction in plan.open_fractions]
    return [replace(load, reach=generator_reach(load.value)) for load in loads]


def _measure_all(variants: list[Variant], loads: list[Load], model: Model, plan: Plan, console: Console) -> list[Cell]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


def _warn_unreachable(loads: list[Load], console: Console) -> None:
    for load in loads:
        if load.reach is not None and load.reach < REACH:
            console.print(
                f"[yellow]warning[/]: open loop at {load.value:,.0f} requests/s is beyond this machine's load "
                f"generator (alone, it issues {load.reach:.0%} of the arrivals on time); those rows are marked "
                "'!' and their latencies measure the generator as much as the variant"
            )


def _write(plan: Plan, meta: dict[str, Any], cells: list[Cell], skipped: dict[str, str], console: Console) -> None:
    from ._report import markdown_table, plot, print_table

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
    from rich.markup import escape

    device = pick_device(plan.device)
    threads = configure_threads(plan.threads)
    model = Model(MODELS[plan.model if plan.model != "auto" else ("large" if device == "cuda" else "mlp")], device)
    variants, skipped = _variants(plan)
    for family, reason in skipped.items():
        console.print(f"[yellow]skipping {family}[/]: {escape(reason)}")
    model_info = _describe(model, plan, threads, console)

    offline = _offline_cells(model, plan)
    capacity = next(c.throughput for c in offline if c.max_batch_size == plan.reference.batch_size)
    open_loads = _open_loads(plan, capacity)
    _warn_unreachable(open_loads, console)
    loads = [Load("closed", c) for c in plan.closed] + open_loads
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


def _require_extras() -> None:
    """Exit with a one-line message when an extra the benchmark needs is missing."""
    try:
        for module, extra in (("rich", "bench"), ("matplotlib", "bench"), ("torch", "torch")):
            require(module, extra, "batchkit bench")
    except ImportError as exc:
        raise SystemExit(f"batchkit bench: error: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``batchkit bench`` and ``python -m batchkit.bench``: the options, then the run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # `batchkit bench ...` as well as `python -m batchkit.bench ...`
        args = args[1:]
    plan = make_plan(args)
    _require_extras()
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    if plan.scenario == "generate":
        generate(plan, console)
    elif plan.scenario == "goodput":
        goodput(plan, console)
    else:
        run(plan, console)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``batchkit`` command: its subcommands; bare, the usage."""
    parser = argparse.ArgumentParser(prog="batchkit", description="batchkit's command-line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("bench", help="benchmark batched against naive serving (batchkit bench --help)", add_help=False)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        parser.print_help()
        return 2
    parser.parse_args(args[:1])  # exits with a one-line error unless it names a command
    return main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
