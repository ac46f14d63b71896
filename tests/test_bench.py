"""``batchkit bench`` runs end to end on the tiny model and writes well-formed results.

Loads are a few tenths of a second: these tests check the plumbing and the
shape of the output, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from batchkit.bench import _peers
from batchkit.bench.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SHORT = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "0.05", "--duration", "0.1"]


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


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown variants: nope"):
        main(["--variants", "nope"])


def test_reference_setting_needs_a_fixed_wait() -> None:
    with pytest.raises(SystemExit, match="fixed wait"):
        main(["--reference", "auto:64"])
