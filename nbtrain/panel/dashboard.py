"""The control panel: buttons and switches that drive an Experiment, and its live plots.

Threads: button and slider callbacks run on the kernel's main thread and only call the
engine. All display widgets (plots, status, readouts, error area) are written by
`Dashboard.refresh()` under one lock; a daemon thread calls it at most `rate` times a second
while something changed, and the engine's "run_ended" event calls it once more, so the last
state of a run reaches the notebook while the cell that ran it is still executing.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ..config import LIVE_KEYS
from ..engine import WAITING, Experiment
from ..external import Watcher
from ..optim import OWNS_LR
from .controls import MoreControls, log_bounds, lr_slider, show_on_log_slider
from .diagnosis import DiagnosisArea
from .inspect import InitInspector, InternalsView
from .plots import AccuracyFigure, GradientFigures, LossFigure, View
from .runs import RunsPanel

log = logging.getLogger(__name__)

BUTTON = w.Layout(width="92px")


def _text(value: Any) -> str:
    if value is None or value is False or (isinstance(value, float) and value == 0):
        return "off"
    if value is True:
        return "on"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _readout(value: Any, pending: Any = None, has_pending: bool = False) -> str:
    text = _text(value)
    if has_pending:
        text += f" (next boundary: {_text(pending)})"
    return f"<span style='color:#555'>in force: <b>{text}</b></span>"


class Dashboard(w.VBox):
    """A live panel for an `Experiment`, or for your own loop (a `nbtrain.watch` Watcher).

    A control that cannot act on what it drives (a switch for modules the model does not
    have, Start on your own loop) is disabled, and the notice above the plots says why.

    Parameters:
        experiment: the experiment to drive and watch, or a Watcher.
        rate: the most refreshes per second; each refresh sends at most one message per
            widget that changed, so no widget gets more than `rate` messages a second.
        max_points: the most points one plotted line carries, whatever the run's length.
    """

    def __init__(self, experiment: Experiment, *, rate: float = 5.0, max_points: int = 2000):
        if not isinstance(experiment, (Experiment, Watcher)):
            raise ValueError(
                f"experiment must be an nbtrain.Experiment or nbtrain.watch(model), "
                f"got {experiment!r:.60}"
            )
        number = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        if not number or not 0 < rate <= 10:
            raise ValueError(f"rate must be in (0, 10] refreshes per second, got {rate!r}")
        if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 10:
            raise ValueError(f"max_points must be an integer of at least 10, got {max_points!r}")
        self.experiment = experiment
        self.rate = rate
        self.max_points = max_points
        self._lock = threading.RLock()
        self._seen: tuple | None = None
        self._seen_steps = False
        self._wake = threading.Event()
        self._closed = False
        self.external = isinstance(experiment, Watcher)
        self.reasons = experiment.unavailable()
        self._syncing = False

        cfg = experiment.config
        self.status = w.HTML()
        self.progress = w.FloatProgress(min=0, max=1, layout=w.Layout(width="100%"))

        # Run controls
        self.start_button = w.Button(
            description="Start", icon="play", button_style="success", layout=BUTTON
        )
        self.pause_button = w.Button(description="Pause", icon="pause", layout=BUTTON)
        self.step_button = w.Button(description="Step", icon="step-forward", layout=BUTTON)
        self.stop_button = w.Button(
            description="Stop", icon="stop", button_style="danger", layout=BUTTON
        )
        self.reset_button = w.Button(description="Reset", icon="undo", layout=BUTTON)
        self.start_button.on_click(self._guard(lambda _: self.experiment.start()))
        self.pause_button.on_click(self._guard(self._pause_or_resume))
        self.step_button.on_click(self._guard(lambda _: self.experiment.step()))
        self.stop_button.on_click(self._guard(lambda _: self.experiment.stop()))
        self.reset_button.on_click(self._guard(lambda _: self.experiment.reset()))

        # Live switches: they express intent; the readouts beside them show what is in force.
        self.dropout_toggle = w.ToggleButton(
            value=cfg.dropout > 0,
            description="Dropout",
            icon="random",
            layout=w.Layout(width="120px"),
        )
        # Bounds hold every value the config allows, so no control shows a clamped value.
        self.dropout_rate = w.FloatSlider(
            value=cfg.dropout or 0.3,
            min=min(0.05, cfg.dropout or 0.05),
            max=max(0.9, cfg.dropout),
            step=0.05,
            description="rate",
            continuous_update=False,
            readout_format=".2f",
        )
        self.batchnorm_toggle = w.ToggleButton(
            value=cfg.batchnorm,
            description="Batch norm",
            icon="align-center",
            layout=w.Layout(width="120px"),
        )
        self.clip_toggle = w.ToggleButton(
            value=cfg.clip is not None,
            description="Clip grads",
            icon="cut",
            layout=w.Layout(width="120px"),
        )
        clip_low, clip_high = log_bounds(cfg.clip or 1.0, -2, 2)
        self.clip_norm = w.FloatLogSlider(
            value=cfg.clip or 1.0,
            base=10,
            min=clip_low,
            max=clip_high,
            step=0.1,
            description="max norm",
            continuous_update=False,
            readout_format=".2g",
        )
        self.lr_slider = lr_slider(cfg.lr)
        # Pace (a lecture's slow motion): changes how fast the run goes, never its results.
        self.speed_toggle = w.ToggleButton(
            value=cfg.speed is not None,
            description="Slow motion",
            icon="clock-o",
            layout=w.Layout(width="120px"),
        )
        self.speed_slider = w.FloatLogSlider(
            value=cfg.speed or 10.0,
            base=10,
            min=-0.5,
            max=2.5,
            step=0.1,
            description="steps/s",
            continuous_update=False,
            readout_format=".2g",
        )
        for widget in (self.speed_toggle, self.speed_slider):
            widget.observe(self._guard(self._send_speed), names="value")
        self.readouts = {name: w.HTML() for name in LIVE_KEYS}
        for widget in (self.dropout_toggle, self.dropout_rate):
            widget.observe(self._guard(self._send_dropout), names="value")
        self.batchnorm_toggle.observe(
            self._guard(lambda c: self.experiment.set(batchnorm=c["new"])), names="value"
        )
        for widget in (self.clip_toggle, self.clip_norm):
            widget.observe(self._guard(self._send_clip), names="value")
        self.lr_slider.observe(
            self._guard(lambda c: self.experiment.set(lr=c["new"])), names="value"
        )

        # Diagnosis: standing findings with their remedies, and the preset menu
        self.diagnosis = None if self.external else DiagnosisArea(experiment, self._guard)

        # Further knobs and views, in tabs below the switches (an Experiment's only)
        self.more: MoreControls | None = None
        self._internals: InternalsView | None = None
        self._inspector: InitInspector | None = None
        self._internals_at = 0.0
        if self.external:
            self.tabs = w.Tab([w.HTML(f"<small>{html.escape(self.reasons['more'])}.</small>")])
            self.tabs.titles = ("Your loop",)
        else:
            self.more = MoreControls(experiment, self._guard, self.readouts)
            # Note: the last two tabs are built when first opened; a bqplot figure drawn while
            # hidden gets a negative size and fills the browser console with errors.
            self.tabs = self.more.tab
            inspector: w.Widget = w.VBox()
            if "init_inspector" in self.reasons:
                inspector = w.HTML(
                    f"<small>{html.escape(self.reasons['init_inspector'])}.</small>"
                )
            self.tabs.children = [*self.tabs.children, w.VBox(), inspector]
            self.tabs.titles = (*self.tabs.titles[:3], "Internals", "Init inspector")
            self.tabs.observe(self._open_tab, names="selected_index")
        self._disable_what_cannot_act()

        # Plots; layers without a gradient say so in their labels
        self.loss = LossFigure()
        self.accuracy = AccuracyFigure()
        if "accuracy" in self.reasons:
            # Note: bqplot still lays out a hidden figure, at size 0; with its margins that is
            # a negative plot area, which the browser logs as an error, so they go to 0 too.
            self.accuracy.figure.layout.display = "none"
            self.accuracy.figure.fig_margin = {"top": 0, "bottom": 0, "left": 0, "right": 0}
        self.notice = w.HTML()
        self._layer_status = self._report_layers()
        self.gradients = GradientFigures(experiment.probe.layer_names, self._layer_status)

        # Runs of the session: table, overlays, fork, export, checkpoints (panel/runs.py)
        self.runs_panel = None if self.external else RunsPanel(self)

        # Failures
        self.error_area = w.HTML(layout=w.Layout(display="none"))
        self._refused: str | None = None  # a refused change, shown until a control works

        def row(*children: w.Widget) -> w.HBox:
            return w.HBox(list(children), layout=w.Layout(align_items="center"))

        buttons = row(
            self.start_button,
            self.pause_button,
            self.step_button,
            self.stop_button,
            self.reset_button,
        )
        switches = w.VBox(
            [
                row(self.dropout_toggle, self.dropout_rate, self.readouts["dropout"]),
                row(self.batchnorm_toggle, self.readouts["batchnorm"]),
                row(self.clip_toggle, self.clip_norm, self.readouts["clip"]),
                row(
                    w.Label("Learning rate", layout=w.Layout(width="120px")),
                    self.lr_slider,
                    self.readouts["lr"],
                ),
                row(self.speed_toggle, self.speed_slider),
            ]
        )
        self.plots = w.GridBox(
            self._figures(),
            layout=w.Layout(grid_template_columns="repeat(2, minmax(320px, 1fr))"),
        )
        super().__init__(
            [
                buttons,
                self.status,
                self.progress,
                switches,
                *([self.diagnosis.widget] if self.diagnosis else []),
                self.tabs,
                self.notice,
                self.error_area,
                self.plots,
                *([self.runs_panel] if self.runs_panel else []),
            ]
        )
        self.add_class("nbtrain-dashboard")

        experiment.on("run_ended", self._on_run_ended)
        self.refresh()
        self._poller = threading.Thread(
            target=_poll, args=(weakref.ref(self),), name="nbtrain-panel", daemon=True
        )
        self._poller.start()

    def _disable_what_cannot_act(self) -> None:
        """Controls for what this model or loop does not have: disabled, with the reason."""
        controls = {
            "start": [self.start_button],
            "step": [self.step_button],
            "reset": [self.reset_button],
            "dropout": [self.dropout_toggle, self.dropout_rate],
            "batchnorm": [self.batchnorm_toggle],
            "clip": [self.clip_toggle, self.clip_norm],
            "lr": [self.lr_slider],
        }
        if self.more is not None:
            controls.update(self.more.controls())
        for name, widgets in controls.items():
            reason = self.reasons.get(name)
            for widget in widgets:
                if reason:
                    widget.disabled = True
                    widget.tooltip = reason
        self._fixed_off = {
            id(widget) for name, ws in controls.items() if name in self.reasons for widget in ws
        }

    def _report_layers(self) -> dict[str, str]:
        """The layers' status before training, shown in the notice and the plots' labels."""
        try:
            report = self.experiment.report()
        except Exception as exc:  # your model fails on a batch: say so, keep the panel
            log.exception("the pre-training layer check failed")
            self.notice.value = (
                "<div style='color:#d62728;font-size:12px'><b>layer check failed</b>: "
                f"{html.escape(f'{type(exc).__name__}: {exc}')}</div>"
            )
            return {}
        lines = [
            f"<b>{html.escape(name)}</b>: {html.escape(reason)}"
            for name, reason in self.reasons.items()
            if name not in ("more", "init_inspector", "start", "step", "reset")
        ]
        if report.problems:
            names = ", ".join(f"{p.name} ({p.status})" for p in report.problems)
            lines.insert(0, f"<b>no gradient flow</b> for {html.escape(names)}: no bars for them")
        if self.external:
            lines.insert(
                0,
                "<b>your loop</b>: Start, Step and Reset are yours; Pause holds "
                "your loop in log(), Stop sets <code>should_stop</code>",
            )
        self.notice.value = (
            "<div style='color:#555;font-size:12px'>" + "<br>".join(lines) + "</div>"
            if lines
            else ""
        )
        return report.status

    def _figures(self) -> list[w.Widget]:
        """The four live figures, in order; their DOM class lets a browser test find them."""
        figures = [
            self.loss.figure,
            self.accuracy.figure,
            self.gradients.bar_figure,
            self.gradients.norm_figure,
        ]
        for figure in figures:
            figure.add_class("nbtrain-main-figure")
        return figures

    @property
    def internals(self) -> InternalsView | None:
        """The Internals tab (built on first use; None for your own loop)."""
        if self.external:
            return None
        if self._internals is None:
            self._internals = InternalsView(self.experiment)
            for widget in (self._internals.layer, self._internals.kind):
                widget.observe(lambda _: self._wake.set(), names="value")
            self._set_tab(3, self._internals.widget)
        return self._internals

    @property
    def inspector(self) -> InitInspector | None:
        """The Init inspector tab (built on first use; None where it cannot compare)."""
        if "init_inspector" in self.reasons:
            return None
        if self._inspector is None:
            self._inspector = InitInspector(self.experiment)
            self._set_tab(4, self._inspector.widget)
        return self._inspector

    def _set_tab(self, index: int, widget: w.Widget) -> None:
        children = list(self.tabs.children)
        children[index] = widget
        self.tabs.children = children

    def _open_tab(self, change: dict) -> None:
        if change["new"] == 3:
            self.internals  # noqa: B018  (builds it)
        elif change["new"] == 4:
            self.inspector  # noqa: B018
        self._wake.set()

    def __repr__(self) -> str:
        return "nbtrain.Dashboard"  # Note: nbval compares this text; no live values here.

    # Callbacks (main thread)

    def _guard(self, handler: Callable[[Any], Any]) -> Callable[[Any], None]:
        """Run a control's handler; a failure is shown in the panel and logged, not lost."""

        def guarded(arg: Any) -> None:
            if self._syncing:
                return  # attach() is showing another experiment's settings: nothing to send
            try:
                handler(arg)
            except Exception as exc:
                log.exception("panel control failed")
                self._refused = f"{type(exc).__name__}: {exc}"
                self._show_error(self._refused, kind="refused")
            else:
                self._refused = None  # the next control that works clears the notice
            self._wake.set()

        return guarded

    def _pause_or_resume(self, _: Any) -> None:
        exp = self.experiment
        if exp.state in WAITING or (self.external and exp.pause_requested):
            self.experiment.resume()
        else:
            self.experiment.pause()

    def _send_dropout(self, _: Any) -> None:
        rate = self.dropout_rate.value if self.dropout_toggle.value else 0.0
        self.experiment.set(dropout=round(rate, 4))

    def _send_speed(self, _: Any) -> None:
        self.experiment.set(speed=self.speed_slider.value if self.speed_toggle.value else None)

    def _send_clip(self, _: Any) -> None:
        self.experiment.set(clip=self.clip_norm.value if self.clip_toggle.value else None)

    def _on_run_ended(self, experiment: Experiment | Watcher, outcome: Any) -> None:
        self.refresh()

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """For your own loop: `Watcher.log` on the watcher this panel shows."""
        if not self.external:
            raise RuntimeError(
                "log() is for your own loop (nbtrain.watch(model)); an Experiment records itself"
            )
        self.experiment.log(step, **metrics)

    @property
    def should_stop(self) -> bool:
        """Stop was pressed (for your own loop to check)."""
        return bool(getattr(self.experiment, "should_stop", False))

    def attach(self, experiment: Experiment) -> None:
        """Drive `experiment` from now on: a fork, or a loaded checkpoint, of the same layers.

        The switches take its settings (sending them changes nothing, as they are in
        force); the experiment driven before keeps going if it was, and stays in the table.
        """
        if experiment.probe.layer_names != self.gradients.layer_names:
            raise ValueError(
                f"experiment must have the layers {self.gradients.layer_names} to be shown in "
                f"this panel, got {experiment.probe.layer_names}; open a new Dashboard for it"
            )
        with self._lock:
            self.experiment.off("run_ended", self._on_run_ended)
            self.experiment = experiment
            for part in (self.more, self._internals, self._inspector, self.diagnosis):
                if part is not None:
                    part.experiment = experiment
            experiment.on("run_ended", self._on_run_ended)
            live = experiment.in_force
            self._syncing = True
            try:
                self._show_settings(live)
            finally:
                self._syncing = False
            self.loss._marked = self.accuracy._marked = -1  # redraw the change markers
            self.runs_panel.reset_form()
        self.refresh()

    def _show_settings(self, live: dict[str, Any]) -> None:
        """Put the switches to `live` (sending nothing: `_syncing` holds the handlers)."""
        if live["dropout"]:
            self.dropout_rate.value = live["dropout"]
        self.dropout_toggle.value = live["dropout"] > 0
        self.batchnorm_toggle.value = live["batchnorm"]
        if live["clip"] is not None:
            show_on_log_slider(self.clip_norm, live["clip"])
        self.clip_toggle.value = live["clip"] is not None
        show_on_log_slider(self.lr_slider, live["lr"])

    # Display (any thread, serialized by the lock)

    def _fingerprint(self) -> tuple:
        exp = self.experiment
        return (
            id(exp.history),
            len(exp.history),
            exp.history.n_evals,
            len(exp.history.events),
            exp.state,
            exp.error,
            repr(exp.pending),
            self.tabs.selected_index,
            self._internals and (self._internals.layer.value, self._internals.kind.value),
            id(exp.internals),
            tuple((f.challenge, f.evidence) for f in exp.findings),
            self.runs_panel.fingerprint() if self.runs_panel else None,
        )

    def refresh(self) -> None:
        """Bring every display widget up to date with the experiment, now."""
        with self._lock:
            self._seen = self._fingerprint()
            exp = self.experiment
            if exp.probe.layer_names != self.gradients.layer_names:  # restarted, new depth
                self._layer_status = self._report_layers()
                self.gradients = GradientFigures(exp.probe.layer_names, self._layer_status)
                self.plots.children = self._figures()
                if self._internals is not None:
                    self._internals.layer.options = exp.probe.layer_names
            elif self.external and len(exp.history) and not self._seen_steps:
                # Your loop: unused layers are known once gradients arrive.
                self._seen_steps = True
                self._layer_status = self._report_layers()
                self.gradients.set_status(self._layer_status)
            view = View(exp.history, exp.probe.layer_names, self.max_points)
            self.loss.update(view)
            self.accuracy.update(view)
            self.gradients.update(view)
            if self.runs_panel is not None:
                self.runs_panel.refresh()
            self._update_status()
            self._update_controls()
            if self.more is not None:
                self.more.show_in_force()
            if self.diagnosis is not None:
                self.diagnosis.update()
            now = time.perf_counter()
            if (
                self.tabs.selected_index == 3
                and self._internals is not None
                and now - self._internals_at >= 1 / InternalsView.rate
            ):
                self._internals_at = now
                self._internals.update()
            if exp.error:
                # Your loop diverged while it still runs: nbtrain reports it (Watcher).
                diverged = exp.state == "diverged" or getattr(exp, "diverged_at", None)
                self._show_error(exp.error, "diverged" if diverged else "failed")
            elif self._refused:
                self._show_error(self._refused, kind="refused")
            elif self.error_area.layout.display != "none":
                self.error_area.layout.display = "none"

    def _update_status(self) -> None:
        exp = self.experiment
        rate = exp.steps_per_second
        parts = [f"<b>{exp.state}</b>"]
        if not self.external:
            parts.append(f"epoch {exp.epoch_count}/{exp.target_epoch or exp.config.epochs}")
        parts.append(f"step {exp.step_count}")
        diverged_at = getattr(exp, "diverged_at", None)
        if diverged_at is not None and exp.state != "diverged":
            parts.append(f"diverged at step {diverged_at}")
        if rate:
            parts.append(f"{rate:,.0f} steps/s")
        val = exp.history.last("val_acc")
        if val is not None:
            parts.append(f"val acc {val:.3f}")
        elif exp.history.last("val_loss") is not None:
            parts.append(f"val loss {exp.history.last('val_loss'):.4g}")
        self.status.value = " · ".join(parts)
        with self.progress.hold_sync():  # one message for both traits
            self.progress.value = exp.progress
            styles = {"failed": "danger", "diverged": "warning", "finished": "success"}
            self.progress.bar_style = styles.get(exp.state, "warning" if diverged_at else "")

    def _update_controls(self) -> None:
        exp = self.experiment
        running, paused = exp.running, exp.state in WAITING
        off = self._fixed_off
        self.start_button.disabled = (running and not paused) or id(self.start_button) in off
        with self.pause_button.hold_sync():  # one message for the three traits
            self.pause_button.disabled = not running
            self.pause_button.description = "Resume" if paused else "Pause"
            self.pause_button.icon = "play" if paused else "pause"
        self.step_button.disabled = (running and not paused) or id(self.step_button) in off
        self.stop_button.disabled = not running
        pending = exp.pending
        for name, value in exp.in_force.items():
            self.readouts[name].value = _readout(value, pending.get(name), name in pending)
        self.lr_slider.disabled = exp.config.schedule in OWNS_LR or id(self.lr_slider) in off
        if self.more is not None:  # a restart can change which blocks a skip can bridge
            self.more.skip.disabled = "skip" in exp.unavailable()

    def _show_error(self, text: str, kind: str = "failed") -> None:
        """Show a run's failure or divergence, or a control's refused change (`kind`)."""
        with self._lock:
            body = html.escape(text)
            titles = {
                "diverged": "The run diverged.</b> The last finite weights are kept. Lower the "
                "learning rate or switch clipping on, then Resume (or Start); or Reset.",
                "failed": "The run failed.</b> The model and history are kept; Reset or Start "
                "again.",
                "refused": "That change was refused.</b> Nothing was changed; the run is as "
                "it was.",
            }
            if self.external:  # your loop: nbtrain neither refuses its steps nor restarts it
                titles["diverged"] = (
                    "Your loop diverged.</b> Its optimizer took the non-finite step. Stop it "
                    "(should_stop), lower the learning rate or clip, and run it again."
                )
                titles["failed"] = "The run failed.</b> The model and history are kept."
            title = titles[kind]
            self.error_area.value = (
                "<div style='border-left:4px solid #d62728;padding:4px 8px;background:#fff5f5'>"
                f"<b>{title}"
                f"<pre style='white-space:pre-wrap;font-size:11px'>{body}</pre></div>"
            )
            self.error_area.layout.display = "block"

    def close(self) -> None:
        # Note: also called on a panel whose __init__ refused its arguments half-way.
        self._closed = True
        if hasattr(self, "_wake"):
            self._wake.set()
            with contextlib.suppress(ValueError):
                self.experiment.off("run_ended", self._on_run_ended)
        super().close()


def _poll(ref: weakref.ref[Dashboard]) -> None:
    """Refresh the panel when the experiment changed, at most `rate` times a second."""
    last = 0.0
    while True:
        dash = ref()
        if dash is None or dash._closed:
            return
        period, wake = 1.0 / dash.rate, dash._wake
        try:
            if dash._fingerprint() != dash._seen:
                last = time.perf_counter()
                dash.refresh()
                period = max(period, 2 * (time.perf_counter() - last))  # never saturate a core
        except Exception:
            log.exception("panel refresh failed")
        del dash  # hold no reference while waiting, so a closed panel can be collected
        wake.wait(period)  # a click wakes the panel early...
        wake.clear()
        time.sleep(max(0.0, last + period - time.perf_counter()))  # ...but never above the rate
