"""memexp: what training a transformer costs in memory and time, and what checkpointing buys."""

from __future__ import annotations

from pathlib import Path

# The config presets ship inside the package, so an installed copy runs from any folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"
