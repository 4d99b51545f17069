import math

import numpy as np
import pytest
import torch
from torch import nn

from nbtrain.gradients import GradientProbe
from nbtrain.history import History
from nbtrain.steprows import ROW_BUFFER, StepRows


def _step(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_rows_reach_the_history_as_the_probe_measures_each_step():
    model = _model()
    probe = GradientProbe(model, [("a", model[0]), ("b", model[2])])
    rows, history = StepRows(probe), History()
    expected = []
    for step in range(1, 6):
        loss = _step(model, torch.randn(8, 5))
        value, health, _ = rows.measure(loss)
        assert value == pytest.approx(loss.item()) and math.isfinite(health)
        expected.append([loss.item(), 0.01 * step, *probe.measure().tolist()])
        rows.keep(step, 0, 0.01 * step)
    assert len(rows) == 5 and len(history) == 0  # nothing reaches the history before a flush
    rows.flush(history)
    assert len(rows) == 0
    got = np.column_stack([history.series(name)[1] for name in rows.columns])
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5)


def test_the_host_and_the_device_branch_write_the_same_row():
    model = _model()
    probe = GradientProbe(model, [("a", model[0]), ("b", model[2])])
    host, device = StepRows(probe), StepRows(probe)
    loss = _step(model, torch.randn(8, 5))
    value, health, raw = host.measure(loss)
    assert probe.on_host
    device.measure(loss)
    device._meta.append((1, 0, 0.1))
    device._host = None  # the branch a GPU takes: torch calls, one read of two numbers
    value_device, health_device, raw_device = device.measure(loss)
    torch.testing.assert_close(raw, raw_device, rtol=1e-5, atol=0)
    assert (value, health) == pytest.approx((value_device, health_device), rel=1e-6)
    assert device._rows[1, 0].item() == pytest.approx(loss.item())  # its loss slot


def test_a_nan_gradient_makes_the_health_non_finite():
    model = _model()
    probe = GradientProbe(model, [("a", model[0]), ("b", model[2])])
    loss = _step(model, torch.randn(8, 5))
    model[2].weight.grad[0, 0] = math.nan
    _, health, _ = StepRows(probe).measure(loss)
    assert math.isnan(health)


def test_a_full_buffer_asks_for_a_flush():
    model = _model()
    rows = StepRows(GradientProbe(model, [("a", model[0])]))
    loss = _step(model, torch.randn(8, 5))
    due = []
    for step in range(1, ROW_BUFFER + 1):
        rows.measure(loss)
        rows._flushed_at = math.inf  # no time-based flush in this test
        due.append(rows.keep(step, 0, 0.1))
    assert due[-1] and not any(due[:-1])
