"""Views of the network's insides: live histograms and dead units, and the init inspector."""

from __future__ import annotations

from typing import Any

import bqplot as bq
import ipywidgets as w
import numpy as np

from ..config import INITS
from ..engine import Experiment
from ..internals import inspect_init
from .plots import _figure, _finite, _fit_log_axis, _positive, _set_decades, fit_legend

KINDS = ("weights", "activations", "gradients")


class InternalsView:
    """Histogram of one layer's weights, activations or gradients, and dead ReLU units.

    Updated by the dashboard's refresh while its tab is open, at most `rate` times a second:
    the engine measures at a step boundary when asked (`Experiment.request_internals`).
    """

    rate = 2.0

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        names = experiment.probe.layer_names
        self.layer = w.Dropdown(options=names, value=names[0], description="layer")
        self.kind = w.ToggleButtons(options=KINDS, value="weights")
        x, y = bq.LinearScale(), bq.LinearScale(min=0)
        self.bars = bq.Bars(
            x=[0.0], y=[0.0], scales={"x": x, "y": y}, colors=["#1f77b4"], padding=0.05
        )
        self.hist_figure = _figure(
            "Distribution",
            [self.bars],
            [
                bq.Axis(scale=x, label="value", tick_format=".2g"),
                bq.Axis(scale=y, side="left", label="count"),
            ],
        )
        dead_y = bq.LinearScale(min=0, max=1)
        self.dead = bq.Bars(
            x=names,
            y=np.zeros(len(names)),
            colors=["#d62728"],
            scales={"x": bq.OrdinalScale(), "y": dead_y},
        )
        self.dead_figure = _figure(
            "Dead ReLU units (zero for every probe sample)",
            [self.dead],
            [
                bq.Axis(scale=self.dead.scales["x"], label="layer"),
                bq.Axis(scale=dead_y, side="left", label="fraction", tick_format=".0%"),
            ],
        )
        self.caption = w.HTML()
        self.widget = w.VBox(
            [
                w.HBox([self.layer, self.kind]),
                self.caption,
                w.GridBox(
                    [self.hist_figure, self.dead_figure],
                    layout=w.Layout(grid_template_columns="repeat(2, minmax(320px, 1fr))"),
                ),
            ]
        )
        self._drawn: tuple | None = None

    def update(self) -> None:
        """Draw the latest snapshot and ask for the next one."""
        exp = self.experiment
        internals = exp.internals
        exp.request_internals()
        if internals is None:
            return
        key = (internals.step, id(internals), self.layer.value, self.kind.value)
        if key == self._drawn:
            return
        self._drawn = key
        layers = {layer.name: layer for layer in internals.layers}
        chosen = layers.get(self.layer.value)
        if chosen is None:
            return
        hist = getattr(chosen, self.kind.value)
        with self.bars.hold_sync(), self.dead.hold_sync():
            if hist is None:
                self.bars.x, self.bars.y = [0.0], [0.0]
            else:
                self.bars.x = hist.centers.astype(np.float32)
                self.bars.y = hist.counts.astype(np.float32)
            self.dead.x = [layer.name for layer in internals.layers]
            self.dead.y = _finite([layer.dead_fraction for layer in internals.layers])
        what = {
            "weights": "weights",
            "activations": "outputs of the activation on 256 training samples (eval mode)",
            "gradients": "weight gradients of the last step",
        }
        self.caption.value = (
            f"<small>{chosen.name}: {what[self.kind.value]}, at step "
            f"{internals.step}" + ("" if hist else " (none yet)") + "</small>"
        )


class InitInspector:
    """Two initialization schemes side by side, on one batch through fresh networks."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.first = w.Dropdown(options=INITS, value=experiment.config.init, description="A")
        other = "default" if experiment.config.init != "default" else "he"
        self.second = w.Dropdown(options=INITS, value=other, description="B")
        self.compare = w.Button(description="Compare", icon="balance-scale")
        self.compare.on_click(lambda _: self.update())
        self.figures = {}
        self.bars = {}
        self.axes = {}
        for key, title, scale in (
            ("activation_std", "Activation std per layer", bq.LinearScale(min=0)),
            ("activation_mean", "Activation mean per layer", bq.LinearScale()),
            ("grad_norm", "Gradient norm per layer (log)", bq.LogScale()),
        ):
            # Note: bars start empty: zeros give a zero-height domain (NaN heights, and a
            # log scale has no place for 0); one NaN leaves bqplot's bars view blank for good.
            bars = bq.Bars(
                x=[],
                y=np.zeros((2, 0), dtype=np.float32),
                type="grouped",
                scales={"x": bq.OrdinalScale(), "y": scale},
                colors=["#1f77b4", "#ff7f0e"],
                labels=["A", "B"],
                display_legend=True,
            )
            self.bars[key] = bars
            self.axes[key] = bq.Axis(
                scale=scale, side="left", tick_format=".0e" if key == "grad_norm" else ".2f"
            )
            if key == "grad_norm":
                _set_decades(scale, self.axes[key], -3, 0)  # a log axis with no domain: NaN ticks
            self.figures[key] = _figure(
                title,
                [bars],
                [bq.Axis(scale=bars.scales["x"], label="layer (input → output)"), self.axes[key]],
            )
        self.table = w.HTML()
        self.widget = w.VBox(
            [
                w.HTML(
                    "<small>Before any training: one batch of 256 through a fresh network per "
                    "scheme (same seed, same architecture). PyTorch's <b>default</b> for Linear "
                    "is Kaiming-uniform with a=√5, std 1/√(3·fan_in): not He (std "
                    "√(2/fan_in)).</small>"
                ),
                w.HBox([self.first, self.second, self.compare]),
                w.GridBox(
                    list(self.figures.values()),
                    layout=w.Layout(grid_template_columns="repeat(3, minmax(260px, 1fr))"),
                ),
                self.table,
            ]
        )

        # Drawn at once: the tab is built when first opened, and empty figures on scales with
        # no domain fill the browser console with NaN errors.
        self.update()
        for figure in self.figures.values():
            fit_legend(figure)

    def update(self) -> dict[str, Any]:
        schemes = (self.first.value, self.second.value)
        reports = inspect_init(self.experiment, schemes)
        a, b = (reports[s] for s in schemes)
        for key, bars in self.bars.items():
            values = np.array(
                [
                    [
                        getattr(layer, key) if getattr(layer, key) is not None else np.nan
                        for layer in report.layers
                    ]
                    for report in (a, b)
                ]
            )
            values = _positive(values) if key == "grad_norm" else _finite(values)
            if key == "grad_norm":
                # Grouped bars on a log scale need explicit decades and a base on them.
                _fit_log_axis(bars.scales["y"], self.axes[key], values)
                floor = bars.scales["y"].min or 1e-3
                values = np.where(np.isfinite(values), values, floor)
            elif np.isfinite(values).any():
                # Grouped bars compute no domain of their own here either: pin it to the data.
                scale = bars.scales["y"]
                low, high = float(np.nanmin(values)), float(np.nanmax(values))
                with scale.hold_sync():
                    scale.min, scale.max = min(0.0, low * 1.1), max(high * 1.1, 1e-6)
            with bars.hold_sync():
                # Short names: nine full ones overlap under a third of the panel's width.
                bars.x = [_short(layer.name) for layer in a.layers]
                bars.labels = [f"A: {schemes[0]}", f"B: {schemes[1]}"]
                if key == "grad_norm":
                    bars.base = floor
                bars.y = np.where(np.isfinite(values), values, 0).astype(np.float32)
            if key in self.figures:  # not yet while the constructor draws the first time
                fit_legend(self.figures[key])
        rows = "".join(
            f"<tr><td>{la.name}</td><td>{la.weight_std:.4f}</td><td>{lb.weight_std:.4f}</td></tr>"
            for la, lb in zip(a.layers, b.layers)
        )
        self.table.value = (
            f"<table><tr><th>layer</th><th>weight std A</th>"
            f"<th>weight std B</th></tr>{rows}</table>"
        )
        return reports


def _short(name: str) -> str:
    """hidden3 -> h3, output -> out (the table under the figures has the full names)."""
    return name.replace("hidden", "h").replace("output", "out")
