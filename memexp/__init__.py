"""memexp: what training a transformer costs in memory and time, and what checkpointing buys."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The config presets ship inside the package, so an installed copy runs from any folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"

try:
    __version__: str | None = version("memexp")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = None
