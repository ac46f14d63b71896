"""The wheel: builds, installs into a fresh virtual environment, imports, ships py.typed.

Builds with ``python -m build --wheel --no-isolation`` (hatchling and build are
in the ``dev`` extra, so nothing is downloaded), installs the wheel with
``--no-deps`` into a new venv, and lends that venv the current environment's
dependencies (numpy, anyio, ...) through a ``.pth`` path, so that the test runs
offline in a few seconds. The import must come from the wheel, not the source tree.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _version_in_source() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "src/batchkit/__init__.py").read_text(), re.MULTILINE)
    assert match, "src/batchkit/__init__.py must set __version__ (hatch reads it from there)"
    return match.group(1)


def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("batchkit_serve-*.whl")  # the distribution name; the import name is batchkit
    version = _version_in_source()
    assert wheel.name.startswith(f"batchkit_serve-{version}-py3-none-any"), wheel.name

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"batchkit_serve-{version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"batchkit_serve-{version}.dist-info/entry_points.txt").decode()
    assert "batchkit/py.typed" in names
    assert {"batchkit/__init__.py", "batchkit/_batcher.py", "batchkit/_sync.py", "batchkit/prometheus.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/", "benchmarks/"))]
    assert re.search(r"^Name: batchkit-serve$", metadata, re.MULTILINE)
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.MULTILINE)
    assert "batchkit = batchkit.bench.__main__:cli" in entry_points
    assert re.search(r"^Requires-Dist: anyio", metadata, re.MULTILINE)
    assert re.search(r"^Provides-Extra: prometheus$", metadata, re.MULTILINE)

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    # The dependencies, from this environment: a plain path (its .pth files, such as an
    # editable install of batchkit, are not processed), after the venv's own site-packages.
    (site_packages / "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )

    probe = """
import json, sys
from pathlib import Path
import batchkit
import batchkit.prometheus
from batchkit._sync import SyncBatcher
package = Path(batchkit.__file__).parent
print(json.dumps({
    "file": batchkit.__file__,
    "version": batchkit.__version__,
    "py_typed": (package / "py.typed").is_file(),
    "all_exported": all(hasattr(batchkit, name) for name in batchkit.__all__),
}))
"""
    result = subprocess.run(
        [str(python), "-I", "-c", probe], check=True, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(site_packages), found  # the wheel, not the source tree
    assert found["version"] == version
    assert found["py_typed"]
    assert found["all_exported"]
