import numpy as np
import pytest

import nbtrain
from nbtrain import Dashboard, Experiment
from nbtrain.panel import decimate, smooth


@pytest.fixture
def panel():
    exp = Experiment(epochs=2)
    dash = Dashboard(exp)
    yield exp, dash
    exp.stop()
    dash.close()


def test_start_button_trains_in_the_background_and_marks_get_the_runs_numbers(panel):
    exp, dash = panel
    dash.start_button.click()
    assert exp.wait(60)
    dash.refresh()
    steps, loss = exp.history.series("train_loss")
    assert np.array_equal(dash.loss.raw.x, steps)
    np.testing.assert_allclose(dash.loss.raw.y, loss, rtol=1e-6)
    eval_steps, val_acc = exp.history.series("val_acc")
    np.testing.assert_allclose(dash.accuracy.val.y, val_acc, rtol=1e-6)
    assert np.array_equal(dash.accuracy.val.x, eval_steps)
    names = exp.probe.layer_names
    expected = [exp.history.series(f"grad_mean/{n}")[1][-20:].mean() for n in names]
    np.testing.assert_allclose(dash.gradients.bars.y[0], expected, rtol=1e-5)
    assert dash.gradients.norms.y.shape == (len(names), len(steps))
    assert "finished" in dash.status.value and f"step {exp.step_count}" in dash.status.value
    assert dash.progress.value == 1.0


def test_pause_step_stop_and_reset_buttons_reach_the_engine():
    exp = Experiment(epochs=500)
    dash = Dashboard(exp)
    try:
        dash.start_button.click()
        dash.pause_button.click()
        assert exp.state == "paused"
        dash.refresh()
        assert dash.pause_button.description == "Resume" and not dash.step_button.disabled
        frozen = exp.step_count
        dash.step_button.click()
        assert exp.step_count == frozen + 1
        dash.pause_button.click()  # now "Resume"
        while exp.step_count <= frozen + 1:
            pass
        dash.stop_button.click()
        assert exp.state == "stopped" and exp.step_count > frozen + 1
        dash.reset_button.click()
        dash.refresh()
        assert exp.step_count == 0 and len(dash.loss.raw.x) == 0
    finally:
        exp.stop()
        dash.close()


def test_switches_reach_the_engine_and_each_change_is_a_labelled_marker(panel):
    exp, dash = panel
    dash.dropout_rate.value = 0.4
    dash.dropout_toggle.value = True
    dash.batchnorm_toggle.value = True
    dash.clip_toggle.value = True
    dash.lr_slider.value = 1e-2
    assert exp.in_force == {"dropout": 0.4, "batchnorm": True, "clip": 1.0, "lr": 1e-2}
    dash.refresh()
    labels = list(dash.loss.marker_labels.text)
    assert labels == ["dropout off→0.4", "batchnorm off→on", "clip off→1", "lr 0.001→0.01"]
    assert list(dash.accuracy.marker_labels.text) == labels
    assert dash.loss.marker_lines.x.shape == (4, 2)
    assert "in force: <b>0.4</b>" in dash.readouts["dropout"].value
    dash.dropout_toggle.value = False
    assert exp.in_force["dropout"] == 0.0


def test_a_failed_run_shows_its_traceback_in_the_panel(panel):
    exp, dash = panel

    def broken(e, _):
        raise ValueError("bad batch from the user's pipeline")

    exp.on("step_completed", broken)
    dash.start_button.click()
    exp.wait(30)
    dash.refresh()
    assert exp.state == "failed"
    assert dash.error_area.layout.display == "block"
    assert "ValueError: bad batch from the user&#x27;s pipeline" in dash.error_area.value


def test_repr_holds_no_live_values(panel):
    exp, dash = panel
    before = repr(dash)
    exp.run(epochs=1)
    assert repr(dash) == before == "nbtrain.Dashboard"


def test_decimate_keeps_extremes_and_bounds_the_points():
    x = np.arange(100_000)
    y = np.sin(x / 500.0)
    y[54_321] = 50.0  # a spike
    y[77_777] = -50.0
    dx, dy = decimate(x, y, 2000)
    assert len(dx) <= 2000
    assert dy.max() == 50.0 and dy.min() == -50.0
    assert np.all(np.diff(dx) >= 0)
    assert decimate(x[:10], y[:10], 2000)[1].tolist() == y[:10].tolist()


def test_smooth_is_an_ema_started_at_the_first_value():
    y = np.array([4.0, 0.0, 0.0])
    np.testing.assert_allclose(smooth(y, 0.5), [4.0, 2.0, 1.0])


def test_the_slow_motion_switch_and_slider_set_the_pace(panel):
    exp, dash = panel
    dash.speed_slider.value = 5.0
    assert exp.config.speed is None  # the switch is off: full speed
    dash.speed_toggle.value = True
    assert exp.config.speed == 5.0
    dash.speed_slider.value = 20.0
    assert exp.config.speed == 20.0
    dash.speed_toggle.value = False
    assert exp.config.speed is None


def test_a_refresh_over_a_million_steps_sends_bounded_lines_that_keep_an_early_spike():
    exp = Experiment()
    dash = Dashboard(exp, rate=0.1)
    try:
        history = nbtrain.History()
        cols = exp.history.names("step") or exp._step_columns
        steps = np.arange(1, 1_000_001)
        for start in range(0, len(steps), 100_000):
            chunk = steps[start : start + 100_000]
            values = np.full((len(chunk), len(cols)), 0.5)
            values[:, 0] = 1.0 / np.sqrt(chunk)
            if start == 0:
                values[9, 0] = 40.0  # a loss spike at step 10
            history.record_rows("step", chunk, chunk // 23, cols, values)
        exp.history = history
        dash.refresh()
        assert len(dash.loss.raw.x) <= 2000 and dash.loss.raw.x[-1] == 1_000_000
        assert dash.loss.raw.y.max() == 40.0 and 10 in dash.loss.raw.x
        assert len(dash.loss.smoothed.x) <= 500
        assert dash.gradients.norms.y.shape[1] <= 2000 // (2 * len(exp.probe.layer_names))
    finally:
        dash.close()
