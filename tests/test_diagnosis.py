"""Issue 3: presets, detectors and remedies."""

import math

import numpy as np
import pytest

import nbtrain
from nbtrain import Experiment
from nbtrain.challenges import PRESETS
from nbtrain.diagnosis import (
    ExplodingGradients,
    Overfitting,
    Signals,
    SlowConvergence,
    Underfitting,
    VanishingGradients,
)
from nbtrain.history import History

SEEDS = (0, 1, 2)
CHALLENGES = ("vanishing", "exploding", "overfitting", "underfitting", "slow")


def _raised(exp):
    return [e.detail["challenge"] for e in exp.history.events if e.kind == "finding"]


def _run_budget(name, seed):
    exp = Experiment(preset=name, seed=seed)
    exp.run(epochs=math.ceil(PRESETS[name].budget_steps / exp.steps_per_epoch))
    return exp


def test_presets_are_listed_and_documented():
    assert nbtrain.presets == ("healthy", *CHALLENGES)
    for preset in PRESETS.values():
        assert preset.recipe and preset.why and preset.budget_steps > 0
    with pytest.raises(ValueError, match="preset must be one of healthy, vanishing"):
        Experiment(preset="wobbly")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CHALLENGES)
def test_each_preset_raises_its_own_finding_and_only_its_own_within_budget(name, seed):
    exp = _run_budget(name, seed)
    assert set(_raised(exp)) == {name}
    first = next(e for e in exp.history.events if e.kind == "finding")
    assert first.step <= PRESETS[name].budget_steps + 1
    finding = next(f for f in exp.findings if f.challenge == name)
    assert finding.evidence and finding.explanation and finding.remedies
    assert any(ch.isdigit() for ch in finding.evidence)  # evidence in numbers


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_raises_nothing_over_a_full_run(seed):
    exp = Experiment(preset="healthy", seed=seed)
    exp.run()
    assert _raised(exp) == [] and exp.findings == []
    assert exp.history.last("val_acc") > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_exploding_with_clipping_stays_finite_to_the_end(seed):
    exp = Experiment(preset="exploding", seed=seed, clip=1.0)
    exp.run()
    assert np.isfinite(exp.history.series("train_loss")[1]).all()
    assert "exploding" not in _raised(exp)
    unclipped = _run_budget("exploding", seed)
    assert (
        not np.isfinite(unclipped.history.series("train_loss")[1]).all()
        or max(unclipped.history.series("train_loss")[1]) > 1e3
    )  # without the remedy it does blow up


def _final_gap(exp):
    return exp.history.last("train_acc") - exp.history.last("val_acc")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_overfitting_with_dropout_and_l2_ends_with_a_smaller_gap(seed):
    plain = Experiment(preset="overfitting", seed=seed)
    plain.run()
    regularized = Experiment(preset="overfitting", seed=seed, dropout=0.5, weight_decay=1e-3)
    regularized.run()
    assert _final_gap(regularized) < _final_gap(plain) - 0.05


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_vanishing_with_relu_and_he_raises_the_first_layer_gradient_by_orders(seed):
    exp = Experiment(preset="vanishing", seed=seed)
    exp.run(epochs=2)

    def first_layer(e):
        return np.median(e.history.series("grad_norm/hidden1")[1][:40])

    before = first_layer(exp)
    remedy = next(r for r in exp.findings[0].remedies if r.restart)
    remedy.apply(exp)
    assert exp.config.activation == "relu" and exp.config.init == "he"
    exp.run(epochs=2)
    assert first_layer(exp) > 1000 * before
    assert "vanishing" not in _raised(exp)


@pytest.mark.slow
def test_live_remedies_clear_slow_and_underfitting():
    slow = Experiment(preset="slow", seed=0)
    slow.run(epochs=10)
    adam = next(r for r in slow.findings[0].remedies if r.changes.get("optimizer") == "adam")
    adam.apply(slow)
    slow.run(epochs=5)
    assert slow.findings == [] and "Slow convergence cleared" in [
        e.label for e in slow.history.events
    ]
    under = Experiment(preset="underfitting", seed=0)
    under.run(epochs=15)
    bigger = under.findings[0].remedies[0]
    bigger.apply(under)
    assert under.config.hidden == (128, 64, 32)
    under.run(epochs=15)
    assert under.findings == [] and under.history.last("val_acc") > 0.6


def test_train_longer_remedy_extends_a_going_run():
    exp = Experiment(epochs=2)
    exp.on("step_completed", lambda e, _: e.step_count == 3 and e.extend(1))
    exp.run()
    assert exp.epoch_count == 3
    assert "train 1 epochs longer" in [e.label for e in exp.history.changes()]


# Detector rules on hand-built histories


def _history(losses, grads=None, first=None, last=None, evals=()):
    h = History()
    for i, loss in enumerate(losses):
        row = {
            "train_loss": loss,
            "grad_norm": grads[i] if grads is not None else 1.0,
            "grad_norm/a": first[i] if first is not None else 1.0,
            "grad_norm/b": 1.0,
            "grad_norm/c": last[i] if last is not None else 1.0,
        }
        h.record("step", i + 1, 0, row)
    for step, train_acc, val_acc, train_loss in evals:
        h.record(
            "eval",
            step,
            0,
            {
                "train_acc": train_acc,
                "val_acc": val_acc,
                "train_loss": train_loss,
                "val_loss": train_loss,
            },
        )
    return Signals(h, ["a", "b", "c"])


def test_nan_at_the_first_step_is_exploding_and_crashes_nothing():
    s = _history([math.nan, 2.0, 2.0])
    assert "inf/NaN at step 1" in ExplodingGradients().check(s, standing=False)
    for detector in (VanishingGradients(), Overfitting(), Underfitting(), SlowConvergence()):
        assert detector.check(s, standing=False) is None


def test_nan_evidence_names_the_runs_first_bad_step_after_the_window_moved_past_it():
    # NaN from step 22 on, 161 steps: the 100-step window starts at 62, the blow-up did not.
    losses = [2.0] * 21 + [math.nan] * 140
    evidence = ExplodingGradients().check(_history(losses), standing=True)
    assert "inf/NaN at step 22" in evidence


def test_exploding_offers_he_init_only_to_a_network_without_it():
    def labels(**config):
        exp = Experiment(preset="exploding", **config)
        return [r.label for r in ExplodingGradients().remedies(exp)]

    assert "He init (restart)" not in labels()  # the preset is He-initialized already
    assert "He init (restart)" in labels(init="normal", init_std=0.5)


def test_a_run_shorter_than_the_window_is_not_judged_vanishing():
    tiny = [1e-9] * 10
    assert VanishingGradients().check(_history([2.0] * 10, first=tiny), False) is None
    s = _history([2.0] * 30, first=[1e-6] * 30, last=[1.0] * 30)
    assert "1.0e-06 of the last layer's" in VanishingGradients().check(s, False)


def test_a_constant_loss_is_not_slow_convergence_but_low_flat_accuracy_is_underfitting():
    evals = [(23 * i, 0.3, 0.3, 2.0) for i in range(8)]
    s = _history([2.0] * 200, evals=evals)
    assert SlowConvergence().check(s, False) is None
    assert ExplodingGradients().check(s, False) is None
    assert "moving by 0.000" in Underfitting().check(s, False)


def test_overfitting_rule_and_its_hysteresis():
    evals = [(0, 0.1, 0.1, 2.3), (10, 0.98, 0.90, 0.1), (20, 1.0, 0.90, 0.05)]
    s = _history([1.0] * 20, evals=evals)
    assert "a gap of 0.100" in Overfitting().check(s, False)
    closer = [(0, 0.1, 0.1, 2.3), (10, 1.0, 0.95, 0.1), (20, 1.0, 0.95, 0.05)]
    s = _history([1.0] * 20, evals=closer)
    assert Overfitting().check(s, False) is None  # 0.05 is not enough to raise...
    assert Overfitting().check(s, True) is not None  # ...but keeps a standing finding


def test_every_detector_states_its_rule_and_thresholds():
    for detector in (
        ExplodingGradients,
        VanishingGradients,
        Overfitting,
        Underfitting,
        SlowConvergence,
    ):
        doc = detector.__doc__
        assert doc.startswith("Rule:") and any(ch.isdigit() for ch in doc)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_remedy_offered_on_a_diverged_exploding_run_rescues_it(seed):
    # Once diverged, the weights have blown up: the live switches would diverge again on
    # resume, so each is a restart, and each then trains to the end.
    exp = _run_budget("exploding", seed)
    assert exp.state == "diverged"
    remedies = exp.findings[0].remedies
    assert [r.label for r in remedies] == [
        "Clip gradients (max norm 1) (restart)",
        "Batch norm (restart)",
        "Lower the learning rate 10x (restart)",
    ]
    for index in range(len(remedies)):
        again = _run_budget("exploding", seed)
        again.findings[0].remedies[index].apply(again)
        again.run(epochs=7)
        _, losses = again.history.series("train_loss")
        assert again.state == "finished" and np.isfinite(losses).all()
        assert again.history.last("val_acc") > 0.85, remedies[index].label
