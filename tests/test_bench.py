"""``batchkit bench`` runs end to end on the tiny model and writes well-formed results.

Loads are a few tenths of a second: these tests check the plumbing and the
shape of the output, never how fast anything is.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from rich.console import Console

from batchkit.bench import __main__ as bench_main
from batchkit.bench import _peers
from batchkit.bench.__main__ import cli, main, make_plan
from batchkit.bench._loads import Load, generator_reach
from batchkit.bench._report import legend, markdown_table, plot, print_table
from batchkit.bench._results import REACH, Cell

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SHORT = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "0.05", "--duration", "0.1"]


# Some benchmark run in this module (the peers' batchers are the suspects; not pinned down) can leave
# an unclosed event loop behind. Collect after each test, and accept its ResourceWarning here, so that
# it never fails whichever later test the cycle collector happens to run in.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture(autouse=True)
def _collect_leftovers() -> Iterator[None]:
    yield
    gc.collect()


def check_results(out: Path, variants: set[str], loads: int) -> dict[str, Any]:
    """The JSON has one sane cell per (variant, load); the plot is a PNG."""
    document = json.loads((out / "results.json").read_text())
    assert document["machine"]["torch_threads"] >= 1
    assert document["model"]["parameters"] > 0
    cells = document["results"]
    families = {cell["family"] for cell in cells}
    assert families == variants
    for cell in cells:
        assert cell["throughput"] > 0, cell
        assert cell["requests"] > 0, cell
        assert 0 <= cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"], cell
        assert cell["mean_batch_size"] >= 1.0, cell
        if cell["family"] == "offline-ideal":
            assert cell["lag_p99_ms"] is None
        else:
            assert cell["lag_p99_ms"] is not None
            assert cell["lag_max_ms"] >= cell["lag_p99_ms"]
    for family in variants - {"offline-ideal"}:
        assert len({c["load"] for c in cells if c["family"] == family}) == loads
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "results.md").read_text().count("\n") > len(cells)
    return document


def test_main_runs_every_core_variant(tmp_path: Path) -> None:
    argv = [
        *SHORT,
        "--variants",
        "naive-inline,naive-thread,batchkit,floor,offline-ideal",
        "--settings",
        "0:8,auto:16",
        "--reference",
        "1:8",
        "--closed",
        "1,16",
        "--rates",
        "300",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    document = check_results(tmp_path, {"naive-inline", "naive-thread", "batchkit", "floor", "offline-ideal"}, 3)
    batchkit_cells = [c for c in document["results"] if c["family"] == "batchkit"]
    assert {c["variant"] for c in batchkit_cells} == {"batchkit[w=0,b=8]", "batchkit[w=auto,b=16]"}
    assert len(batchkit_cells) == 2 * 3  # two settings, three loads
    assert document["skipped"] == {}


def test_missing_peer_is_skipped_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_peers, "_import", unavailable)
    argv = [*SHORT, "--variants", "batchkit,batched,ray-serve-inline", "--settings", "0:8", "--reference", "0:8"]
    assert main([*argv, "--closed", "4", "--rates", "", "--open", "", "--out", str(tmp_path)]) == 0
    document = check_results(tmp_path, {"batchkit"}, 1)
    assert set(document["skipped"]) == {"batched", "ray-serve-inline"}
    assert "pip install" in document["skipped"]["batched"]


def test_module_runs_as_a_subprocess(tmp_path: Path) -> None:
    argv = [
        *SHORT,
        "--quick",
        "--variants",
        "batchkit,offline-ideal",
        "--settings",
        "0:8",
        "--closed",
        "8",
        "--rates",
        "200",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "batchkit.bench", *argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "batchkit[" in completed.stdout
    check_results(tmp_path, {"batchkit", "offline-ideal"}, 2)
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["duration_s"] == 0.1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--settings", "2-64"),
        ("--settings", "2:0"),
        ("--settings", "x:64"),
        ("--closed", "abc"),
        ("--closed", "0"),
        ("--threads", "0"),
        ("--duration", "-1"),
        ("--duration", "0"),
        ("--warmup", "nan"),
        ("--open", "half"),
        ("--rates", "-5"),
        ("--reference", "auto:64"),
        ("--variants", "batchkit,nope"),
        ("--model", "huge"),
    ],
)
def test_a_bad_option_is_a_one_line_argparse_error(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        make_plan([option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: batchkit bench"), err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"batchkit bench: error: argument {option}"), err


def test_bad_options_get_a_reason() -> None:
    reasons = {"--variants": "unknown variants: nope", "--reference": "fixed wait", "--settings": "wait_ms:batch_size"}
    for option, reason in reasons.items():
        value = {"--variants": "nope", "--reference": "auto:64", "--settings": "2-64"}[option]
        completed = subprocess.run(
            [sys.executable, "-m", "batchkit.bench", option, value],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 2, completed.stderr
        assert reason in completed.stderr.splitlines()[-1], completed.stderr
        assert "Traceback" not in completed.stderr


def test_no_load_at_all_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        make_plan(["--closed", "", "--open", ""])
    assert "no load to measure" in capsys.readouterr().err


def test_bare_batchkit_prints_usage_and_runs_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: Any) -> None:
        raise AssertionError("bare `batchkit` started a benchmark")

    monkeypatch.setattr(bench_main, "run", must_not_run)
    assert cli([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: batchkit")
    assert "bench" in out


def test_batchkit_bench_runs_the_plan_given(monkeypatch: pytest.MonkeyPatch) -> None:
    plans: list[bench_main.Plan] = []
    monkeypatch.setattr(bench_main, "run", lambda plan, console: plans.append(plan))
    assert cli(["bench", "--quick", "--settings", "auto:16,1.5:8", "--closed", "2", "--rates", "100"]) == 0
    (plan,) = plans
    assert [s.label for s in plan.settings] == ["w=auto,b=16", "w=1.5,b=8"]
    assert (plan.closed, plan.open_rates, plan.duration_s) == ((2,), (100.0,), 0.5)


def test_unknown_command_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["--quick"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("batchkit: error:")


def test_missing_bench_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"batchkit bench: error: .*matplotlib.*'bench' extra") as exited:
        main(["--closed", "1"])
    assert "batchkit-serve[bench]" in str(exited.value.code)


def _cell(variant: str, load: Load, **fields: Any) -> Cell:
    cell = Cell(
        variant=variant, family=variant, max_batch_size=None, load=load.label, load_kind=load.kind,
        load_value=load.value, throughput=1000.0, requests=100, unfinished=0, errors=0, p50_ms=5.0, p95_ms=8.0,
        p99_ms=9.0, mean_batch_size=1.0, model_busy=0.5, lag_p99_ms=1.0, lag_max_ms=1.5, load_reach=load.reach,
    )  # fmt: skip
    return dataclasses.replace(cell, **fields)


def test_table_carries_a_legend_and_marks_only_what_applies() -> None:
    closed = Load("closed", 64)
    unreached = Load("open", 1e6, 0.5, reach=0.1)
    plain = [_cell("batchkit", closed), _cell("naive-thread", closed, lag_p99_ms=3.0, p50_ms=40.0)]
    blocking = _cell("naive-inline", closed, p50_ms=0.5, lag_p99_ms=300.0)
    late = _cell("batchkit", unreached)

    text = markdown_table(plain)
    for term in ("floor:", "offline-ideal:", "busy:", "lag:", "unfinished:"):
        assert f"- {term}" in text or f"; {term}" in text, (term, text)
    assert "*:" not in text
    assert "!:" not in text
    assert "| batchkit | closed 64 |" in text

    marked = markdown_table([*plain, blocking, late])
    assert "| naive-inline * | closed 64 |" in marked
    assert "| naive-thread | closed 64 |" in marked  # lag below its own p50: not marked
    assert f"| batchkit | {unreached.label} ! |" in marked
    assert "- *: loop lag p99 above the variant's own p50" in marked
    assert "- !: a rate the load generator alone cannot issue" in marked

    console = Console(file=io.StringIO(), width=200)
    print_table([*plain, blocking], "title", console)
    shown = console.file.getvalue()
    assert all(line in shown for line in legend([*plain, blocking]))


def test_plot_draws_markers_for_blocking_and_unreached_cells(tmp_path: Path) -> None:
    cells = [
        _cell("naive-inline", Load("closed", 1), p50_ms=0.5, lag_p99_ms=3.0),
        _cell("naive-inline", Load("closed", 256), p50_ms=0.5, lag_p99_ms=300.0),
        _cell("batchkit", Load("closed", 1)),
        _cell("batchkit", Load("closed", 256), throughput=5000.0),
        _cell("batchkit", Load("open", 100, 0.1, reach=1.0)),
        _cell("batchkit", Load("open", 1e6, 0.5, reach=0.1)),
        _cell("offline-ideal[b=64]", Load("offline", 64), lag_p99_ms=None, lag_max_ms=None),
    ]
    plot(cells, tmp_path / "bench.png", "title")
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_an_unreachable_open_loop_rate_is_detected() -> None:
    assert generator_reach(1e9) < REACH  # a billion arrivals a second: beyond any event loop


# -- --scenario generate: a step model served seven ways --------------------------------------------

GENERATE = ["--scenario", "generate", "--threads", "1", "--warmup", "0.05", "--duration", "0.2", "--reference", "1:8"]


def test_generate_scenario_runs_every_variant_and_answers_each_request_exactly(tmp_path: Path) -> None:
    from batchkit.bench._generate import GENERATE_FAMILIES, available

    assert main([*GENERATE, "--closed", "8", "--open", "0.5", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["scenario"] == "generate"
    assert document["model"]["parameters"] > 0
    assert document["settings"]["open_loop_capacity_rps"] > 0
    families, skipped = available(GENERATE_FAMILIES)
    assert set(document["skipped"]) == set(skipped)
    cells = document["results"]
    assert {c["family"] for c in cells} == set(families)
    for family in families:
        assert {c["load_kind"] for c in cells if c["family"] == family} == {"closed", "open"}, family
    for cell in cells:
        assert cell["wrong"] == 0, cell  # every request got exactly its own items, in order
        assert cell["errors"] == 0, cell
        assert cell["requests"] > 0, cell
        assert cell["tokens_per_s"] >= cell["throughput"] > 0, cell
        assert 0 <= cell["first_p50_ms"] <= cell["p50_ms"], cell
        assert cell["first_p99_ms"] <= cell["p99_ms"], cell
        assert cell["lag_p99_ms"] is not None, cell
        assert cell["mean_rows"] >= 1.0 or cell["family"] == "naive-thread", cell
    text = (tmp_path / "results.md").read_text()
    assert "| step[w=1,b=8] | closed 8 |" in text
    assert "target >= 3x" in text
    assert "request-padded (request-level batching, finished rows padded)" in text
    assert "request (finished rows dropped)" in text
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    gc.collect()


@pytest.mark.parametrize(
    "family", ["naive-thread", "request-padded", "request", "stream-padded", "stream", "ray-serve-stream", "step"]
)
def test_each_generate_variant_streams_every_caller_its_own_items(family: str) -> None:
    import asyncio

    from batchkit.bench._generate import SERVES, available
    from batchkit.bench._gru import GRU, Prompt
    from batchkit.bench._variants import Setting

    if not available((family,))[0]:
        pytest.skip(f"{family} is not installed")
    model = GRU(hidden=16, vocab=32)
    prompts = [Prompt(tag=tag, token=tag % 32, length=length) for tag, length in enumerate([1, 5, 40, 2, 17, 1, 9])]
    alone = {p.tag: model.generate([p])[0] for p in prompts}

    async def main() -> dict[int, list[Any]]:
        got: dict[int, list[Any]] = {}

        async def collect(stream: Any, prompt: Prompt) -> None:
            got[prompt.tag] = [item async for item in stream(prompt)]

        async with SERVES[family](model, Setting(1.0, 4)) as stream:
            await asyncio.gather(*(collect(stream, p) for p in prompts))
        return got

    got = asyncio.run(main())
    for prompt in prompts:
        assert [(tag, index) for tag, index, _ in got[prompt.tag]] == prompt.expected()
        assert got[prompt.tag] == alone[prompt.tag]  # tiny float32 model: the same tokens as generated alone


@pytest.mark.parametrize("padded", [True, False])
def test_request_level_generation_pads_or_drops_finished_rows(padded: bool) -> None:
    from batchkit.bench._gru import GRU, Prompt

    model = GRU(hidden=16, vocab=32)
    lengths = [1, 5, 40, 2]
    prompts = [Prompt(tag=tag, token=tag, length=length) for tag, length in enumerate(lengths)]
    alone = [model.generate([p])[0] for p in prompts]
    model.reset_counts()
    outputs = model.generate_padded(prompts) if padded else model.generate(prompts)
    assert outputs == alone  # padded rows' outputs are discarded: each gets exactly its own items
    assert model.steps == max(lengths)  # either way, the batch runs until its longest member is done
    assert model.rows == (len(prompts) * max(lengths) if padded else sum(lengths))


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--scenario", "generate", "--variants", "batchkit"], "has no variants batchkit"),
        (["--scenario", "generate", "--settings", "0:8"], "--settings is for --scenario serve"),
        (["--scenario", "generate", "--model", "mlp"], "runs its own GRU"),
        (["--variants", "step"], "are for --scenario generate"),
        (["--scenario", "talk"], "invalid choice"),
    ],
)
def test_generate_options_are_checked(argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        make_plan(argv)
    assert exited.value.code == 2
    assert reason in capsys.readouterr().err.strip().splitlines()[-1]


def test_generate_quick_plan() -> None:
    plan = make_plan(["--scenario", "generate", "--quick"])
    assert (plan.scenario, plan.closed, plan.open_fractions, plan.reference.label) == (
        "generate",
        (64,),
        (0.8,),
        "w=2,b=32",
    )
    assert plan.warmup_s + plan.duration_s <= 1.5
