"""Lets the benchmark modules import their shared helpers (``machinery``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
