"""The panel's tabs of further knobs: optimization, regularization, architecture.

Each control sends one `Experiment.set()` (or, for what needs a new network, a restart)
and never writes display widgets itself; the dashboard's refresh shows what is in force.
Every widget carries the bounds or choices that make a bad value impossible to send.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ..config import ACTIVATIONS, INITS, OPTIMIZERS, SCHEDULES
from ..engine import Experiment
from ..model import funnel_widths

WIDE = w.Layout(width="320px")
LABEL = w.Layout(width="120px")
Guard = Callable[[Callable[[Any], Any]], Callable[[Any], None]]


def log_bounds(value: float, low: int, high: int) -> tuple[int, int]:
    """A log slider's exponent range, widened to hold `value` so it is never clamped."""
    exponent = math.log10(value)
    return min(low, math.floor(exponent)), max(high, math.ceil(exponent))


def lr_slider(value: float) -> w.FloatLogSlider:
    """The learning-rate slider: 1e-5 to 1 on a log scale, widened to hold `value`."""
    low, high = log_bounds(value, -5, 0)
    return w.FloatLogSlider(
        value=value,
        base=10,
        min=low,
        max=high,
        step=0.25,
        description="lr",
        continuous_update=False,
        readout_format=".1e",
    )


def show_on_log_slider(slider: w.FloatLogSlider, value: float) -> None:
    """Put `value` on `slider`, widening its range first: a log slider clamps what is
    outside it, and a clamped value would be sent back as a change nobody asked for."""
    low, high = log_bounds(value, int(slider.min), int(slider.max))
    slider.min, slider.max = min(slider.min, low), max(slider.max, high)
    slider.value = value


def _row(label: str, *children: w.Widget) -> w.HBox:
    return w.HBox([w.Label(label, layout=LABEL), *children], layout=w.Layout(align_items="center"))


def parse_widths(text: str) -> tuple[int, ...]:
    """'128-64-32' or '128, 64, 32' -> (128, 64, 32)."""
    parts = [p for p in text.replace(",", "-").replace(" ", "-").split("-") if p]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if not widths:
        raise ValueError(f"hidden widths must be whole numbers like 128-64-32, got {text!r}")
    return widths


class MoreControls:
    """Optimization, regularization and architecture controls, as one ipywidgets Tab."""

    def __init__(self, experiment: Experiment, guard: Guard, readouts: dict[str, w.HTML]) -> None:
        self.experiment = experiment
        cfg = experiment.config
        send = self._sender(guard)

        # Optimization ("custom" is the optimizer you passed, when you passed one)
        custom = ("custom",) if cfg.optimizer == "custom" else ()
        self.optimizer = w.Dropdown(
            options=(*OPTIMIZERS, *custom), value=cfg.optimizer, layout=WIDE
        )
        self.schedule = w.Dropdown(options=SCHEDULES, value=cfg.schedule, layout=WIDE)
        n_train = experiment.n_train or cfg.batch_size
        self.batch_size = w.BoundedIntText(
            value=cfg.batch_size,
            min=1,
            max=max(n_train, cfg.batch_size),
            layout=WIDE,  # never clamp the config
        )
        self.batch_presets = w.ToggleButtons(
            options=[32, 64, 128], value=None, style={"button_width": "60px"}
        )
        send(self.optimizer, "optimizer")
        send(self.schedule, "schedule")
        send(self.batch_size, "batch_size")
        self.batch_presets.observe(guard(self._preset_batch), names="value")
        optimization = w.VBox(
            [
                _row("Optimizer", self.optimizer, readouts["optimizer"]),
                _row("LR schedule", self.schedule, readouts["schedule"]),
                _row("Batch size", self.batch_size, self.batch_presets, readouts["batch_size"]),
                w.HTML(
                    "<small>Batch size changes at the next epoch boundary; switching the "
                    "optimizer resets its state (moments start from zero).</small>"
                ),
            ]
        )

        # Regularization
        wd_low, wd_high = log_bounds(cfg.weight_decay or 1e-4, -6, -1)
        self.weight_decay = w.FloatLogSlider(
            value=cfg.weight_decay or 1e-4,
            base=10,
            min=wd_low,
            max=wd_high,
            step=0.25,
            continuous_update=False,
            readout_format=".0e",
        )
        self.weight_decay_on = w.ToggleButton(
            value=cfg.weight_decay > 0, description="L2", layout=w.Layout(width="60px")
        )
        l1_low, l1_high = log_bounds(cfg.l1 or 1e-5, -7, -2)
        self.l1 = w.FloatLogSlider(
            value=cfg.l1 or 1e-5,
            base=10,
            min=l1_low,
            max=l1_high,
            step=0.25,
            continuous_update=False,
            readout_format=".0e",
        )
        self.l1_on = w.ToggleButton(
            value=cfg.l1 > 0, description="L1", layout=w.Layout(width="60px")
        )
        self.patience = w.BoundedIntText(
            value=cfg.patience if cfg.patience is not None else 5,
            min=0,
            max=max(1000, cfg.patience or 0),
            layout=w.Layout(width="90px"),
        )
        self.early_on = w.ToggleButton(
            value=cfg.patience is not None,
            description="Early stop",
            layout=w.Layout(width="100px"),
        )
        self.min_delta = w.BoundedFloatText(
            value=cfg.min_delta,
            min=0,
            max=max(10, cfg.min_delta),
            step=0.001,
            description="min Δ",
            layout=w.Layout(width="160px"),
        )
        self.restore_best = w.Checkbox(value=cfg.restore_best, description="restore best")
        self.augment = w.ToggleButton(
            value=cfg.augment,
            description="Augment",
            disabled=experiment.data.image_shape is None,
            tooltip="shifts of up to one pixel and noise (images)",
        )
        for widget in (self.weight_decay, self.weight_decay_on):
            widget.observe(guard(self._send_weight_decay), names="value")
        for widget in (self.l1, self.l1_on):
            widget.observe(guard(self._send_l1), names="value")
        for widget in (self.patience, self.early_on):
            widget.observe(guard(self._send_patience), names="value")
        send(self.min_delta, "min_delta")
        send(self.restore_best, "restore_best")
        send(self.augment, "augment")
        self.weight_decay_style = w.HTML()
        regularization = w.VBox(
            [
                _row(
                    "Weight decay",
                    self.weight_decay_on,
                    self.weight_decay,
                    readouts["weight_decay"],
                ),
                self.weight_decay_style,
                _row("L1 penalty", self.l1_on, self.l1, readouts["l1"]),
                _row(
                    "Early stopping",
                    self.early_on,
                    self.patience,
                    self.min_delta,
                    self.restore_best,
                    readouts["patience"],
                ),
                _row("Augmentation", self.augment, readouts["augment"]),
            ]
        )

        # Architecture: live switches, then what needs a restart
        self.activation = w.Dropdown(options=ACTIVATIONS, value=cfg.activation, layout=WIDE)
        reasons = experiment.unavailable()
        self.skip = w.ToggleButton(
            value=cfg.skip,
            description="Skip connections",
            disabled="skip" in reasons,
            layout=w.Layout(width="160px"),
            tooltip="residual x + f(x) on blocks of equal input and output width",
        )
        skip_reason = f" <small>({reasons['skip']})</small>" if "skip" in reasons else ""
        send(self.activation, "activation")
        send(self.skip, "skip")
        self.hidden = w.Text(value="-".join(map(str, cfg.hidden)), layout=w.Layout(width="200px"))
        self.suggest = w.Button(
            description="Suggest funnel",
            tooltip="widths of the order of the input features, halving",
        )
        self.init = w.Dropdown(options=INITS, value=cfg.init, layout=w.Layout(width="200px"))
        self.restart_button = w.Button(
            description="Restart with these", icon="refresh", button_style="warning"
        )
        self.suggest.on_click(guard(self._suggest))
        self.restart_button.on_click(guard(self._restart))
        architecture = w.VBox(
            [
                _row("Activation", self.activation, readouts["activation"]),
                _row("Skip", self.skip, readouts["skip"], w.HTML(skip_reason)),
                w.HTML("<b>Restart</b> <small>(a new network: the history starts over)</small>"),
                _row("Hidden widths", self.hidden, self.suggest),
                _row("Initialization", self.init, self.restart_button),
            ]
        )

        self.tab = w.Tab([optimization, regularization, architecture])
        for index, title in enumerate(("Optimization", "Regularization", "Architecture")):
            self.tab.set_title(index, title)

    def controls(self) -> dict[str, list[w.Widget]]:
        """The widgets of each knob that may be unavailable (see Experiment.unavailable)."""
        return {
            "batch_size": [self.batch_size, self.batch_presets],
            "augment": [self.augment],
            "activation": [self.activation],
            "skip": [self.skip],
            "hidden": [self.hidden, self.suggest, self.init, self.restart_button],
        }

    def _sender(self, guard: Guard) -> Callable[[w.ValueWidget, str], None]:
        def send(widget: w.ValueWidget, name: str) -> None:
            widget.observe(
                guard(lambda change: self.experiment.set(**{name: change["new"]})), names="value"
            )

        return send

    def _preset_batch(self, change: dict) -> None:
        if change["new"] is not None:
            self.batch_size.value = change["new"]

    def _send_weight_decay(self, _: Any) -> None:
        value = self.weight_decay.value if self.weight_decay_on.value else 0.0
        self.experiment.set(weight_decay=value)

    def _send_l1(self, _: Any) -> None:
        self.experiment.set(l1=self.l1.value if self.l1_on.value else 0.0)

    def _send_patience(self, _: Any) -> None:
        self.experiment.set(patience=self.patience.value if self.early_on.value else None)

    def _suggest(self, _: Any) -> None:
        depth = len(parse_widths(self.hidden.value))
        widths = funnel_widths(self.experiment.data.n_features, depth)
        self.hidden.value = "-".join(map(str, widths))

    def _restart(self, _: Any) -> None:
        self.experiment.restart(hidden=parse_widths(self.hidden.value), init=self.init.value)

    def show_in_force(self) -> None:
        """The text that explains how L2 is applied by the optimizer in force."""
        self.weight_decay_style.value = (
            f"<small>L2 with {self.experiment.config.optimizer}: "
            f"{self.experiment.weight_decay_style}</small>"
        )
