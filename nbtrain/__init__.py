"""nbtrain: a live laboratory for training neural networks in a Jupyter notebook.

The engine (`Experiment`) is plain PyTorch and imports without any widget library; the
panel (`Dashboard`) is imported on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .challenges import PRESET_NAMES as presets
from .config import Config
from .engine import Experiment, evaluate
from .external import Watcher, watch
from .history import Event, History
from .model import FunnelMLP, SmallCNN, funnel_widths
from .playground import Playground, RegressionPlayground
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
    "RegressionPlayground",
    "Run",
    "RunRegistry",
    "SmallCNN",
    "Watcher",
    "evaluate",
    "funnel_widths",
    "load_ipython_extension",
    "presets",
    "session_runs",
    "watch",
]
__version__ = "0.1.0"

# A library logs and lets the application decide where it goes: without this, Python's
# last-resort handler would print nbtrain's warnings (a diverged run, a layer without
# gradient) into notebook cells. The panel and `exp.error` show them anyway.
logging.getLogger(__name__).addHandler(logging.NullHandler())

#: nbval sanitizer for nbtrain's variable output (rates, durations): pass it to
#: ``pytest --nbval --nbval-sanitize-with``.
NBVAL_SANITIZE = str(Path(__file__).with_name("nbval_sanitize.cfg"))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbtrain``: registers the ``%nbtrain`` line magic (`nbtrain.magic`)."""
    from .magic import register

    register(ipython)


def __getattr__(name: str) -> Any:
    if name == "Dashboard":
        from .panel import Dashboard

        return Dashboard
    if name == "PlaygroundPanel":
        from .panel.playground import PlaygroundPanel

        return PlaygroundPanel
    raise AttributeError(f"module 'nbtrain' has no attribute {name!r}")
