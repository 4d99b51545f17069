import threading

import numpy as np
import pytest
import torch

from nbtrain import Experiment, Playground
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
