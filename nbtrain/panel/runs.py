"""The panel's run table: every run of the session, overlays, forks, export and checkpoints.

One row per run of the dashboard's registry (`nbtrain.runs`): a checkbox that overlays the
run on the loss, accuracy and gradient-norm plots (in its own colour, named in the legend),
its name (editable), what it did differently from the baseline chosen above the table, its
best and final validation accuracy, the step of the best, and its state. Under the table:
"Fork here" with a small form of the live settings the fork starts with, export of the
ticked runs (all runs when none is ticked) to CSV, JSON and Markdown, figures to PNG and
SVG, and saving or loading a checkpoint.

Threads: like the rest of the panel, the rows' display widgets are written by `refresh()`
(under the dashboard's lock); the checkboxes, name boxes and form belong to the user.

Note: bqplot's ``Figure.save_png()``/``save_svg()`` ask the browser to render the figure and
download the file; with no frontend connected (a script, nbclient) nothing is written.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..runs import Run
from .controls import lr_slider, show_on_log_slider
from .plots import OVERLAY_COLORS, decimate, smooth

if TYPE_CHECKING:
    from .dashboard import Dashboard

COLUMNS = (
    "overlay",
    "id",
    "name",
    "vs baseline",
    "best val acc",
    "final val acc",
    "best step",
    "state",
)
WIDTHS = "64px 36px 200px minmax(160px, 1fr) 96px 96px 76px 80px"
STATE_COLORS = {
    "running": "#2ca02c",
    "paused": "#ff7f0e",
    "failed": "#d62728",
    "diverged": "#d62728",
    "finished": "#1f77b4",
}
SMALL = w.Layout(width="auto")


def _accuracy(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _progress(run: Run | None) -> tuple:
    """Cheap to read: changes whenever what a row or an overlay shows of `run` may change."""
    if run is None:
        return ()
    exp, h = run.experiment, run.history
    return (run.id, run.name, len(h), h.n_evals, len(h.events), exp.state if exp else None)


class _Row:
    """The widgets of one run's row."""

    def __init__(self, panel: RunsPanel, run: Run) -> None:
        self.run = run
        self.overlay = w.Checkbox(value=False, indent=False, layout=w.Layout(width="auto"))
        self.name = w.Text(value=run.name, continuous_update=False, layout=w.Layout(width="194px"))
        self.cells = {key: w.HTML() for key in ("id", "diff", "best", "final", "step", "state")}
        self.cells["id"].value = str(run.id)
        self._shown: tuple | None = None
        self.overlay.observe(panel._guard(lambda _: None), names="value")
        self.name.observe(
            panel._guard(lambda c: panel.registry.rename(run.id, c["new"])), names="value"
        )

    @property
    def widgets(self) -> list[w.Widget]:
        c = self.cells
        return [
            self.overlay,
            c["id"],
            self.name,
            c["diff"],
            c["best"],
            c["final"],
            c["step"],
            c["state"],
        ]

    def update(self, baseline: Run | None, current: Run | None) -> None:
        run, c = self.run, self.cells
        key = (_progress(run), _progress(baseline), run is current)
        if key == self._shown:
            return
        self._shown = key
        best = run.best()
        state = run.state
        color = STATE_COLORS.get(state, "#555")
        mark = " ◀" if run is current else ""
        values = {
            "diff": html.escape(run.diff_text(baseline)),
            "best": _accuracy(best[1] if best else None),
            "final": _accuracy(run.final()),
            "step": str(best[0]) if best else "–",
            "state": f"<span style='color:{color}'><b>{state}</b></span>{mark}",
        }
        for key, value in values.items():
            if c[key].value != value:
                c[key].value = value
        if self.name.value != run.name:  # renamed from code
            self.name.value = run.name


class RunsPanel(w.VBox):
    """The run table and its actions, for a `Dashboard`."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._guard = dashboard._guard
        self.rows: dict[int, _Row] = {}
        self._version: int | None = None
        self._overlaid: tuple | None = None
        self._names: list[tuple[int, str]] = []

        # Table
        self.baseline = w.Dropdown(description="baseline", layout=w.Layout(width="260px"))
        self.baseline.observe(self._guard(lambda _: None), names="value")
        header = [w.HTML(f"<b>{name}</b>") for name in COLUMNS]
        self.header = header
        self.grid = w.GridBox(
            header,
            layout=w.Layout(
                grid_template_columns=WIDTHS, grid_gap="2px 8px", align_items="center"
            ),
        )

        # Fork here: the live settings the fork starts with (the current ones to begin with)
        self.fork_dropout = w.FloatSlider(
            min=0,
            max=0.9,
            step=0.05,
            description="dropout",
            continuous_update=False,
            readout_format=".2f",
        )
        self.fork_batchnorm = w.Checkbox(
            description="batch norm", indent=False, layout=w.Layout(width="110px")
        )
        self.fork_clip = w.FloatText(description="clip (0 off)", layout=w.Layout(width="170px"))
        self.fork_lr = lr_slider(1e-3)
        self.fork_button = w.Button(
            description="Fork here",
            icon="code-branch",
            button_style="info",
            layout=w.Layout(width="110px"),
        )
        self.fork_button.on_click(self._guard(self._fork))
        self.reset_form()

        # Export and checkpoints
        self.path = w.Text(
            value="nbtrain-runs", description="file", layout=w.Layout(width="260px")
        )
        self.buttons = {
            name: w.Button(description=name, layout=w.Layout(width="auto"))
            for name in (
                "CSV",
                "JSON",
                "Markdown",
                "PNG",
                "SVG",
                "Save checkpoint",
                "Load checkpoint",
            )
        }
        actions = {
            "CSV": self._csv,
            "JSON": self._json,
            "Markdown": self._markdown,
            "PNG": self._png,
            "SVG": self._svg,
            "Save checkpoint": self._save,
            "Load checkpoint": self._load,
        }
        for name, handler in actions.items():
            self.buttons[name].on_click(self._guard(handler))
        self.message = w.HTML()
        self.markdown = w.Textarea(layout=w.Layout(width="100%", height="160px", display="none"))

        def row(*children: w.Widget) -> w.HBox:
            return w.HBox(
                list(children), layout=w.Layout(align_items="center", flex_flow="row wrap")
            )

        super().__init__(
            [
                w.HTML("<b>Runs</b> (tick to overlay; the name is editable)"),
                self.baseline,
                self.grid,
                row(
                    self.fork_button,
                    self.fork_dropout,
                    self.fork_batchnorm,
                    self.fork_clip,
                    self.fork_lr,
                ),
                row(self.path, *self.buttons.values()),
                self.message,
                self.markdown,
            ]
        )

    @property
    def registry(self):
        return self.dashboard.experiment.runs

    # What the table shows

    def ticked(self) -> list[Run]:
        return [row.run for row in self.rows.values() if row.overlay.value]

    def fingerprint(self) -> tuple:
        """Changes when the table or an overlay would draw something new."""
        return (
            self.registry.version,
            self.baseline.value,
            tuple(_progress(r) for r in self.ticked()),
        )

    def refresh(self) -> None:
        registry = self.registry
        names = [(run.id, run.name) for run in registry]  # a rename in code: new options
        if registry.version != self._version or names != self._names:
            self._rebuild()
            self._names = names
        baseline = self._baseline_run()
        current = self.dashboard.experiment.current_run
        for row in self.rows.values():
            row.update(baseline, current)
        self._update_overlays(current)

    def _rebuild(self) -> None:
        registry = self.registry
        runs = list(registry)
        kept = {run.id: self.rows.get(run.id) or _Row(self, run) for run in runs}
        self.rows = kept
        self.grid.children = [*self.header, *(x for row in kept.values() for x in row.widgets)]
        options = [(f"{run.id}: {run.name}", run.id) for run in runs]
        value = (
            self.baseline.value if self.baseline.value in kept else (runs[0].id if runs else None)
        )
        self.baseline.options = options
        self.baseline.value = value
        self._version = registry.version

    def _baseline_run(self) -> Run | None:
        row = self.rows.get(self.baseline.value)
        return row.run if row is not None else None

    def _update_overlays(self, current: Run | None) -> None:
        dash = self.dashboard
        key = tuple(_progress(r) for r in self.ticked() if r is not current)
        if key == self._overlaid:
            return
        self._overlaid = key
        loss, acc, grad = [], [], []
        for run in self.ticked():
            if run is current:
                continue  # already drawn in full
            color = OVERLAY_COLORS[(run.id - 1) % len(OVERLAY_COLORS)]
            h = run.history
            if "train_loss" in h.names("step"):
                steps, values = h.series("train_loss", "step")
                loss.append(
                    (
                        f"{run.name} (train)",
                        color,
                        *decimate(steps, smooth(values), dash.max_points),
                    )
                )
                steps, values = h.series("grad_norm", "step")
                grad.append(
                    (f"{run.name} (all layers)", color, *decimate(steps, values, dash.max_points))
                )
            if "val_acc" in h.names("eval"):
                acc.append((f"{run.name} (val)", color, *h.series("val_acc", "eval")))
        dash.loss.overlay.update(loss)
        dash.accuracy.overlay.update(acc)
        dash.gradients.overlay.update(grad)

    # Fork here

    def reset_form(self) -> None:
        """The form starts from the settings in force on the experiment the panel drives."""
        live = self.dashboard.experiment.in_force
        self.fork_dropout.value = live["dropout"]
        self.fork_batchnorm.value = live["batchnorm"]
        self.fork_clip.value = live["clip"] or 0.0
        show_on_log_slider(self.fork_lr, live["lr"])

    def form_changes(self) -> dict[str, Any]:
        """The form's settings that differ from what is in force."""
        live = self.dashboard.experiment.in_force
        wanted = {
            "dropout": round(self.fork_dropout.value, 4),
            "batchnorm": self.fork_batchnorm.value,
            "clip": self.fork_clip.value if self.fork_clip.value > 0 else None,
            "lr": float(self.fork_lr.value),
        }
        return {k: v for k, v in wanted.items() if v != live[k]}

    def _fork(self, _: Any) -> None:
        """Fork the driven experiment here; the panel drives the fork, the parent goes on."""
        parent = self.dashboard.experiment
        was_running = parent.running and parent.state != "paused"
        child = parent.fork(**self.form_changes())
        self.dashboard.attach(child)
        self._rebuild()
        self.rows[parent.run_id].overlay.value = True
        if was_running:
            child.start()
        self.message.value = (
            f"forked <b>{html.escape(child.current_run.name)}</b>; the panel "
            f"now drives it, run {parent.run_id} goes on and is overlaid"
        )

    # Export

    def _export_runs(self) -> list[Run]:
        return self.ticked() or list(self.registry)

    def _stem(self) -> Path:
        text = self.path.value.strip() or "nbtrain-runs"
        return Path(text).with_suffix("") if Path(text).suffix else Path(text)

    def _csv(self, _: Any) -> None:
        runs, path = self._export_runs(), self._stem().with_suffix(".csv")
        self.registry.to_csv(path, ids=[r.id for r in runs])
        self.message.value = f"wrote {html.escape(str(path))} ({len(runs)} runs, long form)"

    def _json(self, _: Any) -> None:
        runs, path = self._export_runs(), self._stem().with_suffix(".json")
        self.registry.to_json(path, ids=[r.id for r in runs])
        self.message.value = f"wrote {html.escape(str(path))} ({len(runs)} runs)"

    def _markdown(self, _: Any) -> None:
        runs = self.ticked() or [self.dashboard.experiment.current_run]
        self.markdown.value = "\n\n".join(run.summary_markdown() for run in runs)
        self.markdown.layout.display = "block"
        self.message.value = "Markdown summary below: copy it into your notes"

    def figures(self) -> dict[str, Any]:
        dash = self.dashboard
        return {
            "loss": dash.loss.figure,
            "accuracy": dash.accuracy.figure,
            "gradient-flow": dash.gradients.bar_figure,
            "gradient-norms": dash.gradients.norm_figure,
        }

    def _png(self, _: Any) -> None:
        self._figures("png")

    def _svg(self, _: Any) -> None:
        self._figures("svg")

    def _figures(self, kind: str) -> None:
        # The browser renders and downloads each file (see the module's note).
        names = []
        for name, figure in self.figures().items():
            filename = f"{self._stem().name}-{name}.{kind}"
            (figure.save_png if kind == "png" else figure.save_svg)(filename)
            names.append(filename)
        self.message.value = (
            f"asked the browser to download {', '.join(names)} (needs a live notebook frontend)"
        )

    # Checkpoints

    def _save(self, _: Any) -> None:
        path = self._stem().with_suffix(".pt")
        self.dashboard.experiment.save(path)
        self.message.value = f"saved run {self.dashboard.experiment.run_id} to {path}"

    def _load(self, _: Any) -> None:
        from ..checkpoint import objects_from
        from ..engine import Experiment

        path = self._stem().with_suffix(".pt")
        # A checkpoint of your own model (or data, loss, optimizer) needs them again: the
        # experiment the panel drives has them.
        exp = Experiment.load(path, **objects_from(path, self.dashboard.experiment))
        if exp.runs is not self.registry:
            self.registry.adopt(exp, name=exp.current_run.name, config=exp.current_run.config)
        self.dashboard.attach(exp)
        self.message.value = (
            f"loaded {path} as run {exp.run_id} at step {exp.step_count}; Start resumes it"
        )
