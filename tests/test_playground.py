import threading
import time

import numpy as np
import pytest
import torch

from nbtrain import Experiment, Playground, RegressionPlayground
from nbtrain.playground import DATASETS, FEATURES, make_dataset, make_sine, transform


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_is_seeded_and_has_the_requested_size(name):
    x, y = make_dataset(name, n_samples=123, noise=0.1, seed=3)
    again_x, again_y = make_dataset(name, n_samples=123, noise=0.1, seed=3)
    other_x, _ = make_dataset(name, n_samples=123, noise=0.1, seed=4)
    assert x.shape == (123, 2) and y.shape == (123,) and x.dtype == np.float32
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    assert not np.allclose(x, other_x)
    assert set(np.unique(y)) == {0, 1}
    assert 0.35 < y.mean() < 0.65


@pytest.mark.parametrize("name", ["circles", "moons", "xor", "spirals"])
@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_noise_is_gaussian_jitter_of_the_requested_size(name, noise):
    # With the same seed, the noisy set is the clean one plus the jitter drawn last.
    clean, y0 = make_dataset(name, n_samples=2000, noise=0.0, seed=1)
    noisy, y1 = make_dataset(name, n_samples=2000, noise=noise, seed=1)
    assert np.array_equal(y0, y1)
    jitter = noisy - clean
    assert abs(jitter.std() / noise - 1) < 0.05 and abs(jitter.mean()) < 0.02


def test_two_gaussians_spread_by_the_noise():
    x, y = make_dataset("gaussians", n_samples=2000, noise=0.3, seed=0)
    for label, centre in ((0, -0.5), (1, 0.5)):
        cloud = x[y == label]
        assert np.allclose(cloud.mean(axis=0), centre, atol=0.03)
        assert np.allclose(cloud.std(axis=0), 0.3, rtol=0.08)


def test_clean_circles_lie_on_two_radii():
    x, y = make_dataset("circles", n_samples=200, noise=0.0)
    radius = np.hypot(x[:, 0], x[:, 1])
    assert np.allclose(radius[y == 0], 1.0, atol=1e-5) and np.allclose(radius[y == 1], 0.5)


def test_bad_dataset_arguments_name_the_parameter():
    with pytest.raises(ValueError, match=r"dataset must be one of 'circles', .*, got 'rings'"):
        make_dataset("rings")
    with pytest.raises(ValueError, match=r"noise must be a number in \[0, 1\], got -0.1"):
        make_dataset("xor", noise=-0.1)
    with pytest.raises(ValueError, match=r"n_samples must be an integer of at least 4, got 2"):
        make_dataset("xor", n_samples=2)
    with pytest.raises(ValueError, match=r"n_samples must be an integer of at least 2, got 1"):
        make_sine(n_samples=1)


def test_sine_is_seeded_noisy_and_one_dimensional():
    x, y = make_sine(500, noise=0.2, seed=2)
    assert x.shape == (500, 1) and y.shape == (500,)
    assert np.array_equal(x, make_sine(500, noise=0.2, seed=2)[0])
    residual = y - np.sin(x[:, 0])
    assert abs(residual.std() - 0.2) < 0.02
    assert x.min() >= -np.pi and x.max() <= np.pi


def test_feature_switches_set_the_input_width_and_none_is_refused():
    pg = Playground("xor", features=("x1", "x2"), hidden=(4,), epochs=1)
    assert pg.experiment.data.n_features == 2
    first = pg.experiment
    pg.restart(features=("x1*x2", "x1", "sin(x2)"))
    assert pg.features == ("x1", "x1*x2", "sin(x2)")  # the switches' order
    assert pg.experiment is not first and pg.experiment.data.n_features == 3
    assert pg.experiment.config.hidden == (4,)  # the other settings carry over
    with pytest.raises(ValueError, match=r"features must switch on at least one input, got none"):
        pg.restart(features=())
    with pytest.raises(ValueError, match=r"unknown feature 'x3'; allowed: x1, x2, x1\^2"):
        pg.restart(features=("x1", "x3"))
    assert pg.features == ("x1", "x1*x2", "sin(x2)")  # a refused change changes nothing


def test_transform_computes_each_feature():
    x = np.array([[0.5, -2.0]], dtype=np.float32)
    out = transform(x, list(FEATURES))
    expected = [0.5, -2.0, 0.25, 4.0, -1.0, np.sin(0.5), np.sin(-2.0)]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_raw_points_are_split_as_the_engine_split_them():
    pg = Playground("moons", features=("x1", "x2", "x1^2"), val_fraction=0.25, seed=5)
    data = pg.experiment.data
    torch.testing.assert_close(pg.features_of(pg.x[pg.train_index]), data.x_train)
    torch.testing.assert_close(pg.features_of(pg.x[pg.val_index]), data.x_val)
    assert np.array_equal(pg.y[pg.val_index], data.y_val.numpy())


def test_grid_probabilities_are_the_models_output_at_those_points():
    pg = Playground("xor", features=("x1", "x2", "x1*x2"), hidden=(), resolution=7, epochs=2)
    pg.experiment.run()
    grid = pg.grid()
    assert grid.prob.shape == (7, 7) and grid.step == pg.experiment.step_count

    # By hand: features, the training statistics, the linear layer, a two-class softmax.
    head = pg.experiment.model.head
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    mean, std = pg.experiment.data.mean.numpy(), pg.experiment.data.std.numpy()
    for i, j in [(0, 0), (3, 5), (6, 1)]:
        x1, x2 = grid.x1[j], grid.x2[i]
        z = (np.array([x1, x2, x1 * x2]) - mean) / std
        logits = w @ z + b
        expected = 1 / (1 + np.exp(logits[0] - logits[1]))
        assert grid.prob[i, j] == pytest.approx(expected, rel=1e-5)


def test_grid_of_a_deep_net_in_train_mode_is_its_eval_output():
    pg = Playground("circles", hidden=(8, 8), dropout=0.5, batchnorm=True, resolution=5)
    pg.experiment.run(epochs=1)
    pg.experiment.model.train()
    grid = pg.grid()
    points = np.array([[grid.x1[2], grid.x2[4]], [grid.x1[0], grid.x2[1]]], dtype=np.float32)
    model = pg.experiment.model
    model.eval()
    with torch.no_grad():
        inputs = (torch.from_numpy(points) - pg.experiment.data.mean) / pg.experiment.data.std
        expected = torch.softmax(model(inputs), dim=1)[:, 1].numpy()
    np.testing.assert_allclose([grid.prob[4, 2], grid.prob[1, 0]], expected, rtol=1e-6)
    assert pg.experiment.model.training is False  # put back as we left it above


def test_grid_of_a_running_experiment_is_computed_between_steps_in_its_thread():
    pg = Playground("circles", hidden=(8,), epochs=200)
    exp = pg.experiment
    seen = []
    exp.model.register_forward_hook(
        lambda m, i, o: seen.append((len(i[0]), threading.current_thread(), m.training))
    )
    exp.start()
    try:
        while exp.step_count < 5:
            pass
        grid = pg.grid()
    finally:
        exp.stop()
    grid_calls = [(thread, training) for n, thread, training in seen if n == 50 * 50]
    assert grid_calls == [(exp._worker, False)]
    assert 5 <= grid.step <= exp.step_count


def test_spirals_need_hidden_layers():
    accuracies = {}
    for hidden in [(), (32, 32, 32)]:
        pg = Playground("spirals", noise=0.05, hidden=hidden, seed=0)
        pg.experiment.run()
        accuracies[hidden] = pg.experiment.history.last("val_acc")
    assert accuracies[(32, 32, 32)] > 0.9
    assert accuracies[()] < 0.75


def test_xor_is_linear_in_the_product_feature():
    accuracies = {}
    for features in [("x1", "x2"), ("x1", "x2", "x1*x2")]:
        pg = Playground("xor", features=features, hidden=(), epochs=30, seed=0)
        pg.experiment.run()
        accuracies[features] = pg.experiment.history.last("val_acc")
    assert accuracies[("x1", "x2", "x1*x2")] > 0.9
    assert accuracies[("x1", "x2")] < 0.7


def test_a_playground_takes_experiment_settings_and_checks_them():
    pg = Playground("moons", lr=0.05, seed=2)
    assert isinstance(pg.experiment, Experiment) and pg.experiment.config.lr == 0.05
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got -1"):
        Playground("moons", lr=-1)
    with pytest.raises(ValueError, match=r"resolution must be an integer of at least 2, got 1"):
        Playground("moons", resolution=1)


# Regression: the noisy sine


def test_a_regression_playground_is_split_and_standardized_as_the_engine_did_it():
    pg = RegressionPlayground(n_samples=50, noise=0.1, val_fraction=0.4, seed=3, epochs=1)
    exp = pg.experiment
    assert exp.task == "regression" and isinstance(exp.loss_fn, torch.nn.MSELoss)
    assert len(pg.train_index) == 30 and len(pg.val_index) == 20
    torch.testing.assert_close(pg.features_of(pg.x[pg.train_index]), exp.data.x_train)
    torch.testing.assert_close(pg.features_of(pg.x[pg.val_index]), exp.data.x_val)
    # The targets stay in their own units (one column, as the built-in MLP outputs).
    np.testing.assert_array_equal(exp.data.y_val.numpy()[:, 0], pg.y[pg.val_index])
    np.testing.assert_array_equal(exp.data.y_train.numpy()[:, 0], pg.y[pg.train_index])


def test_the_curve_is_the_models_output_at_those_inputs():
    pg = RegressionPlayground(n_samples=40, hidden=(), resolution=11, epochs=3, seed=1)
    pg.experiment.run()
    curve = pg.curve()
    assert curve.step == pg.experiment.step_count > 0
    assert np.all(np.diff(curve.x) > 0) and len(curve.x) == len(curve.y) == 11
    assert curve.x[0] < pg.x.min() and curve.x[-1] > pg.x.max()  # a margin either side

    # By hand: the training mean and std of x from the raw points, then the linear layer.
    head = pg.experiment.model.head
    w, b = head.weight.item(), head.bias.item()
    train_x = pg.x[pg.train_index, 0].astype(np.float64)
    z = (curve.x - train_x.mean()) / train_x.std()
    np.testing.assert_allclose(curve.y, w * z + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pg.predict(curve.x[[2, 7]]), curve.y[[2, 7]], rtol=1e-6)


def test_the_curve_of_a_deep_net_in_train_mode_is_its_eval_output():
    pg = RegressionPlayground(hidden=(16, 16), dropout=0.5, batchnorm=True, resolution=9)
    pg.experiment.run(epochs=2)
    model = pg.experiment.model
    model.train()
    curve = pg.curve()
    assert model.training is True  # put back as it was
    model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(curve.x[:, None]) - pg.experiment.data.mean
        expected = model(inputs / pg.experiment.data.std)[:, 0].numpy()
    np.testing.assert_allclose(curve.y, expected, rtol=1e-6)


def _mse(pg: RegressionPlayground, index: np.ndarray) -> float:
    """Mean squared error at the raw points `index`, by the curve's own route (predict)."""
    return float(np.mean((pg.predict(pg.x[index]) - pg.y[index]) ** 2))


def test_a_network_with_hidden_layers_fits_the_sine_and_a_line_does_not():
    results = {}
    for hidden in [(), (32, 32)]:
        pg = RegressionPlayground(n_samples=200, noise=0.2, hidden=hidden, epochs=60, seed=0)
        history = pg.experiment.run()
        val_mse = history.last("val_loss")
        assert val_mse == pytest.approx(_mse(pg, pg.val_index), rel=1e-4)
        results[hidden] = (history.last("train_loss", "eval"), val_mse)
    variance = float(np.var(pg.y[pg.val_index]))  # what predicting the mean would score
    assert results[(32, 32)][1] < 0.2 * variance
    assert results[(32, 32)][1] < 2 * 0.2**2  # within about the noise's own variance
    # The line underfits: the training points are missed as badly as the validation ones.
    assert min(results[()]) > 0.35 * variance


def test_a_wide_network_on_few_noisy_points_overfits():
    # 10 training points, 30 held out: the network passes near every training point.
    pg = RegressionPlayground(
        n_samples=40, noise=0.3, val_fraction=0.75, hidden=(256, 256), epochs=300, seed=0
    )
    history = pg.experiment.run()
    train_mse, val_mse = history.last("train_loss", "eval"), history.last("val_loss")
    assert len(pg.train_index) == 10
    assert train_mse == pytest.approx(_mse(pg, pg.train_index), rel=1e-4)
    assert train_mse < 0.5 * 0.3**2  # below the noise: it learned the noise too
    assert val_mse > 3 * train_mse


def test_a_regression_restart_keeps_the_settings_and_refuses_bad_values():
    pg = RegressionPlayground(n_samples=30, hidden=(8,), lr=0.02, epochs=1)
    first = pg.experiment
    pg.restart(noise=0.5, hidden=(4, 4))
    assert pg.experiment is not first and pg.noise == 0.5 and pg.n_samples == 30
    assert pg.experiment.config.hidden == (4, 4) and pg.experiment.config.lr == 0.02
    residual = pg.y - np.sin(pg.x[:, 0])
    assert residual.std() > 0.3  # the new data carry the new noise
    with pytest.raises(ValueError, match=r"noise must be a number in \[0, 1\], got 1.5"):
        pg.restart(noise=1.5)
    with pytest.raises(ValueError, match=r"n_samples must be an integer of at least 2, got 1"):
        pg.restart(n_samples=1)
    assert pg.noise == 0.5 and pg.experiment.config.hidden == (4, 4)  # refused: unchanged
    with pytest.raises(ValueError, match=r"resolution must be an integer of at least 2, got 0"):
        RegressionPlayground(resolution=0)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 1\), got 1.5"):
        RegressionPlayground(val_fraction=1.5)


def test_a_refused_restart_leaves_the_running_experiment_training():
    pg = Playground("xor", n_samples=60, hidden=(4,), epochs=10_000)
    running = pg.experiment
    running.start()
    try:
        with pytest.raises(ValueError, match=r"noise must be a number in \[0, 1\], got 2"):
            pg.restart(noise=2)
        assert pg.experiment is running and running.state == "running"
        before = running.step_count
        deadline = time.monotonic() + 10
        while running.step_count <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.step_count > before  # still training, not stopped by the refusal
    finally:
        running.stop()


def test_the_drawn_split_follows_a_restart_of_the_experiment_with_another_seed():
    pg = Playground("moons", n_samples=80, features=("x1", "x2"), val_fraction=0.25, seed=1)
    before = pg.val_index.copy()
    pg.experiment.restart(seed=7)  # the dashboard's Architecture tab does this
    assert not np.array_equal(np.sort(pg.val_index), np.sort(before))
    data = pg.experiment.data
    torch.testing.assert_close(pg.features_of(pg.x[pg.val_index]), data.x_val)
    assert np.array_equal(pg.y[pg.train_index], data.y_train.numpy())
