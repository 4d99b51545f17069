"""The Playground panel: data, feature and layer controls, the live picture, a Dashboard.

The picture is the decision boundary of a 2-D classifier (`Playground`) or the fitted curve
of a 1-D regression (`RegressionPlayground`). Threads, as in `dashboard.py`: control
callbacks run on the kernel's main thread and only call `restart`. Every write to the
picture goes through `refresh()` under one lock; a daemon thread calls it at the
dashboard's rate while the step count moved. The forward pass itself runs in the training
thread, between two steps (`Playground.grid`, `RegressionPlayground.curve`), and this thread
waits for it."""

from __future__ import annotations

import html
import logging
import threading
import time
import weakref
from typing import Any

import bqplot as bq
import ipywidgets as w
import numpy as np

from ..engine import Experiment
from ..playground import DATASETS, FEATURES, Curve, Grid, Playground, RegressionPlayground
from .dashboard import Dashboard

log = logging.getLogger(__name__)

# The Playground's colours: orange for class 0, blue for class 1, near-white between.
CLASS_COLORS = ["#f59322", "#0877bd"]
BOUNDARY_COLORS = ["#f59322", "#e8eaeb", "#0877bd"]
# The hidden-layer widths the width slider offers (with the playground's own, if others).
WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class BoundaryFigure:
    """The class-1 probability as a heat map, training (white rim) and validation (black rim)
    points over it, all in the raw x1, x2 coordinates."""

    def __init__(self) -> None:
        self.x_scale, self.y_scale = bq.LinearScale(), bq.LinearScale()
        xy = {"x": self.x_scale, "y": self.y_scale}
        self.heat = bq.HeatMap(
            x=np.zeros(2),
            y=np.zeros(2),
            color=np.full((2, 2), 0.5),
            scales={**xy, "color": bq.ColorScale(colors=BOUNDARY_COLORS, min=0, max=1)},
        )
        point_colors = bq.ColorScale(colors=CLASS_COLORS, min=0, max=1)
        self.train, self.val = (
            bq.Scatter(
                x=[],
                y=[],
                color=[],
                scales={**xy, "color": point_colors},
                stroke=rim,
                default_size=28,
            )
            for rim in ("white", "black")
        )
        axes = [
            bq.Axis(scale=self.x_scale, label="x1"),
            bq.Axis(scale=self.y_scale, side="left", label="x2"),
        ]
        self.figure = bq.Figure(
            title="Decision boundary",
            marks=[self.heat, self.train, self.val],
            axes=axes,
            layout=w.Layout(width="420px", height="420px"),
            fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 20},
            animation_duration=0,
        )
        self.figure.add_class("nbtrain-boundary")
        # A caption, not a legend: a legend would cover points, and would show its markers in
        # the colour scale's first colour rather than as rims.
        self.caption = w.HTML(
            "<span style='color:#555;font-size:12px'>colour: the probability of the blue "
            "class · white rim: training point · black rim: validation point</span>"
        )
        self.widget = w.VBox([self.figure, self.caption])

    def show_points(self, playground: Playground) -> None:
        """The points of the playground's current dataset, split as the engine split them."""
        (x1, x2) = playground.axes
        with self.x_scale.hold_sync(), self.y_scale.hold_sync():
            self.x_scale.min, self.x_scale.max = float(x1[0]), float(x1[-1])
            self.y_scale.min, self.y_scale.max = float(x2[0]), float(x2[-1])
        for mark, index in (
            (self.train, playground.train_index),
            (self.val, playground.val_index),
        ):
            with mark.hold_sync():
                mark.x, mark.y = playground.x[index, 0], playground.x[index, 1]
                mark.color = playground.y[index].astype(np.float32)

    def show_grid(self, grid: Grid) -> None:
        with self.heat.hold_sync():
            self.heat.x, self.heat.y = grid.x1, grid.x2
            self.heat.color = grid.prob.astype(np.float32)
        self.figure.title = f"Decision boundary at step {grid.step}"


class CurveFigure:
    """A 1-D regression: the model's curve over a dense grid of x, the training (blue) and
    validation (orange) points over it, in the data's own units.

    The y axis is fixed to the data's range with a margin, so a curve that swings between
    the points (overfitting) is seen to leave the picture rather than squash the points.
    """

    def __init__(self) -> None:
        self.x_scale, self.y_scale = bq.LinearScale(), bq.LinearScale()
        xy = {"x": self.x_scale, "y": self.y_scale}
        self.line = bq.Lines(
            x=np.zeros(2, dtype=np.float32),
            y=np.zeros(2, dtype=np.float32),
            scales=xy,
            colors=["#333333"],
            stroke_width=2.5,
        )
        self.train, self.val = (
            bq.Scatter(x=[], y=[], scales=xy, colors=[color], stroke="white", default_size=32)
            for color in CLASS_COLORS[::-1]
        )
        self.figure = bq.Figure(
            title="Fitted curve",
            marks=[self.line, self.train, self.val],
            axes=[
                bq.Axis(scale=self.x_scale, label="x"),
                bq.Axis(scale=self.y_scale, side="left", label="y"),
            ],
            layout=w.Layout(width="520px", height="340px"),
            fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 20},
            animation_duration=0,
        )
        self.figure.add_class("nbtrain-curve")
        self.caption = w.HTML(
            "<span style='color:#555;font-size:12px'>line: the model's prediction · "
            f"<span style='color:{CLASS_COLORS[1]}'>●</span> training point · "
            f"<span style='color:{CLASS_COLORS[0]}'>●</span> validation point</span>"
        )
        self.widget = w.VBox([self.figure, self.caption])

    def show_points(self, playground: RegressionPlayground) -> None:
        """The playground's points, split as the engine split them, and the axes over them."""
        low, high = float(playground.y.min()), float(playground.y.max())
        pad = 0.25 * (high - low)
        with self.x_scale.hold_sync(), self.y_scale.hold_sync():
            self.x_scale.min = float(playground.curve_x[0])
            self.x_scale.max = float(playground.curve_x[-1])
            self.y_scale.min, self.y_scale.max = low - pad, high + pad
        for mark, index in (
            (self.train, playground.train_index),
            (self.val, playground.val_index),
        ):
            with mark.hold_sync():
                mark.x, mark.y = playground.x[index, 0], playground.y[index]

    def show_curve(self, curve: Curve) -> None:
        with self.line.hold_sync():
            self.line.x, self.line.y = curve.x, curve.y.astype(np.float32)
        self.figure.title = f"Fitted curve at step {curve.step}"


class PlaygroundPanel(w.VBox):
    """Data and network controls, the live picture of the model, and the full Dashboard.

    For a `Playground`: dataset, noise, size, split and feature switches over the decision
    boundary. For a `RegressionPlayground`: noise, size and split over the fitted curve.
    For both, the number of hidden layers and their width (layers of equal width; a funnel
    is ``hidden=`` in code or the dashboard's Architecture tab). Each of these changes is a
    new experiment (`restart`), shown in the same panel.

    Parameters:
        playground: what to show and drive.
        rate: the most picture updates per second (the dashboard's rate by default, 10).
    """

    def __init__(self, playground: Playground | RegressionPlayground, *, rate: float = 10.0):
        if not isinstance(playground, (Playground, RegressionPlayground)):
            raise ValueError(
                "playground must be an nbtrain Playground or RegressionPlayground, "
                f"got {playground!r:.60}"
            )
        self.playground = playground
        self.regression = isinstance(playground, RegressionPlayground)
        self.dashboard = Dashboard(playground.experiment, rate=rate)
        self.rate = rate
        # One picture or the other: the boundary of a classifier, the curve of a regression.
        self.boundary = None if self.regression else BoundaryFigure()
        self.curve = CurveFigure() if self.regression else None
        self.view: BoundaryFigure | CurveFigure = self.curve or self.boundary
        self.update_seconds: list[float] = []  # the last updates' cost, forward pass included
        self._lock = threading.RLock()
        self._seen: tuple | None = None
        self._points_for: tuple[np.ndarray, np.ndarray] | None = None
        self._wake = threading.Event()
        self._closed = False
        self._syncing = False

        # Data and feature controls: each change is a new experiment (Playground.restart).
        # Bounds widen to hold the playground's own values, so no control shows a clamped one.
        style = {"description_width": "90px"}
        pg = playground
        self.dataset = w.Dropdown(
            options=("sine",) if self.regression else DATASETS, value=pg.dataset,
            description="dataset", disabled=self.regression, style=style,
        )  # fmt: skip
        self.noise = w.FloatSlider(
            value=pg.noise, min=0, max=1.0 if self.regression else max(0.5, pg.noise),
            step=0.01, description="noise", continuous_update=False, style=style,
        )  # fmt: skip
        low, high, step = (10, 500, 10) if self.regression else (50, 1000, 50)
        self.n_samples = w.IntSlider(
            value=pg.n_samples, min=min(low, pg.n_samples), max=max(high, pg.n_samples),
            step=step, description="samples", continuous_update=False, style=style,
        )  # fmt: skip
        self.val_fraction = w.FloatSlider(
            value=pg.val_fraction, min=0.1, max=0.9, step=0.05,
            description="validation", continuous_update=False, style=style,
        )  # fmt: skip
        self.features = {
            name: w.ToggleButton(
                value=name in pg.features, description=name, layout=w.Layout(width="80px")
            )
            for name in ([] if self.regression else FEATURES)
        }
        hidden = pg.experiment.config.hidden
        self.layers = w.IntSlider(
            value=len(hidden), min=0, max=max(4, len(hidden)), description="hidden layers",
            continuous_update=False, style=style,
        )  # fmt: skip
        self.width = w.SelectionSlider(
            options=_widths(hidden), value=hidden[0] if hidden else 8, description="width",
            continuous_update=False, disabled=not hidden, style=style,
        )  # fmt: skip
        self.message = w.HTML()
        for control in (self.dataset, self.noise, self.n_samples, self.val_fraction):
            control.observe(self._on_data_change, names="value")
        for toggle in self.features.values():
            toggle.observe(self._on_data_change, names="value")
        for control in (self.layers, self.width):
            control.observe(self._on_layers_change, names="value")

        rows = [
            w.HBox([self.dataset, self.noise]),
            w.HBox([self.n_samples, self.val_fraction]),
            w.HBox([self.layers, self.width]),
        ]
        if self.features:
            label = w.Label("features", layout=w.Layout(width="90px"))
            rows.append(w.HBox([label, *self.features.values()]))
        controls = w.VBox([*rows, self.message])
        super().__init__([controls, self.view.widget, self.dashboard])
        self.add_class("nbtrain-playground")

        pg.on_rebuild(self._on_rebuild)
        self.refresh()
        self._poller = threading.Thread(
            target=_poll, args=(weakref.ref(self),), name="nbtrain-playground", daemon=True
        )
        self._poller.start()

    def __repr__(self) -> str:
        return "nbtrain.PlaygroundPanel"  # Note: nbval compares this text; no live values.

    @property
    def experiment(self) -> Experiment:
        return self.playground.experiment

    # Callbacks (main thread)

    def _on_data_change(self, _: Any) -> None:
        if self._syncing:
            return
        changes = {
            "noise": round(self.noise.value, 4),
            "n_samples": self.n_samples.value,
            "val_fraction": round(self.val_fraction.value, 4),
        }
        if not self.regression:
            changes["dataset"] = self.dataset.value
            changes["features"] = [name for name, on in self.features.items() if on.value]
        self._restart(changes)

    def _on_layers_change(self, _: Any) -> None:
        # Only on a change of these two: a data change keeps a funnel such as 128-64-32.
        if not self._syncing:
            self._restart({"hidden": (self.width.value,) * self.layers.value})

    def _restart(self, changes: dict[str, Any]) -> None:
        try:
            self.playground.restart(**changes)
        except ValueError as exc:
            # Refused (no feature on, say): the switches go back to what is in force.
            self.message.value = f"<span style='color:#d62728'>{html.escape(str(exc))}</span>"
            self._show_settings()
            return
        self.message.value = ""
        self._wake.set()

    def _show_settings(self) -> None:
        pg = self.playground
        hidden = pg.experiment.config.hidden
        self._syncing = True
        try:
            self.dataset.value, self.noise.value = pg.dataset, pg.noise
            self.n_samples.value, self.val_fraction.value = pg.n_samples, pg.val_fraction
            for name, toggle in self.features.items():
                toggle.value = name in pg.features
            self.layers.max = max(self.layers.max, len(hidden))
            self.layers.value = len(hidden)
            if hidden:
                self.width.options = _widths(hidden)
                self.width.value = hidden[0]
            self.width.disabled = not hidden
        finally:
            self._syncing = False

    def _on_rebuild(self, experiment: Experiment) -> None:
        """Move the dashboard to the new experiment (a new one if its layers differ), and
        the controls to its settings (a restart from code changes them too)."""
        try:
            self.dashboard.attach(experiment)
        except ValueError:
            self.dashboard.close()
            self.dashboard = Dashboard(experiment, rate=self.rate)
            self.children = [*self.children[:2], self.dashboard]
        self._show_settings()
        self._wake.set()

    # Display (any thread, serialized by the lock)

    def _fingerprint(self) -> tuple:
        exp = self.experiment
        return (id(exp), id(exp.history), exp.step_count)

    def refresh(self) -> Grid | Curve:
        """Draw the model as it is now: its boundary or its curve (one forward pass)."""
        with self._lock:
            started = time.perf_counter()
            self._seen = self._fingerprint()
            split = self.playground.split  # a new experiment, or the same re-split
            if self._points_for is not split:
                self.view.show_points(self.playground)
                self._points_for = split
            if self.curve is not None:
                picture: Grid | Curve = self.playground.curve()
                self.curve.show_curve(picture)
            else:
                picture = self.playground.grid()
                self.boundary.show_grid(picture)
            self.update_seconds = [*self.update_seconds[-99:], time.perf_counter() - started]
            return picture

    def close(self) -> None:
        # Note: ipywidgets' __del__ calls this on a panel whose __init__ refused its argument.
        if hasattr(self, "_wake"):
            self._closed = True
            self._wake.set()
            self.dashboard.close()
        super().close()


def _widths(hidden: tuple[int, ...]) -> list[int]:
    """The width slider's choices: powers of two, and the playground's own widths."""
    return sorted({*WIDTHS, *hidden})


def _poll(ref: weakref.ref[PlaygroundPanel]) -> None:
    """Redraw the picture when the model moved, at most `rate` times a second."""
    while True:
        panel = ref()
        if panel is None or panel._closed:
            return
        started, period, wake = time.perf_counter(), 1.0 / panel.rate, panel._wake
        try:
            if panel._fingerprint() != panel._seen:
                panel.refresh()
                period = max(period, 2 * (time.perf_counter() - started))  # leave the core free
        except Exception:
            log.exception("playground refresh failed")
        del panel  # hold no reference while waiting, so a closed panel can be collected
        wake.wait(period)
        wake.clear()
        time.sleep(max(0.0, started + period - time.perf_counter()))
