"""The diagnosis area: one card per challenge, shown while its finding stands.

Cards and their remedy buttons are built once, when the panel is; the refresh only shows or
hides a card and rewrites its text, so no widget is created from the refresh thread.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ..challenges import PRESETS
from ..diagnosis import DETECTORS, Detector, Remedy
from ..engine import Experiment

Guard = Callable[[Callable[[Any], Any]], Callable[[Any], None]]
COLORS = {
    "exploding": "#d62728",
    "vanishing": "#9467bd",
    "overfitting": "#ff7f0e",
    "underfitting": "#8c564b",
    "slow": "#17becf",
}


class _Card:
    def __init__(self, detector: Detector, area: DiagnosisArea, guard: Guard) -> None:
        experiment = area.experiment
        self.detector = detector
        self.text = w.HTML()
        self.buttons: list[w.Button] = []
        for index, remedy in enumerate(detector.remedies(experiment)):
            button = w.Button(
                description=remedy.label,
                tooltip=remedy.label,
                layout=w.Layout(width="auto"),
                button_style="warning" if remedy.restart else "info",
            )
            # Remedies depend on the run (its lr, its widths): look them up at click time,
            # on the experiment the panel drives then (a fork, after "Fork here").
            button.on_click(guard(lambda _, i=index: self._apply(area.experiment, i)))
            self.buttons.append(button)
        color = COLORS.get(detector.challenge, "#555")
        self.box = w.VBox(
            [self.text, w.HBox(self.buttons, layout=w.Layout(flex_flow="row wrap"))],
            layout=w.Layout(
                display="none", border_left=f"4px solid {color}", padding="2px 8px", margin="4px 0"
            ),
        )

    def show_remedies(self, remedies: tuple[Remedy, ...]) -> None:
        """Label the buttons with the finding's remedies (a diverged run's restart)."""
        for button, remedy in zip(self.buttons, remedies):
            if button.description != remedy.label:
                button.description = button.tooltip = remedy.label
                button.button_style = "warning" if remedy.restart else "info"

    def _apply(self, experiment: Experiment, index: int) -> None:
        remedies = self.detector.remedies(experiment)
        remedies[min(index, len(remedies) - 1)].apply(experiment)


class DiagnosisArea:
    """Standing findings with their evidence, explanation and remedy buttons; and the
    preset menu that loads a challenge."""

    def __init__(self, experiment: Experiment, guard: Guard) -> None:
        self.experiment = experiment
        self.cards = {d.challenge: _Card(d, self, guard) for d in DETECTORS}
        self.preset = w.Dropdown(
            options=list(PRESETS),
            value=experiment.preset,
            description="Preset",
            layout=w.Layout(width="260px"),
        )
        self.load = w.Button(
            description="Load preset",
            icon="flask",
            tooltip="start over as this preset (a new run)",
        )
        self.load.on_click(guard(lambda _: self._load()))
        self.recipe = w.HTML()
        self.preset.observe(lambda _: self._describe(), names="value")
        self._describe()
        self.none = w.HTML("<small>No training challenge detected.</small>")
        self.widget = w.VBox(
            [
                w.HBox(
                    [self.preset, self.load, self.recipe], layout=w.Layout(align_items="center")
                ),
                self.none,
                *(card.box for card in self.cards.values()),
            ]
        )

    def _describe(self) -> None:
        preset = PRESETS.get(self.preset.value) if self.preset.value else None
        self.recipe.value = f"<small>{html.escape(preset.recipe)}</small>" if preset else ""

    def _load(self) -> None:
        if self.preset.value:
            self.experiment.load_preset(self.preset.value)

    def update(self) -> None:
        """Show the standing findings (refresh thread)."""
        standing = {f.challenge: f for f in self.experiment.findings}
        for challenge, card in self.cards.items():
            finding = standing.get(challenge)
            if finding is None:
                if card.box.layout.display != "none":
                    card.box.layout.display = "none"
                continue
            card.text.value = (
                f"<b>{html.escape(finding.title)}</b> <small>since step {finding.step}</small>"
                f"<br>{html.escape(finding.evidence)}<br>"
                f"<small style='color:#555'>{html.escape(finding.explanation)}</small>"
            )
            card.show_remedies(finding.remedies)
            card.box.layout.display = "flex"
        self.none.layout.display = "none" if standing else "block"
