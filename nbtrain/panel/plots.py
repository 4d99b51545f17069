"""The panel's bqplot figures: loss, accuracy and gradient flow, updated in place.

Each figure is built once; `update(view)` assigns new arrays to its marks inside
``hold_sync()`` so one refresh is one message per mark that changed. Long series are
decimated to at most `max_points` points, keeping each bucket's minimum and maximum so a
spike never disappears from the plot.

Budget: one refresh should stay under 32 KB on the wire (8 bytes a point: int32 step,
float32 value), so only the raw loss line gets `max_points`; the smoothed loss gets a
quarter of it, and the per-layer norm lines share half of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import bqplot as bq
import numpy as np
from ipywidgets import Layout
from scipy.signal import lfilter

from ..history import Event, History

TRAIN, VAL = "#1f77b4", "#ff7f0e"
# Ten, so a deep preset (the vanishing one has nine Linear layers) repeats no colour.
LAYER_COLORS = [
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#393b79",
    "#7f7f7f",
    "#e7969c",
]
MARKER_COLOR = "#555555"
# Other runs overlaid on the figures: apart from the current run's blue, orange and greens.
OVERLAY_COLORS = [
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#911eb4",
    "#f58231",
    "#42d4f4",
    "#f032e6",
    "#9a6324",
    "#808000",
    "#469990",
]
SMOOTHING = 0.9  # EMA weight of the past for the train-loss line
LEGEND_FONT_PX = 12
# The legend's box sits on top of the lines; a light fill keeps its text readable.
LEGEND_STYLE = {"fill": "white", "fill-opacity": 0.85, "stroke": "#bbbbbb"}


def decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of (x, y), keeping each bucket's min and max in order."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max_points // 2
    width = -(-n // buckets)
    # Padding repeats the last value, so an extreme found in the padding is the last point.
    padded = np.concatenate([y, np.full(buckets * width - n, y[-1])]).reshape(buckets, width)
    if np.isnan(y).any():
        low = np.where(np.isnan(padded), np.inf, padded).argmin(axis=1)
        high = np.where(np.isnan(padded), -np.inf, padded).argmax(axis=1)
    else:  # the usual case (series drop NaN): no masked copies
        low, high = padded.argmin(axis=1), padded.argmax(axis=1)
    offsets = np.arange(buckets)[:, None] * width
    index = np.sort(np.stack([low, high], axis=1), axis=1) + offsets
    index = np.minimum(index.ravel(), n - 1)
    return x[index], y[index]


def smooth(y: np.ndarray, weight: float = SMOOTHING, start: float | None = None) -> np.ndarray:
    """Exponential moving average, started at `start` or else at the first finite value (no
    bias towards zero).

    A NaN or inf point is a gap: it reads NaN and the average carries over it unchanged,
    since one inf fed to the filter would turn every later point into inf or NaN.
    """
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y)
    out = np.full(len(y), np.nan)
    if not finite.any():
        return out
    kept = y[finite]
    first = kept[0] if start is None else start
    out[finite], _ = lfilter([1 - weight], [1, -weight], kept, zi=[weight * first])
    return out


@dataclasses.dataclass
class View:
    """A consistent snapshot of what the figures draw, taken once per refresh."""

    history: History
    layer_names: list[str]
    max_points: int
    window: int = 20  # steps averaged for the gradient-flow bars

    def step_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.history.names("step"):
            return np.zeros(0, dtype=np.int32), np.zeros(0)
        return self.history.series(name, "step")

    def recent(self, name: str, n: int) -> np.ndarray:
        """The last `n` exact values of a per-step metric (empty before the first)."""
        if name not in self.history.names("step"):
            return np.zeros(0)
        return self.history.exact(name, "step", last=n)[1]

    def smoothed_loss(self) -> tuple[np.ndarray, np.ndarray]:
        """The EMA of the batch loss: exact over the recent steps; over folded history, each
        bucket's mean at its middle step (a bucket of many steps averages more than the EMA
        does, so nothing the EMA would show is lost at that resolution)."""
        if "train_loss" not in self.history.names("step"):
            return np.zeros(0, dtype=np.int32), np.zeros(0)
        folded = self.history.buckets("train_loss", "step")
        steps, loss = self.history.exact("train_loss", "step")
        has = folded.count > 0
        centers = (folded.first[has] + folded.last[has]) // 2
        means = folded.mean[has]
        start = means[-1] if len(means) else None
        return np.concatenate([centers, steps]), np.concatenate([means, smooth(loss, start=start)])

    def eval_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.history.names("eval"):
            return np.zeros(0, dtype=np.int32), np.zeros(0)
        return self.history.series(name, "eval")


def _eval_line(scales: dict[str, Any], color: str, label: str) -> bq.Lines:
    """A line of per-evaluation values, each a dot: there are few of them, far apart."""
    return bq.Lines(
        x=[],
        y=[],
        scales=scales,
        colors=[color],
        labels=[label],
        marker="circle",
        marker_size=16,
        display_legend=True,
        stroke_width=2,
    )


def _figure(
    title: str, marks: list, axes: list, height: str = "280px", legend: str = "top"
) -> bq.Figure:
    figure = bq.Figure(
        title=title,
        marks=marks,
        axes=axes,
        layout=Layout(width="100%", height=height, min_width="320px"),
        # right: room for half the last tick label ("1200") at the end of the step axis
        fig_margin={"top": 40, "bottom": 40, "left": 60, "right": 30},
        legend_location=legend,
        legend_text={"font-size": f"{LEGEND_FONT_PX}px"},
        animation_duration=0,
    )
    fit_legend(figure)
    return figure


def fit_legend(figure: bq.Figure, extra: list[str] | None = None) -> None:
    """Size the legend's box to its text.

    Note: bqplot makes the box (longest label + 2) em wide, about twice the text, and
    places right-hand legends by that width too; so the panel uses the top, bottom and
    left locations, whose place does not depend on it, and sets the box's width as CSS
    (which wins over the attribute) from an estimate of 0.5 em a character.
    """
    labels = [
        label
        for mark in figure.marks
        if getattr(mark, "display_legend", False)
        for label in (mark.labels or [])
    ] + list(extra or [])
    longest = max((len(label) for label in labels), default=0)
    # 8 px inside the left edge, the 15 px symbol, the text, 8 px to the right edge
    width = 8 + 15 + longest * LEGEND_FONT_PX * 0.5 + 8
    figure.legend_style = {**LEGEND_STYLE, "width": f"{width:.0f}px"}


def _finite(values: np.ndarray) -> np.ndarray:
    """float32 for the wire; inf becomes a gap (bqplot drops a line after an inf)."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(np.isfinite(values), values, np.nan)


def _positive(values: np.ndarray) -> np.ndarray:
    """A log axis cannot show zero, a negative or inf: such points become gaps."""
    values = _finite(values)
    return np.where(values > 0, values, np.nan)


class Overlay:
    """Other runs drawn over a figure: one line each, in its own colour, named in the legend.

    `update()` takes (label, colour, steps, values) per run; runs of different lengths are
    padded with gaps to one 2-D array, as a bqplot Lines mark wants.
    """

    def __init__(self, scales: dict, positive: bool = False) -> None:
        self.figure: bq.Figure | None = None  # set by the figure it is drawn on
        self.mark = bq.Lines(
            x=[], y=[], scales=scales, display_legend=True, stroke_width=1.5, opacities=[0.9]
        )
        self._clean = _positive if positive else _finite
        self.labels: list[str] = []

    def update(self, lines: list[tuple[str, str, np.ndarray, np.ndarray]]) -> None:
        with self.mark.hold_sync():
            if not lines:
                self.mark.x, self.mark.y, self.mark.labels = [], [], []
                self._set_labels([])
                return
            # At least 2 points: bqplot squeezes a 1x1 array to a scalar, which it refuses.
            width = max(2, *(len(x) for _, _, x, _ in lines))
            xs = np.zeros((len(lines), width), dtype=np.int32)
            ys = np.full((len(lines), width), np.nan, dtype=np.float32)
            for i, (_, _, x, y) in enumerate(lines):
                if len(x):
                    xs[i, : len(x)], xs[i, len(x) :] = x, x[-1]
                    ys[i, : len(y)] = self._clean(y)
            self.mark.x, self.mark.y = xs, ys
            self.mark.colors = [color for _, color, _, _ in lines]
            self.mark.labels = labels = [label for label, _, _, _ in lines]
            self._set_labels(labels)

    def _set_labels(self, labels: list[str]) -> None:
        if labels != self.labels and self.figure is not None:
            fit_legend(self.figure, labels)
        self.labels = labels


def _fit_log_axis(scale: bq.LogScale, axis: bq.Axis, values: np.ndarray) -> bool:
    """Pin a log scale to the whole decades around `values`, one tick a decade or fewer.

    Two reasons: bqplot's grouped bars compute no domain of their own on a log scale (the
    bars stay empty), and the default log ticks (1, 2, 5 each decade) overlap at this height.
    Returns whether the scale changed.
    """
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return False
    low = int(np.floor(np.log10(values.min())))
    high = max(int(np.ceil(np.log10(values.max()))), low + 1)
    if (scale.min, scale.max) == (10.0**low, 10.0**high):
        return False
    _set_decades(scale, axis, low, high)
    return True


def _set_decades(scale: bq.LogScale, axis: bq.Axis, low: int, high: int) -> None:
    every = -(-(high - low) // 6)  # at most about seven ticks
    with scale.hold_sync(), axis.hold_sync():
        scale.min, scale.max = 10.0**low, 10.0**high
        axis.tick_values = 10.0 ** np.arange(low, high + 1, every)


class _MarkedFigure:
    """A figure over steps whose change events are drawn as labelled vertical lines.

    A label sits right of its line, or left of it in the last 30% of the steps so that the
    newest is not cut off at the edge; labels stagger down from `label_top` (a fraction of
    the height), chosen per figure to stay clear of its legend and of where its lines run.
    """

    label_top = 0.96

    def __init__(self) -> None:
        self.x_scale = bq.LinearScale(min=0)
        self.unit = bq.LinearScale(min=0, max=1)  # markers span the height whatever the data
        self.marker_lines = bq.Lines(
            x=[],
            y=[],
            scales={"x": self.x_scale, "y": self.unit},
            colors=[MARKER_COLOR],
            line_style="dashed",
            stroke_width=1,
        )
        # Labels right of their marker, and left of it for those near the right edge.
        self.marker_labels, self.marker_labels_left = (
            bq.Label(
                x=[],
                y=[],
                text=[],
                scales={"x": self.x_scale, "y": self.unit},
                colors=[MARKER_COLOR],
                default_size=11,
                align=align,
                x_offset=offset,
            )
            for align, offset in (("start", 3), ("end", -3))
        )
        self._marked: tuple | int = 0

    def marker_texts(self) -> list[str]:
        """Every marker's label, in step order, whichever side of its line it is drawn."""
        pairs = [
            (x, text)
            for mark in (self.marker_labels, self.marker_labels_left)
            for x, text in zip(np.asarray(mark.x).tolist(), list(mark.text))
        ]
        return [text for _, text in sorted(pairs, key=lambda pair: pair[0])]

    def update_markers(self, changes: list[Event], last_step: int = 0) -> None:
        steps = np.array([event.step for event in changes], dtype=np.float32)
        left = steps > 0.7 * max(last_step, 1)
        key = (len(changes), tuple(left))
        if key == self._marked:
            return
        heights = self.label_top - 0.07 * (np.arange(len(steps)) % 5)
        texts = np.array([event.label for event in changes], dtype=object)
        with (
            self.marker_lines.hold_sync(),
            self.marker_labels.hold_sync(),
            self.marker_labels_left.hold_sync(),
        ):
            if len(steps):
                self.marker_lines.x = np.stack([steps, steps], axis=1)
                self.marker_lines.y = np.tile(np.array([0, 1], dtype=np.float32), (len(steps), 1))
            else:
                self.marker_lines.x, self.marker_lines.y = [], []
            for mark, side in ((self.marker_labels, ~left), (self.marker_labels_left, left)):
                mark.x = steps[side]
                mark.y = heights[side].astype(np.float32)
                mark.text = list(texts[side])
        self._marked = key


class LossFigure(_MarkedFigure):
    label_top = 0.68  # under the legend at the top, above a loss that has come down

    def __init__(self) -> None:
        super().__init__()
        y = bq.LinearScale()
        scales = {"x": self.x_scale, "y": y}
        self.raw = bq.Lines(
            x=[], y=[], scales=scales, colors=[TRAIN], opacities=[0.25], labels=["train (batch)"]
        )
        self.smoothed = bq.Lines(
            x=[],
            y=[],
            scales=scales,
            colors=[TRAIN],
            labels=["train (smoothed)"],
            display_legend=True,
            stroke_width=2,
        )
        self.val = _eval_line(scales, VAL, "validation")
        axes = [
            bq.Axis(scale=self.x_scale, label="step"),
            bq.Axis(scale=y, side="left", label="loss", tick_format=".2f"),
        ]
        self.overlay = Overlay(scales)
        marks = [
            self.raw,
            self.smoothed,
            self.val,
            self.overlay.mark,
            self.marker_lines,
            self.marker_labels,
            self.marker_labels_left,
        ]
        self.figure = _figure("Loss", marks, axes)
        self.overlay.figure = self.figure

    def update(self, view: View) -> None:
        steps, loss = view.step_series("train_loss")
        eval_steps, val_loss = view.eval_series("val_loss")
        x, y = decimate(steps, loss, view.max_points)
        xs, ys = decimate(*view.smoothed_loss(), view.max_points // 4)
        with self.raw.hold_sync(), self.smoothed.hold_sync(), self.val.hold_sync():
            self.raw.x, self.raw.y = x.astype(np.int32), _finite(y)
            self.smoothed.x, self.smoothed.y = xs.astype(np.int32), _finite(ys)
            self.val.x, self.val.y = eval_steps.astype(np.int32), _finite(val_loss)
        self.update_markers(view.history.markers(), int(steps[-1]) if len(steps) else 0)


class AccuracyFigure(_MarkedFigure):
    label_top = 0.62  # under accuracies near 1.0, above the legend at the bottom

    def __init__(self) -> None:
        super().__init__()
        y = bq.LinearScale(min=0, max=1)
        scales = {"x": self.x_scale, "y": y}
        self.train = _eval_line(scales, TRAIN, "train")
        self.val = _eval_line(scales, VAL, "validation")
        axes = [
            bq.Axis(scale=self.x_scale, label="step"),
            bq.Axis(scale=y, side="left", label="accuracy", tick_format=".0%"),
        ]
        self.overlay = Overlay(scales)
        marks = [
            self.train,
            self.val,
            self.overlay.mark,
            self.marker_lines,
            self.marker_labels,
            self.marker_labels_left,
        ]
        self.figure = _figure("Accuracy (full sets, eval mode)", marks, axes, legend="bottom")
        self.overlay.figure = self.figure

    def update(self, view: View) -> None:
        with self.train.hold_sync(), self.val.hold_sync():
            for mark, name in ((self.train, "train_acc"), (self.val, "val_acc")):
                steps, acc = view.eval_series(name)
                mark.x, mark.y = steps.astype(np.int32), _finite(acc)
        steps, _ = view.step_series("train_loss")
        self.update_markers(view.history.markers(), int(steps[-1]) if len(steps) else 0)


def layer_labels(layer_names: list[str], status: dict[str, str] | None) -> list[str]:
    """Layer names, with "(frozen)" or "(no gradient)" where a layer gets none: their bars
    and lines are gaps, and the label says why rather than letting them read as zero."""
    status = status or {}
    return [
        f"{name} ({status[name]})" if status.get(name, "ok") != "ok" else name
        for name in layer_names
    ]


class GradientFigures:
    """Per-layer bars (mean and max |g|, log axis) and per-layer L2 norms over steps."""

    def __init__(self, layer_names: list[str], status: dict[str, str] | None = None) -> None:
        self.layer_names = layer_names
        self.labels = labels = layer_labels(layer_names, status)
        colors = [LAYER_COLORS[i % len(LAYER_COLORS)] for i in range(len(layer_names))]
        self.bar_scale = bq.LogScale()
        # Note: bars start empty, not NaN: one NaN leaves bqplot's bars view blank for good.
        self.bars = bq.Bars(
            x=[],
            y=np.zeros((2, 0), dtype=np.float32),
            scales={"x": bq.OrdinalScale(), "y": self.bar_scale},
            type="grouped",
            colors=["#7f7f7f", "#d62728"],
            labels=["mean |g|", "max |g|"],
            display_legend=True,
            base=1e-3,  # Note: bars grow from `base`; the default 0 has no place on a log axis
        )
        self.bar_axis = bq.Axis(
            scale=self.bar_scale, side="left", label="|gradient|", tick_format=".0e"
        )
        _set_decades(self.bar_scale, self.bar_axis, -3, 0)
        self.bar_figure = _figure(
            "Gradient flow (last 20 steps)",
            [self.bars],
            [bq.Axis(scale=self.bars.scales["x"], label="layer (input → output)"), self.bar_axis],
            legend="top-left",
        )
        self.x_scale = bq.LinearScale(min=0)
        self.norm_scale = bq.LogScale()
        self.norms = bq.Lines(
            x=[],
            y=[],
            scales={"x": self.x_scale, "y": self.norm_scale},
            colors=colors,
            labels=labels,
            display_legend=True,
        )
        self.norm_axis = bq.Axis(
            scale=self.norm_scale, side="left", label="‖g‖", tick_format=".0e"
        )
        self.overlay = Overlay({"x": self.x_scale, "y": self.norm_scale}, positive=True)
        self.norm_figure = _figure(
            "Per-layer gradient L2 norm",
            [self.norms, self.overlay.mark],
            [bq.Axis(scale=self.x_scale, label="step"), self.norm_axis],
        )
        self.overlay.figure = self.norm_figure

    def set_status(self, status: dict[str, str]) -> None:
        self.labels = layer_labels(self.layer_names, status)
        with self.bars.hold_sync(), self.norms.hold_sync():
            if len(self.bars.x):
                self.bars.x = self.labels
            self.norms.labels = self.labels

    def update(self, view: View) -> None:
        if not len(view.recent("train_loss", 1)):
            if len(self.bars.x):  # a reset, or a new experiment: the last run's bars go
                with self.bars.hold_sync(), self.norms.hold_sync():
                    self.bars.x, self.bars.y = [], np.zeros((2, 0), dtype=np.float32)
                    self.norms.x, self.norms.y = [], []
            return
        means = [view.recent(f"grad_mean/{n}", view.window) for n in self.layer_names]
        maxes = [view.recent(f"grad_max/{n}", view.window) for n in self.layer_names]
        bars = np.array(
            [
                [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in stat]
                for stat in (means, maxes)
            ],
            dtype=np.float32,
        )
        # Each layer keeps its own extremes, so each line has its own x (same length).
        per_line = max(10, view.max_points // (2 * max(1, len(self.layer_names))))
        xs, ys = zip(
            *(
                decimate(*view.step_series(f"grad_norm/{name}"), per_line)
                for name in self.layer_names
            ),
            strict=True,
        )
        bars, norms = _positive(bars), _positive(np.array(ys))
        rescaled = _fit_log_axis(self.bar_scale, self.bar_axis, bars)
        with self.bars.hold_sync(), self.norms.hold_sync():
            if not len(self.bars.x):
                self.bars.x = self.labels
            if rescaled:
                self.bars.base = self.bar_scale.min
            # A layer without a finite gradient gets a flat bar (a NaN would blank the view).
            self.bars.y = np.where(np.isfinite(bars), bars, self.bar_scale.min).astype(np.float32)
            # Note: bqplot squeezes a 1x1 array to a scalar, which it refuses; so a linear
            # model (one layer) draws its norm line from its second step.
            if len(self.layer_names) > 1 or len(xs[0]) > 1:
                self.norms.x = np.array(xs, dtype=np.int32)
                self.norms.y = norms
        _fit_log_axis(self.norm_scale, self.norm_axis, norms)
