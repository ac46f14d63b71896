"""A missing optional dependency fails with an ImportError that names the extra to install."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import batchkit
from batchkit._extras import DISTRIBUTION, require


def test_require_returns_the_module() -> None:
    assert require("json", "none", "a test") is json


def test_a_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "somepkg", None)  # None in sys.modules: import fails as if absent
    with pytest.raises(ImportError) as raised:
        require("somepkg.sub", "things", "the things feature")
    message = str(raised.value)
    assert "the things feature needs somepkg.sub, which is not installed" in message
    assert f'pip install "{DISTRIBUTION}[things]"' in message
    assert 'pip install -e ".[things]"' in message
    assert raised.value.name == "somepkg.sub"


def test_a_module_that_fails_inside_is_not_called_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise ModuleNotFoundError("No module named 'its_own_dependency'", name="its_own_dependency")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"failed to import .*its_own_dependency.*'x' extra") as raised:
        require("present", "x", "feature")
    assert isinstance(raised.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [("batchkit.prometheus", "prometheus_client", "prometheus"), ("batchkit.ray", "ray", "ray")],
)
def test_integrations_name_their_extra(
    module: str, dependency: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (module, "batchkit._prometheus"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # import afresh; restored afterwards
    for name in [dependency, *(m for m in sys.modules if m.startswith(f"{dependency}."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, even if imported before
    hint = rf"{module} needs .*'{extra}' extra: pip install \"{DISTRIBUTION}\[{extra}\]\""
    with pytest.raises(ImportError, match=hint):
        importlib.import_module(module)


def test_from_module_without_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"'torch' extra"):
        batchkit.Batcher.from_module(object())
