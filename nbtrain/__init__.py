"""nbtrain: a live laboratory for training neural networks in a Jupyter notebook.

The engine (`Experiment`) is plain PyTorch and imports without any widget library; the
panel (`Dashboard`) is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .challenges import PRESET_NAMES as presets
from .config import Config
from .engine import Experiment, evaluate
from .history import Event, History
from .model import FunnelMLP, funnel_widths
from .playground import Playground
from .runs import Run, RunRegistry, session_runs

if TYPE_CHECKING:
    from .panel import Dashboard
    from .panel.playground import PlaygroundPanel

__all__ = [
    "Config",
    "Dashboard",
    "Event",
    "Experiment",
    "FunnelMLP",
    "History",
    "NBVAL_SANITIZE",
    "Playground",
    "PlaygroundPanel",
    "Run",
    "RunRegistry",
    "evaluate",
    "funnel_widths",
    "presets",
    "session_runs",
]
__version__ = "0.1.0"

#: nbval sanitizer for nbtrain's variable output (rates, durations): pass it to
#: ``pytest --nbval --nbval-sanitize-with``.
NBVAL_SANITIZE = str(Path(__file__).with_name("nbval_sanitize.cfg"))


def __getattr__(name: str) -> Any:
    if name == "Dashboard":
        from .panel import Dashboard

        return Dashboard
    if name == "PlaygroundPanel":
        from .panel.playground import PlaygroundPanel

        return PlaygroundPanel
    raise AttributeError(f"module 'nbtrain' has no attribute {name!r}")
