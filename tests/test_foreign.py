"""Issue 6: honest switches and gradient flow on a model nbtrain did not build."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from nbtrain import Dashboard, Experiment
from nbtrain.foreign import Switches, probe_layers


class Odd(nn.Module):
    """A model with batch norm, dropout, a layer it never uses and a frozen layer."""

    def __init__(self, n_in=8, n_out=3):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(n_in, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.25)
        )
        self.unused = nn.Linear(32, 32)
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.classifier = nn.Linear(32, n_out)

    def forward(self, x):
        return self.classifier(torch.relu(self.frozen(self.encoder(x))))


def _plain():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_the_gradient_flow_lists_the_models_own_layers_by_module_name():
    layers = [name for name, _ in probe_layers(Odd())]
    assert layers == ["encoder.0", "unused", "frozen", "classifier"]  # batch norm: in total
    assert [name for name, _ in probe_layers(_plain())] == ["0", "2"]


def test_unused_and_frozen_layers_are_reported_before_training(small_data):
    torch.manual_seed(0)
    exp = Experiment(model=Odd(), train_data=small_data)
    report = exp.report()
    assert report.status == {
        "encoder.0": "ok",
        "unused": "no gradient",
        "frozen": "frozen",
        "classifier": "ok",
    }
    assert exp.step_count == 0 and all(p.grad is None for p in exp.model.parameters())
    assert "unused (no gradient), frozen (frozen)" in str(report)


def test_five_steps_show_gradient_flow_from_the_first_and_gaps_never_zeros(small_data):
    torch.manual_seed(0)
    x, y = small_data
    # 5 batches of 48: one epoch is exactly 5 steps.
    exp = Experiment(model=Odd(), train_data=(x[:240], y[:240]), val_data=(x[240:], y[240:]))
    exp.set(batch_size=48)
    exp.run(epochs=1)
    assert exp.step_count == 5
    for name in ("encoder.0", "classifier"):
        steps, norms = exp.history.series(f"grad_norm/{name}")
        assert steps.tolist() == [1, 2, 3, 4, 5] and (norms > 0).all()
    for name in ("unused", "frozen"):
        assert np.isnan(exp.history.series(f"grad_norm/{name}")[1]).all()  # NaN: never a 0
    dash = Dashboard(exp)
    try:
        dash.refresh()
        assert list(dash.gradients.bars.x) == [
            "encoder.0",
            "unused (no gradient)",
            "frozen (frozen)",
            "classifier",
        ]
        bars = dash.gradients.bars.y
        # No gradient: a flat bar at the axis floor (a NaN would blank bqplot's bars), labelled.
        floor = dash.gradients.bar_scale.min
        assert (bars[:, [0, 3]] > floor).all() and (bars[:, [1, 2]] == floor).all()
        assert dash.gradients.norms.y.shape == (4, 5)
        assert "unused (no gradient), frozen (frozen)" in dash.notice.value
    finally:
        dash.close()


def test_dropout_switch_sets_the_models_own_dropout_modules(small_data):
    exp = Experiment(model=Odd(), train_data=small_data)
    assert exp.config.dropout == 0.25 and exp.config.batchnorm  # adopted from the model
    exp.set(dropout=0.6)
    assert exp.model.encoder[3].p == 0.6
    exp.set(dropout=0.0)
    assert exp.model.encoder[3].p == 0.0


def test_batchnorm_off_bypasses_the_models_batchnorm_and_on_restores_it():
    torch.manual_seed(0)
    model = Odd()
    switches = Switches(model)
    bn = model.encoder[1]
    keys = set(model.state_dict())
    x = torch.randn(16, 32) * 3 + 1
    switches.set_batchnorm(False)
    assert torch.equal(bn(x), x)  # passes its input through
    assert torch.equal(bn.running_mean, torch.zeros(32))  # and its statistics stay put
    assert set(model.state_dict()) == keys  # nothing swapped out: checkpoints still load
    switches.set_batchnorm(True)
    out = bn(x)
    assert abs(out.mean().item()) < 1e-5 and not torch.equal(bn.running_mean, torch.zeros(32))


def test_switches_a_model_lacks_are_refused_and_disabled_with_the_reason(small_data):
    exp = Experiment(model=_plain(), train_data=small_data)
    with pytest.raises(ValueError, match=r"dropout=0.2 cannot act here: .*no nn.Dropout"):
        exp.set(dropout=0.2)
    with pytest.raises(ValueError, match="batchnorm=True cannot act here: .*no nn.BatchNorm"):
        exp.set(batchnorm=True)
    with pytest.raises(ValueError, match="activation switching works on nbtrain's built-in"):
        exp.set(activation="tanh")
    with pytest.raises(ValueError, match="skip switching works on nbtrain's built-in"):
        exp.set(skip=True)
    with pytest.raises(ValueError, match="hidden widths belong to nbtrain's built-in MLP"):
        exp.restart(hidden=(8, 8))
    with pytest.raises(ValueError, match="no nn.Dropout"):
        Experiment(model=_plain(), train_data=small_data, dropout=0.3)
    dash = Dashboard(exp)
    try:
        assert dash.dropout_toggle.disabled and "no nn.Dropout" in dash.dropout_toggle.tooltip
        assert dash.batchnorm_toggle.disabled and dash.more.activation.disabled
        assert dash.more.skip.disabled and dash.more.restart_button.disabled
        assert not dash.clip_toggle.disabled and not dash.lr_slider.disabled
        assert "no nn.BatchNorm" in dash.notice.value
    finally:
        dash.close()


def test_regression_hides_the_accuracy_plot():
    x = torch.randn(200, 4)
    exp = Experiment(model=nn.Linear(4, 1), train_data=(x, x.sum(1, keepdim=True)), epochs=1)
    dash = Dashboard(exp)
    try:
        exp.run()
        dash.refresh()
        assert dash.accuracy.figure.layout.display == "none"
        assert "val loss" in dash.status.value and "val acc" not in dash.status.value
        assert math.isfinite(exp.history.last("val_loss"))
    finally:
        dash.close()


def test_the_init_inspector_is_the_built_in_mlps_only(small_data):
    from nbtrain.internals import inspect_init

    exp = Experiment(model=_plain(), train_data=small_data)
    with pytest.raises(ValueError, match="inspect_init compares fresh built-in MLPs"):
        inspect_init(exp)
    dash = Dashboard(exp)
    try:
        assert dash.inspector is None and "built-in MLPs" in dash.tabs.children[4].value
    finally:
        dash.close()


def test_a_regression_trains_without_the_classification_detectors():
    x = torch.randn(300, 3)
    exp = Experiment(model=nn.Linear(3, 1), train_data=(x, x[:, :1] * 2), lr=0.05, epochs=3)
    exp.run()
    assert exp.state == "finished" and exp.findings == []
