"""A non-finite loss or gradient pauses the run as diverged, keeping the last finite weights."""

import time

import numpy as np
import pytest
import torch

from nbtrain import Dashboard, Experiment, History
from nbtrain.panel import smooth
from nbtrain.panel.plots import LossFigure, View


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def poison_output(exp, module, at_step, value=float("nan")):
    """Fault injection: `module`'s output becomes `value` in the training forward of one step."""
    fired = []

    def hook(mod, inputs, output):
        if mod.training and exp.step_count + 1 == at_step and not fired:
            fired.append(exp.step_count + 1)
            return output * value
        return None

    module.register_forward_hook(hook)
    return fired


def poison_grad(exp, param, at_step, value=float("nan")):
    """Fault injection: `param`'s gradient becomes `value` in one step's backward."""
    fired = []

    def hook(grad):
        if exp.step_count + 1 == at_step and not fired:
            fired.append(exp.step_count + 1)
            return grad * value
        return None

    param.register_hook(hook)
    return fired


def snapshot_at(exp, step):
    """The parameters and buffers as they were right after `step`."""
    saved = {}

    def keep(e, _):
        if e.step_count == step:
            saved["params"] = [p.detach().clone() for p in e.model.parameters()]
            saved["buffers"] = [b.detach().clone() for b in e.model.buffers()]

    exp.on("step_completed", keep)
    return saved


@pytest.fixture
def exp(small_data):
    exp = Experiment(data=small_data, hidden=(16, 8), epochs=3, batch_size=32)
    yield exp
    exp.stop()


def test_a_nan_loss_pauses_the_run_and_the_step_is_not_applied(exp):
    fired = poison_output(exp, exp.model.blocks[1].linear, at_step=5)
    saved = snapshot_at(exp, 4)
    exp.start()
    wait_for(lambda: exp.state == "diverged")

    assert fired == [5]
    assert exp.running and exp.step_count == 5 and len(exp.history) == 5
    assert np.isnan(exp.history.series("train_loss")[1][-1])  # the refused step is a gap
    assert exp.error.startswith("diverged at step 5: loss nan, first non-finite gradient in ")
    assert exp.exception is None
    for before, now in zip(saved["params"], exp.model.parameters(), strict=True):
        assert torch.equal(before, now)
    event = [e for e in exp.history.events if e.kind == "diverged"][-1]
    assert (event.step, event.label) == (5, "diverged at step 5")
    assert np.isnan(event.detail["loss"])
    time.sleep(0.05)
    assert exp.step_count == 5  # it really is paused

    exp.resume()
    assert exp.wait(30) and exp.state == "finished" and exp.error is None
    steps = exp.history.series("train_loss")[0]
    assert np.all(np.diff(steps) == 1) and steps[0] == 1  # no gap, no repeat in step numbers
    assert len(exp.history) == 3 * exp.steps_per_epoch  # the refused step counts as one
    loss = exp.history.series("train_loss")[1]
    assert np.isnan(loss[4]) and np.isfinite(np.delete(loss, 4)).all()
    kinds = [e.kind for e in exp.history.events if e.kind != "finding"]
    assert kinds == ["started", "diverged", "resumed", "finished"]
    assert "exploding" in {
        e.detail["challenge"] for e in exp.history.events if e.kind == "finding"
    }


def test_the_message_names_the_first_layer_in_network_order(exp):
    poison_grad(exp, exp.model.blocks[1].linear.weight, at_step=3)
    poison_grad(exp, exp.model.head.bias, at_step=3, value=float("inf"))
    exp.start()
    wait_for(lambda: exp.state == "diverged")
    assert "loss " in exp.error and "loss nan" not in exp.error  # the loss itself was finite
    assert "first non-finite gradient in hidden2;" in exp.error
    diverged = [e for e in exp.history.events if e.kind == "diverged"]
    assert len(diverged) == 1 and diverged[0].detail["layer"] == "hidden2"


def test_batchnorm_running_statistics_keep_their_last_finite_values(small_data):
    exp = Experiment(data=small_data, hidden=(16, 8), epochs=2, batch_size=32, batchnorm=True)
    block = exp.model.blocks[0]
    poison_output(exp, block.linear, at_step=4, value=float("inf"))
    saved = snapshot_at(exp, 3)
    exp.start()
    try:
        wait_for(lambda: exp.state == "diverged")
        assert exp.step_count == 4
        for before, now in zip(saved["buffers"], exp.model.buffers(), strict=True):
            assert torch.equal(before, now)
        assert torch.isfinite(block.norm.running_var).all()
        exp.resume()
        assert exp.wait(30) and exp.state == "finished"
        assert np.isfinite(exp.history.series("val_loss")[1]).all()
    finally:
        exp.stop()


def test_lowering_lr_and_switching_clipping_on_while_diverged_apply_at_the_resume(exp):
    poison_output(exp, exp.model.head, at_step=6, value=float("inf"))
    exp.start()
    wait_for(lambda: exp.state == "diverged")
    exp.set(lr=1e-4, clip=0.5)
    assert exp.pending == {"lr": 1e-4, "clip": 0.5}  # the run is going: next boundary
    exp.start()  # Start on a diverged run resumes it
    assert exp.wait(30) and exp.state == "finished"
    changes = {e.detail["name"]: e.step for e in exp.history.changes()}
    assert changes == {"lr": 7, "clip": 7}  # step 6 was refused; 7 is the first to run anew
    steps, lr = exp.history.series("lr")
    assert np.all(lr[steps < 7] == 1e-3) and np.all(lr[steps >= 7] == 1e-4)


def test_step_on_a_diverged_run_tries_one_step_and_stays_paused(exp):
    poison_output(exp, exp.model.head, at_step=2)
    exp.start()
    wait_for(lambda: exp.state == "diverged")
    exp.step()
    assert exp.step_count == 3 and exp.state == "paused" and exp.error is None
    exp.stop()
    assert exp.state == "stopped"


def test_step_returns_when_its_step_diverges(exp):
    exp.step()
    poison_output(exp, exp.model.head, at_step=2)
    started = time.monotonic()
    exp.step()
    assert time.monotonic() - started < 10  # not the 30 s timeout
    assert exp.state == "diverged" and exp.step_count == 2


def test_a_blocking_run_ends_as_diverged_and_a_second_run_continues(exp):
    poison_output(exp, exp.model.blocks[0].linear, at_step=3)
    exp.run()  # returns: nobody could resume a run that blocks its caller
    assert exp.state == "diverged" and not exp.running and exp.step_count == 3
    assert "diverged at step 3" in exp.error
    with pytest.raises(RuntimeError, match=r"call run\(\) again to train on"):
        exp.resume()  # nothing to resume: it says so rather than doing nothing
    exp.run(epochs=1)
    assert exp.state == "finished" and exp.error is None
    assert exp.history.events[1].kind == "diverged"


def test_a_genuine_blow_up_is_caught_before_the_weights_turn_non_finite(small_data):
    exp = Experiment(data=small_data, hidden=(16, 8), optimizer="sgd", lr=1e6, epochs=5)
    exp.run()
    assert exp.state == "diverged"
    assert all(torch.isfinite(p).all() for p in exp.model.parameters())
    steps, grad_norm = exp.history.series("grad_norm")
    assert not np.isfinite(grad_norm[-1]) and np.isfinite(grad_norm[:-1]).all()
    diverged = [e for e in exp.history.events if e.kind == "diverged"]
    assert diverged[-1].step == steps[-1] == exp.step_count


def test_the_panel_shows_the_divergence_and_resumes_from_its_button(exp):
    dash = Dashboard(exp)
    try:
        poison_output(exp, exp.model.head, at_step=4)
        dash.start_button.click()
        wait_for(lambda: exp.state == "diverged")
        dash.refresh()
        assert dash.error_area.layout.display == "block"
        assert "The run diverged." in dash.error_area.value
        assert "diverged at step 4" in dash.error_area.value
        assert "<b>diverged</b>" in dash.status.value
        assert dash.pause_button.description == "Resume" and not dash.step_button.disabled
        assert dash.progress.bar_style == "warning"
        assert dash.loss.marker_texts() == ["diverged at step 4"]  # marked on plots
        assert np.asarray(dash.loss.marker_lines.x).ravel().tolist() == [4, 4]  # one line
        dash.lr_slider.value = 1e-4
        dash.pause_button.click()
        assert exp.wait(30) and exp.state == "finished"
        dash.refresh()
        assert dash.error_area.layout.display == "none"
        assert exp.history.changes()[0].label == "lr 0.001→0.0001"
    finally:
        dash.close()


def test_smooth_carries_over_nan_and_inf_instead_of_blanking_the_line():
    y = np.array([4.0, np.inf, 0.0, np.nan, 0.0, -np.inf])
    out = smooth(y, 0.5)
    np.testing.assert_allclose(out[[0, 2, 4]], [4.0, 2.0, 1.0])
    assert np.isnan(out[[1, 3, 5]]).all()
    assert np.isnan(smooth(np.array([np.nan, np.inf]))).all()


def test_loss_plot_keeps_drawing_after_a_non_finite_point():
    history = History()
    for step, loss in enumerate([2.0, 1.5, np.inf, 1.2, 1.0], start=1):
        history.record("step", step, 0, {"train_loss": loss})
    history.record("eval", 0, 0, {"val_loss": 2.0})
    history.record("eval", 5, 1, {"val_loss": np.inf})
    figure = LossFigure()
    figure.update(View(history, [], 100))
    assert np.isfinite(figure.smoothed.y[[0, 1, 3, 4]]).all() and np.isnan(figure.smoothed.y[2])
    assert np.isfinite(figure.raw.y[[0, 1, 3, 4]]).all() and np.isnan(figure.raw.y[2])
    assert figure.val.y[0] == 2.0 and np.isnan(figure.val.y[1])


def test_wait_returns_when_a_background_run_diverges(exp):
    poison_output(exp, exp.model.head, at_step=5)
    exp.start(epochs=50)
    try:
        started = time.monotonic()
        assert exp.wait(timeout=30) is True
        assert time.monotonic() - started < 20  # not the timeout: the divergence ended it
        assert exp.state == "diverged" and exp.step_count == 5
    finally:
        exp.stop()
    assert exp.wait(timeout=5) is True and exp.state == "stopped"
