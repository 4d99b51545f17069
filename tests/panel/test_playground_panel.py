import time

import numpy as np
import pytest

from nbtrain import Dashboard, Playground, PlaygroundPanel, RegressionPlayground


@pytest.fixture
def panel():
    pg = Playground("circles", hidden=(8,), epochs=2, resolution=20)
    view = PlaygroundPanel(pg)
    yield pg, view
    pg.experiment.stop()
    view.close()


def test_the_heat_map_and_points_show_the_grid_and_the_split(panel):
    pg, view = panel
    pg.experiment.run()
    grid = view.refresh()
    heat = view.boundary.heat
    np.testing.assert_array_equal(heat.color, grid.prob.astype(np.float32))
    np.testing.assert_allclose(heat.color, pg.grid().prob, rtol=1e-6)
    np.testing.assert_array_equal(heat.x, pg.axes[0])
    assert view.boundary.figure.title == f"Decision boundary at step {pg.experiment.step_count}"
    np.testing.assert_array_equal(view.boundary.train.x, pg.x[pg.train_index, 0])
    np.testing.assert_array_equal(view.boundary.val.color, pg.y[pg.val_index])
    assert len(view.boundary.train.x) + len(view.boundary.val.x) == pg.n_samples


def test_the_boundary_moves_while_a_run_trains_in_the_background(panel):
    pg, view = panel
    pg.experiment.start(epochs=40)
    deadline = time.perf_counter() + 30
    while len(view.update_seconds) < 3 and time.perf_counter() < deadline:
        time.sleep(0.05)
    steps_drawn = view.boundary.figure.title
    pg.experiment.stop()
    assert len(view.update_seconds) >= 3, "the panel's thread drew no boundary while training"
    assert steps_drawn != "Decision boundary at step 0"


def test_a_feature_switch_is_a_new_experiment_in_the_same_dashboard(panel):
    pg, view = panel
    first = pg.experiment
    view.features["x1*x2"].value = True
    assert pg.features == ("x1", "x2", "x1*x2") and pg.experiment is not first
    assert view.dashboard.experiment is pg.experiment
    view.refresh()
    assert view.boundary.heat.color.shape == (20, 20)

    view.dataset.value = "spirals"
    assert pg.dataset == "spirals" and pg.experiment.data.n_features == 3
    view.refresh()
    np.testing.assert_array_equal(view.boundary.train.x, pg.x[pg.train_index, 0])


def test_switching_every_feature_off_is_refused_in_the_panel(panel):
    pg, view = panel
    view.features["x1"].value = False
    experiment = pg.experiment
    view.features["x2"].value = False
    assert "features must switch on at least one input" in view.message.value
    assert view.features["x2"].value is True  # the switch shows what is in force again
    assert pg.features == ("x2",) and pg.experiment is experiment


def test_a_restart_with_other_layers_gets_a_new_dashboard(panel):
    pg, view = panel
    old = view.dashboard
    pg.restart(hidden=(4, 4))
    assert view.dashboard is not old and view.children[2] is view.dashboard
    assert view.dashboard.experiment is pg.experiment


def test_a_dashboard_shows_a_linear_model_from_its_first_step():
    # One layer only: at one step its norm line would be a 1x1 array, which bqplot refuses.
    pg = Playground("xor", hidden=(), epochs=3)
    dash = Dashboard(pg.experiment)
    try:
        pg.experiment.step()
        dash.refresh()
        assert pg.experiment.step_count == 1
        pg.experiment.stop()
        pg.experiment.run()
        dash.refresh()
        steps, norms = pg.experiment.history.series("grad_norm/output")
        np.testing.assert_array_equal(dash.gradients.norms.x.reshape(-1), steps)
        np.testing.assert_allclose(dash.gradients.norms.y.reshape(-1), norms, rtol=1e-6)
    finally:
        pg.experiment.stop()
        dash.close()


def test_a_new_experiment_in_the_dashboard_clears_the_last_runs_gradients(panel):
    pg, view = panel
    pg.experiment.run()
    view.dashboard.refresh()
    assert view.dashboard.gradients.norms.x.shape == (2, pg.experiment.step_count)
    view.features["x1*x2"].value = True
    view.dashboard.refresh()
    assert len(view.dashboard.gradients.bars.x) == 0
    assert len(view.dashboard.gradients.norms.x) == 0 and len(view.dashboard.loss.raw.x) == 0
    pg.experiment.run(epochs=1)
    view.dashboard.refresh()
    assert view.dashboard.gradients.norms.x.shape == (2, pg.experiment.step_count)
    assert list(view.dashboard.gradients.bars.x) == ["hidden1", "output"]


def test_layer_controls_restart_with_equal_widths_and_a_data_change_keeps_a_funnel(panel):
    pg, view = panel
    view.layers.value = 2
    assert pg.experiment.config.hidden == (8, 8)
    view.width.value = 32
    assert pg.experiment.config.hidden == (32, 32) and view.dashboard.experiment is pg.experiment
    view.layers.value = 0
    assert pg.experiment.config.hidden == () and view.width.disabled
    # A restart from code moves the controls; a data change then keeps its layers.
    pg.restart(hidden=(24, 12))
    assert view.layers.value == 2 and view.width.value == 24 and not view.width.disabled
    view.noise.value = 0.3
    assert pg.noise == 0.3 and pg.experiment.config.hidden == (24, 12)


# Regression: the fitted curve


@pytest.fixture
def curve_panel():
    pg = RegressionPlayground(n_samples=60, noise=0.2, hidden=(16,), epochs=2, resolution=50)
    view = PlaygroundPanel(pg)
    yield pg, view
    pg.experiment.stop()
    view.close()


def test_the_curve_and_points_show_the_models_prediction_and_the_split(curve_panel):
    pg, view = curve_panel
    assert view.boundary is None and view.features == {}
    assert view.dataset.value == "sine" and view.dataset.disabled
    pg.experiment.run()
    curve = view.refresh()
    line = view.curve.line
    np.testing.assert_array_equal(line.x, pg.curve_x)
    np.testing.assert_array_equal(line.y, curve.y.astype(np.float32))
    np.testing.assert_allclose(line.y, pg.predict(pg.curve_x), rtol=1e-6)
    assert view.curve.figure.title == f"Fitted curve at step {pg.experiment.step_count}"
    np.testing.assert_array_equal(view.curve.train.x, pg.x[pg.train_index, 0])
    np.testing.assert_array_equal(view.curve.val.y, pg.y[pg.val_index])
    assert len(view.curve.train.x) + len(view.curve.val.x) == 60
    # Every point is inside the fixed axes.
    assert view.curve.y_scale.min < pg.y.min() and view.curve.y_scale.max > pg.y.max()
    # A regression has no accuracy: the dashboard hides that plot, the loss is the MSE.
    assert view.dashboard.accuracy.figure.layout.display == "none"


def test_the_curve_moves_while_a_regression_trains_in_the_background(curve_panel):
    pg, view = curve_panel
    view.refresh()
    before = np.array(view.curve.line.y)
    pg.experiment.start(epochs=300)
    deadline = time.perf_counter() + 30
    while len(view.update_seconds) < 4 and time.perf_counter() < deadline:
        time.sleep(0.05)
    title = view.curve.figure.title
    pg.experiment.stop()
    assert len(view.update_seconds) >= 4, "the panel's thread drew no curve while training"
    assert title != "Fitted curve at step 0"
    assert not np.allclose(view.curve.line.y, before)


def test_regression_controls_are_new_experiments_in_the_same_panel(curve_panel):
    pg, view = curve_panel
    first = pg.experiment
    view.n_samples.value = 20
    assert pg.n_samples == 20 and pg.experiment is not first
    assert view.dashboard.experiment is pg.experiment
    view.refresh()
    assert len(view.curve.train.x) + len(view.curve.val.x) == 20
    view.layers.value = 3
    assert pg.experiment.config.hidden == (16, 16, 16)
    assert view.children[2] is view.dashboard and view.dashboard.experiment is pg.experiment
    view.refresh()
    assert view.curve.figure.title == "Fitted curve at step 0"


def test_a_panel_refuses_what_is_not_a_playground():
    with pytest.raises(ValueError, match=r"playground must be an nbtrain Playground or "):
        PlaygroundPanel("sine")


def test_points_are_redrawn_where_a_restart_with_another_seed_put_them(panel):
    pg, view = panel
    view.refresh()
    before = np.asarray(view.boundary.val.x).copy()
    pg.experiment.restart(seed=9)
    view.refresh()
    np.testing.assert_array_equal(view.boundary.val.x, pg.x[pg.val_index, 0])
    assert not np.array_equal(np.sort(view.boundary.val.x), np.sort(before))
