"""Optional dependencies: import one, or fail saying which extra installs it."""

from __future__ import annotations

import importlib
import types

__all__ = ["DISTRIBUTION", "install_hint", "require"]

DISTRIBUTION = "batchkit-serve"
"""The name batchkit is installed under (``batchkit`` on the package index is another project)."""


def install_hint(extra: str) -> str:
    """How to install ``extra``: from the index, or from a clone of the repository."""
    return f'pip install "{DISTRIBUTION}[{extra}]" (from a clone: pip install -e ".[{extra}]")'


def _is_missing(exc: ImportError, module: str) -> bool:
    """True when ``exc`` says ``module`` (or a package above it) is not installed."""
    missing = exc.name
    return isinstance(exc, ModuleNotFoundError) and missing is not None and f"{module}.".startswith(f"{missing}.")


def require(module: str, extra: str, feature: str) -> types.ModuleType:
    """Import ``module`` for ``feature``; if it is absent, raise an ``ImportError`` naming ``extra``.

    An installed module that fails to import is reported as such (with the
    original error as the cause), not as missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = "is not installed" if _is_missing(exc, module) else f"failed to import ({exc})"
        message = f"{feature} needs {module}, which {what}; install the '{extra}' extra: {install_hint(extra)}"
        raise ImportError(message, name=module) from exc
