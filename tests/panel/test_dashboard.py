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
    live = {k: exp.in_force[k] for k in ("dropout", "batchnorm", "clip", "lr")}
    assert live == {"dropout": 0.4, "batchnorm": True, "clip": 1.0, "lr": 1e-2}
    dash.refresh()
    labels = dash.loss.marker_texts()
    assert labels == ["dropout off→0.4", "batchnorm off→on", "clip off→1", "lr 0.001→0.01"]
    assert dash.accuracy.marker_texts() == labels
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


def test_every_further_control_reaches_the_engine_and_shows_what_is_in_force():
    exp = Experiment(epochs=1, hidden=(64, 64))
    dash = Dashboard(exp)
    more = dash.more
    try:
        more.optimizer.value = "adamw"
        more.schedule.value = "plateau"
        more.batch_size.value = 100
        more.batch_presets.value = 32
        more.weight_decay.value = 1e-3
        more.weight_decay_on.value = True
        more.l1.value = 1e-4
        more.l1_on.value = True
        more.patience.value = 4
        more.early_on.value = True
        more.min_delta.value = 0.01
        more.restore_best.value = False
        more.augment.value = True
        more.activation.value = "gelu"
        more.skip.value = True
        expected = {
            "optimizer": "adamw",
            "schedule": "plateau",
            "batch_size": 32,
            "weight_decay": 1e-3,
            "l1": 1e-4,
            "patience": 4,
            "min_delta": 0.01,
            "restore_best": False,
            "augment": True,
            "activation": "gelu",
            "skip": True,
        }
        assert {k: exp.in_force[k] for k in expected} == expected
        dash.refresh()
        for name, value in expected.items():
            shown = {True: "on", False: "off"}.get(
                value, f"{value:g}" if isinstance(value, float) else str(value)
            )
            assert f"in force: <b>{shown}</b>" in dash.readouts[name].value, name
        assert "decoupled" in more.weight_decay_style.value
        more.early_on.value = False
        assert exp.in_force["patience"] is None
        more.hidden.value = "32-16"
        more.init.value = "xavier_uniform"
        more.restart_button.click()
        assert exp.config.hidden == (32, 16) and exp.config.init == "xavier_uniform"
        dash.refresh()
        assert dash.gradients.layer_names == ["hidden1", "hidden2", "output"]
        assert dash.more.skip.disabled  # 64 -> 32 -> 16: no equal-width block any more
    finally:
        dash.close()


def test_a_schedule_that_owns_the_rate_disables_the_lr_slider(panel):
    exp, dash = panel
    dash.more.schedule.value = "cosine"
    dash.refresh()
    assert dash.lr_slider.disabled
    dash.more.schedule.value = "none"
    dash.refresh()
    assert not dash.lr_slider.disabled


def test_internals_tab_draws_a_live_snapshot(panel):
    exp, dash = panel
    exp.run(epochs=1)
    dash.tabs.selected_index = 3
    dash.internals.kind.value = "gradients"
    dash.internals.update()  # asks for a snapshot (taken at once: no run is going)
    dash.internals.update()  # and draws it
    grads = exp.internals.layers[0].gradients
    np.testing.assert_allclose(dash.internals.bars.y, grads.counts)
    assert f"at step {exp.step_count}" in dash.internals.caption.value


def test_init_inspector_compares_two_schemes(panel):
    exp, dash = panel
    dash.inspector.first.value = "he"
    dash.inspector.second.value = "zeros"
    reports = dash.inspector.update()
    bars = dash.inspector.bars["activation_std"].y
    assert bars.shape == (2, 4)
    assert np.all(bars[0, :3] > 0) and np.all(bars[1, :3] == 0)  # zeros: every unit alike, 0
    assert reports["he"].layers[0].grad_norm > 0


def test_diagnosis_area_shows_a_finding_and_its_remedy_button_acts():
    exp = Experiment(preset="exploding", seed=0, epochs=2)
    dash = Dashboard(exp)
    try:
        exp.run(epochs=2)
        dash.refresh()
        card = dash.diagnosis.cards["exploding"]
        assert card.box.layout.display == "flex"
        assert "Exploding gradients" in card.text.value and "step" in card.text.value
        assert dash.diagnosis.none.layout.display == "none"
        assert dash.diagnosis.cards["vanishing"].box.layout.display == "none"
        clip = next(b for b in card.buttons if b.description.startswith("Clip"))
        clip.click()
        assert exp.in_force["clip"] == 1.0
        dash.diagnosis.preset.value = "vanishing"
        dash.diagnosis.load.click()
        assert exp.preset == "vanishing" and exp.config.activation == "sigmoid"
        assert exp.step_count == 0 and exp.config.seed == 0
        dash.refresh()
        assert card.box.layout.display == "none"  # a new run: nothing standing yet
    finally:
        dash.close()


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


def test_a_refused_control_says_so_until_a_control_works():
    exp = Experiment(schedule="cosine", epochs=1)
    dash = Dashboard(exp)
    try:
        dash.lr_slider.value = 0.1  # cosine owns the rate: set(lr=...) is refused
        dash.refresh()  # the notice outlives the next refresh
        assert "That change was refused." in dash.error_area.value
        assert "lr is set by the &#x27;cosine&#x27; schedule" in dash.error_area.value
        assert "The run failed" not in dash.error_area.value
        assert dash.error_area.layout.display == "block" and exp.config.lr == 1e-3
        dash.dropout_toggle.value = True  # a control that works clears it
        dash.refresh()
        assert dash.error_area.layout.display == "none"
    finally:
        dash.close()
