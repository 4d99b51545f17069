"""Live diagnosis: detectors that watch a run's history and name the challenge they see.

Each detector has a rule with written-down thresholds (its docstring), raises a `Finding`
with the evidence in numbers when the rule holds, and clears it when the evidence is gone
(with some hysteresis, so a finding does not flicker). Root causes come first: while the
gradients explode or vanish, the detectors of their consequences (underfitting, slow
convergence) stay quiet, since those symptoms are explained already.

Both moments are events in the history (kinds ``finding`` and ``cleared``); the standing
findings are ``Experiment.findings``. The engine runs the check every `CHECK_EVERY` steps and
after every evaluation, in the training thread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .engine import Experiment
    from .history import History

CHECK_EVERY = 50
WINDOW = 100  # steps the step-level rules look back over


@dataclasses.dataclass(frozen=True)
class Remedy:
    """One click's worth of fix: live changes, a restart, or training longer."""

    label: str
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)
    restart: bool = False  # True: a new network with the changes (initialization, capacity)
    extend_epochs: int = 0  # > 0: train this many more epochs

    def apply(self, experiment: Experiment) -> None:
        """Apply to a run; a run that was going (or paused on a divergence) goes on."""
        going = experiment.running
        if self.restart:
            experiment.restart(**self.changes)
            if going:
                experiment.start()
            return
        if self.changes:
            experiment.set(**self.changes)
        if self.extend_epochs:
            experiment.extend(self.extend_epochs)
        elif experiment.state in ("paused", "diverged"):
            experiment.start()  # resumes a paused run, or continues a diverged one


@dataclasses.dataclass(frozen=True)
class Finding:
    challenge: str
    title: str
    step: int  # the step where it was first seen
    evidence: str
    explanation: str
    remedies: tuple[Remedy, ...]


class Signals:
    """What the rules read, taken from the history once per check."""

    def __init__(self, history: History, layer_names: list[str]) -> None:
        self.layers = layer_names
        self.history = history
        self.steps = len(history)
        names = history.names("step")
        self.window_steps, self.loss = (
            history.tail("train_loss", WINDOW) if self.steps else (np.zeros(0), np.zeros(0))
        )
        self.grad_norm = history.tail("grad_norm", WINDOW)[1] if "grad_norm" in names else None
        first, last = (f"grad_norm/{n}" for n in (layer_names[0], layer_names[-1]))
        self.first = history.tail(first, WINDOW)[1] if first in names else None
        self.last = history.tail(last, WINDOW)[1] if last in names else None
        self.start_loss = history.head("train_loss", 5)[1] if self.steps else np.zeros(0)
        self.start_grad = history.head("grad_norm", 10)[1] if self.steps else np.zeros(0)
        evals = history.names("eval")
        get = (lambda n: history.series(n, "eval")) if evals else None
        self.eval_steps, self.train_acc = get("train_acc") if get else (np.zeros(0),) * 2
        self.val_acc = get("val_acc")[1] if get else np.zeros(0)
        self.eval_loss = get("train_loss")[1] if get else np.zeros(0)

    def first_nonfinite_step(self) -> int | None:
        """The run's first step with an inf or NaN batch loss or gradient norm, looking past
        the window (read only when the window holds one, so the common case stays cheap)."""
        first = None
        for name in ("train_loss", "grad_norm"):
            if name in self.history.names("step"):
                steps, values = self.history.series(name, "step")
                bad = steps[~np.isfinite(values)]
                if len(bad) and (first is None or bad[0] < first):
                    first = int(bad[0])
        return first


class Detector:
    challenge = ""
    title = ""
    explanation = ""
    suppressed_by: tuple[str, ...] = ()

    def check(self, s: Signals, standing: bool) -> str | None:
        """The evidence, if the rule holds (`standing`: already raised, so clear-thresholds
        apply); None if not."""
        raise NotImplementedError

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        raise NotImplementedError


class VanishingGradients(Detector):
    """Rule: over the last 100 steps (at least 20), the median ratio of the first layer's
    gradient L2 norm to the last layer's is below 1e-3; it clears above 1e-2. Needs at least
    three Linear layers."""

    challenge, title = "vanishing", "Vanishing gradients"
    explanation = (
        "Gradients shrink layer by layer on their way back: in a deep network of saturating "
        "units (sigmoid, tanh) every layer multiplies them by a slope below 1, so the first "
        "layers barely learn and the loss stalls."
    )

    def check(self, s: Signals, standing: bool) -> str | None:
        if len(s.layers) < 3 or s.first is None or len(s.first) < 20:
            return None
        ok = np.isfinite(s.first) & np.isfinite(s.last) & (s.last > 0)
        if ok.sum() < 20:
            return None
        ratio = float(np.median(s.first[ok] / s.last[ok]))
        if ratio < (1e-2 if standing else 1e-3):
            return (
                f"the first layer's gradient norm is {ratio:.1e} of the last layer's "
                f"(median over the last {int(ok.sum())} steps)"
            )
        return None

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        found = [
            Remedy("ReLU + He init (restart)", {"activation": "relu", "init": "he"}, restart=True),
            Remedy("ReLU activations", {"activation": "relu"}),
        ]
        if getattr(experiment.model, "residual_blocks", 0):  # the built-in MLP only
            found.append(Remedy("Skip connections", {"skip": True}))
        return tuple(found)


class ExplodingGradients(Detector):
    """Rule: in the last 100 steps, a loss or gradient norm is inf or NaN; or the gradient
    norm exceeds 100x its median over the first 10 steps; or the batch loss exceeds 10x its
    median over the first 5 steps. It clears when the last 100 steps are finite, the
    gradient norm stays under 10x and the loss under 2x those starting values, and the
    network is learning again: training accuracy at least 0.2 above its value at step 0 (a
    network that blew up often dies, its loss flat and finite, and has not recovered)."""

    challenge, title = "exploding", "Exploding gradients"
    explanation = (
        "Gradients grow layer by layer, or updates feed on themselves: with large weights or a "
        "learning rate too high for the network, each step makes the next gradient larger, "
        "until the loss jumps and becomes inf or NaN."
    )

    def check(self, s: Signals, standing: bool) -> str | None:
        if len(s.loss) < 2 or s.grad_norm is None:
            return None
        bad = ~np.isfinite(s.loss) | ~np.isfinite(s.grad_norm)
        if bad.any():
            # The run's first such step, not the window's: the window moves on past it.
            step = s.first_nonfinite_step() or int(s.window_steps[bad][0])
            return f"the loss or gradient norm became inf/NaN at step {step}"
        grad0 = float(np.median(s.start_grad))
        loss0 = float(np.median(s.start_loss))
        grad_limit, loss_limit = (10, 2) if standing else (100, 10)
        peak = float(s.grad_norm.max())
        if grad0 > 0 and peak > grad_limit * grad0:
            return (
                f"the gradient norm rose from {grad0:.3g} to {peak:.3g} "
                f"(x{peak / grad0:.2g}) in {s.steps} steps"
            )
        top = float(s.loss.max())
        if loss0 > 0 and top > loss_limit * loss0:
            return f"the batch loss jumped from {loss0:.3g} to {top:.3g} (x{top / loss0:.2g})"
        if standing and len(s.train_acc) and s.train_acc[-1] < s.train_acc[0] + 0.2:
            return (
                f"not recovered: training accuracy {s.train_acc[-1]:.3f} after the blow-up "
                f"(it was {s.train_acc[0]:.3f} at step 0)"
            )
        return None

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        # Note: once the run has diverged its weights have blown up already (finite, but
        # far out), and momentum remembers the blow-up: clipping or batch norm switched on
        # then diverge again on resume (measured on the preset), so they start afresh.
        fresh = experiment.state == "diverged"
        suffix = " (restart)" if fresh else ""
        found = [
            Remedy(f"Clip gradients (max norm 1){suffix}", {"clip": 1.0}, restart=fresh),
            Remedy(f"Batch norm{suffix}", {"batchnorm": True}, restart=fresh),
            Remedy(
                "Lower the learning rate 10x (restart)",
                {"lr": experiment.config.lr / 10},
                restart=True,
            ),
        ]
        if experiment.config.init not in ("he", "he_normal", "he_uniform"):
            found.append(Remedy("He init (restart)", {"init": "he"}, restart=True))
        return tuple(found)


class Overfitting(Detector):
    """Rule: at the last two evaluations, validation accuracy trails training accuracy by at
    least 0.06, and training accuracy is at least 0.97 now; it clears when the gap is below
    0.04 at both of the last two evaluations."""

    challenge, title = "overfitting", "Overfitting"
    explanation = (
        "The model memorizes the training set instead of learning what generalizes: training "
        "accuracy approaches 1 while validation accuracy falls behind."
    )

    def check(self, s: Signals, standing: bool) -> str | None:
        if len(s.train_acc) < 3:
            return None
        gaps = s.train_acc[-2:] - s.val_acc[-2:]
        if standing:
            holds = (gaps >= 0.04).any()
        else:
            holds = s.train_acc[-1] >= 0.97 and (gaps >= 0.06).all()
        if holds:
            return (
                f"training accuracy {s.train_acc[-1]:.3f}, validation {s.val_acc[-1]:.3f}: "
                f"a gap of {gaps[-1]:.3f} (it was {s.train_acc[0] - s.val_acc[0]:.3f} at "
                f"step {int(s.eval_steps[0])})"
            )
        return None

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        found = [
            Remedy("Dropout 0.3", {"dropout": 0.3}),
            Remedy("L2 weight decay 1e-3", {"weight_decay": 1e-3}),
            Remedy("Early stopping (patience 5)", {"patience": 5}),
        ]
        if experiment.data.image_shape is not None:
            found.insert(2, Remedy("Data augmentation", {"augment": True}))
        return tuple(found)


class Underfitting(Detector):
    """Rule: after at least 5 evaluations past step 0 and 100 steps, training and validation
    accuracy are both below 0.8, training accuracy moved less than 0.06 over the last 5
    evaluations, and the full-set training loss fell less than 5% over the last 3 (it has
    levelled off). It clears when training accuracy reaches 0.85 or moves by 0.1 or more.
    Underfitting and slow convergence exclude each other: the first one seen stands."""

    challenge, title = "underfitting", "Underfitting"
    explanation = (
        "The model is too small, or trained too little, for the data: training and validation "
        "accuracy are both low and no longer improving."
    )
    suppressed_by = ("vanishing", "exploding", "slow")

    def check(self, s: Signals, standing: bool) -> str | None:
        if len(s.train_acc) < 6 or s.steps < 100:
            return None
        recent = s.train_acc[-5:]
        spread = float(recent.max() - recent.min())
        high, moving = (0.85, 0.1) if standing else (0.8, 0.06)
        levelled = standing or (len(s.eval_loss) >= 4 and s.eval_loss[-1] > 0.95 * s.eval_loss[-4])
        if s.train_acc[-1] < high and s.val_acc[-1] < high and spread < moving and levelled:
            return (
                f"training accuracy {s.train_acc[-1]:.3f} and validation "
                f"{s.val_acc[-1]:.3f}, moving by {spread:.3f} over the last 5 evaluations"
            )
        return None

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        from .model import funnel_widths

        bigger = funnel_widths(experiment.data.n_features)
        return (
            Remedy(
                f"More layers and units: {'-'.join(map(str, bigger))} (restart)",
                {"hidden": bigger},
                restart=True,
            ),
            Remedy("Train 20 epochs longer", extend_epochs=20),
        )


class SlowConvergence(Detector):
    """Rule: after at least 200 steps and 4 evaluations past step 0, the full-set training
    loss is still above 40% of its value at step 0, fell by at least 3% over the last 3
    evaluations, and training accuracy rose by at least 0.03 over them (it is moving, just
    slowly). It clears below 30%, or once the loss stops falling."""

    challenge, title = "slow", "Slow convergence"
    explanation = (
        "The loss falls, but far too slowly: a learning rate that is too small for the "
        "optimizer, a poor initialization, or noisy gradients."
    )
    suppressed_by = ("vanishing", "exploding", "underfitting")

    def check(self, s: Signals, standing: bool) -> str | None:
        if len(s.eval_loss) < 5 or len(s.train_acc) < 5 or s.steps < 200:
            return None
        start, now, before = s.eval_loss[0], s.eval_loss[-1], s.eval_loss[-4]
        if not all(map(math.isfinite, (start, now, before))) or start <= 0:
            return None
        share = now / start
        rising = standing or s.train_acc[-1] - s.train_acc[-4] >= 0.03
        if share > (0.3 if standing else 0.4) and now < 0.97 * before and rising:
            return (
                f"after {s.steps} steps the training loss is still {share:.0%} of its "
                f"start ({now:.3g} from {start:.3g}), falling {1 - now / before:.0%} "
                f"over the last 3 evaluations"
            )
        return None

    def remedies(self, experiment: Experiment) -> tuple[Remedy, ...]:
        lr = experiment.config.lr
        return (
            Remedy("Adam, lr=1e-3", {"optimizer": "adam", "lr": 1e-3, "schedule": "none"}),
            Remedy(
                f"One-cycle schedule up to {lr * 30:g}",
                {"schedule": "onecycle", "lr": lr * 30}
                if experiment.config.schedule in ("none", "plateau")
                else {"schedule": "onecycle"},
            ),
            Remedy("Batch norm", {"batchnorm": True}),
        )


DETECTORS: tuple[Detector, ...] = (
    ExplodingGradients(),
    VanishingGradients(),
    Overfitting(),
    Underfitting(),
    SlowConvergence(),
)


class Diagnosis:
    """Runs the detectors over one run's history and keeps the standing findings."""

    def __init__(self) -> None:
        self.standing: dict[str, Finding] = {}

    def check(self, experiment: Experiment) -> None:
        history = experiment.history
        if len(history) == 0:
            return
        signals = Signals(history, experiment.probe.layer_names)
        for detector in DETECTORS:
            standing = detector.challenge in self.standing
            evidence = None
            if not any(cause in self.standing for cause in detector.suppressed_by):
                evidence = detector.check(signals, standing)
            if evidence and not standing:
                finding = Finding(
                    detector.challenge,
                    detector.title,
                    signals.steps,
                    evidence,
                    detector.explanation,
                    detector.remedies(experiment),
                )
                self.standing[detector.challenge] = finding
                experiment._event(
                    "finding",
                    f"{detector.title}: {evidence}",
                    {"challenge": detector.challenge, "evidence": evidence},
                )
            elif evidence and standing:
                old = self.standing[detector.challenge]
                # The remedies too: what fits may have changed (a run that diverged since).
                self.standing[detector.challenge] = dataclasses.replace(
                    old, evidence=evidence, remedies=detector.remedies(experiment)
                )
            elif standing:
                del self.standing[detector.challenge]
                experiment._event(
                    "cleared", f"{detector.title} cleared", {"challenge": detector.challenge}
                )
