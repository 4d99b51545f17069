"""Named starting points for lectures: ``Experiment(**PRESETS[name])``.

Note: a stand-in. The lead is building the real presets module (with ``Experiment(preset=)``)
on another branch; this lookup holds only what the ``%nbtrain --preset`` magic needs
(issue 6), and is to be replaced by that module when the branches merge.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The course's starting point: funnel MLP 128-64-32, ReLU, He init, Adam.
    "default": {},
    # Six sigmoid layers with PyTorch's default init: the first layers' gradients vanish.
    "vanishing": {"hidden": (64,) * 6, "activation": "sigmoid", "init": "default"},
    # The small CNN on the digits' 8x8 images.
    "cnn": {"model": "cnn"},
}
