"""The Playground panel: dataset and feature switches, the live decision boundary, a Dashboard.

Threads, as in `dashboard.py`: control callbacks run on the kernel's main thread and only
call `Playground.restart`. Every write to the boundary figure goes through `refresh()` under
one lock; a daemon thread calls it at the dashboard's rate while the step count moved. The
grid's forward pass itself runs in the training thread, between two steps
(`Playground.grid`), and this thread waits for it.
"""

from __future__ import annotations

import html
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as w
import numpy as np

from ..engine import Experiment
from ..playground import DATASETS, FEATURES, Grid, Playground
from .dashboard import Dashboard

log = logging.getLogger(__name__)

# The Playground's colours: orange for class 0, blue for class 1, near-white between.
CLASS_COLORS = ["#f59322", "#0877bd"]
BOUNDARY_COLORS = ["#f59322", "#e8eaeb", "#0877bd"]


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
    """A 1-D regression: the data points and a model's curve over their range.

    `predict` maps inputs of shape (n, 1) to n outputs; `update()` draws it anew. This is the
    view only: an `Experiment` that trains regression (issue 6) supplies the callable.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        predict: Callable[[np.ndarray], Any],
        resolution: int = 200,
    ) -> None:
        if resolution < 2:
            raise ValueError(f"resolution must be at least 2, got {resolution!r}")
        self.predict = predict
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self.grid = np.linspace(x.min(), x.max(), resolution, dtype=np.float32)
        xs, ys = bq.LinearScale(), bq.LinearScale()
        scales = {"x": xs, "y": ys}
        self.points = bq.Scatter(
            x=x, y=np.asarray(y, dtype=np.float32), scales=scales, colors=["#555555"]
        )
        self.curve = bq.Lines(
            x=self.grid, y=np.zeros_like(self.grid), scales=scales, colors=["#d62728"]
        )
        self.figure = bq.Figure(
            title="Fitted curve",
            marks=[self.points, self.curve],
            axes=[bq.Axis(scale=xs, label="x"), bq.Axis(scale=ys, side="left")],
            layout=w.Layout(width="420px", height="300px"),
            animation_duration=0,
        )
        self.update()

    def update(self) -> np.ndarray:
        """Evaluate `predict` on the curve's points and draw them; returns the values."""
        values = np.asarray(self.predict(self.grid.reshape(-1, 1)), dtype=np.float32)
        self.curve.y = values.reshape(-1)
        return self.curve.y


class PlaygroundPanel(w.VBox):
    """Dataset, noise, size, split and feature switches; the boundary; the full Dashboard.

    Parameters:
        playground: what to show and drive.
        rate: the most boundary updates per second (the dashboard's rate by default, 10).
    """

    def __init__(self, playground: Playground, *, rate: float = 10.0) -> None:
        if not isinstance(playground, Playground):
            raise ValueError(f"playground must be an nbtrain Playground, got {playground!r:.60}")
        self.playground = playground
        self.dashboard = Dashboard(playground.experiment, rate=rate)
        self.rate = rate
        self.boundary = BoundaryFigure()
        self.update_seconds: list[float] = []  # the last updates' cost, forward pass included
        self._lock = threading.RLock()
        self._seen: tuple | None = None
        self._points_for: Experiment | None = None
        self._wake = threading.Event()
        self._closed = False
        self._syncing = False

        # Data and feature controls: each change is a new experiment (Playground.restart).
        style = {"description_width": "90px"}
        self.dataset = w.Dropdown(
            options=DATASETS, value=playground.dataset, description="dataset", style=style
        )
        self.noise = w.FloatSlider(
            value=playground.noise, min=0, max=0.5, step=0.01, description="noise",
            continuous_update=False, style=style,
        )  # fmt: skip
        self.n_samples = w.IntSlider(
            value=playground.n_samples, min=50, max=1000, step=50, description="samples",
            continuous_update=False, style=style,
        )  # fmt: skip
        self.val_fraction = w.FloatSlider(
            value=playground.val_fraction, min=0.1, max=0.9, step=0.05,
            description="validation", continuous_update=False, style=style,
        )  # fmt: skip
        self.features = {
            name: w.ToggleButton(
                value=name in playground.features, description=name, layout=w.Layout(width="80px")
            )
            for name in FEATURES
        }
        self.message = w.HTML()
        for control in (self.dataset, self.noise, self.n_samples, self.val_fraction):
            control.observe(self._on_data_change, names="value")
        for toggle in self.features.values():
            toggle.observe(self._on_data_change, names="value")

        controls = w.VBox(
            [
                w.HBox([self.dataset, self.noise]),
                w.HBox([self.n_samples, self.val_fraction]),
                w.HBox(
                    [w.Label("features", layout=w.Layout(width="90px")), *self.features.values()]
                ),
                self.message,
            ]
        )
        super().__init__([controls, self.boundary.widget, self.dashboard])
        self.add_class("nbtrain-playground")

        playground.on_rebuild(self._on_rebuild)
        self.refresh()
        self._poller = threading.Thread(
            target=_poll, args=(weakref.ref(self),), name="nbtrain-boundary", daemon=True
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
        features = [name for name, toggle in self.features.items() if toggle.value]
        try:
            self.playground.restart(
                dataset=self.dataset.value,
                noise=round(self.noise.value, 4),
                n_samples=self.n_samples.value,
                val_fraction=round(self.val_fraction.value, 4),
                features=features,
            )
        except ValueError as exc:
            # Refused (no feature on, say): the switches go back to what is in force.
            self.message.value = f"<span style='color:#d62728'>{html.escape(str(exc))}</span>"
            self._show_settings()
            return
        self.message.value = ""
        self._wake.set()

    def _show_settings(self) -> None:
        pg = self.playground
        self._syncing = True
        try:
            self.dataset.value, self.noise.value = pg.dataset, pg.noise
            self.n_samples.value, self.val_fraction.value = pg.n_samples, pg.val_fraction
            for name, toggle in self.features.items():
                toggle.value = name in pg.features
        finally:
            self._syncing = False

    def _on_rebuild(self, experiment: Experiment) -> None:
        """Move the dashboard to the new experiment (a new one if its layers differ)."""
        try:
            self.dashboard.attach(experiment)
        except ValueError:
            self.dashboard.close()
            self.dashboard = Dashboard(experiment, rate=self.rate)
            self.children = [*self.children[:2], self.dashboard]
        self._wake.set()

    # Display (any thread, serialized by the lock)

    def _fingerprint(self) -> tuple:
        exp = self.experiment
        return (id(exp), id(exp.history), exp.step_count)

    def refresh(self) -> Grid:
        """Draw the boundary of the model as it is now (one forward pass over the grid)."""
        with self._lock:
            started = time.perf_counter()
            self._seen = self._fingerprint()
            if self._points_for is not self.experiment:
                self.boundary.show_points(self.playground)
                self._points_for = self.experiment
            grid = self.playground.grid()
            self.boundary.show_grid(grid)
            self.update_seconds = [*self.update_seconds[-99:], time.perf_counter() - started]
            return grid

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.dashboard.close()
        super().close()


def _poll(ref: weakref.ref[PlaygroundPanel]) -> None:
    """Redraw the boundary when the model moved, at most `rate` times a second."""
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
            log.exception("boundary refresh failed")
        del panel  # hold no reference while waiting, so a closed panel can be collected
        wake.wait(period)
        wake.clear()
        time.sleep(max(0.0, started + period - time.perf_counter()))
