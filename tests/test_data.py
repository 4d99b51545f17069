import numpy as np
import pytest
import torch

from nbtrain.data import load_digits, prepare


def test_digits_ship_with_scikit_learn():
    x, y = load_digits()
    assert x.shape == (1797, 64)
    assert sorted(set(y.tolist())) == list(range(10))


def test_split_is_stratified_and_standardized_with_train_statistics_only():
    split = prepare(None, val_fraction=0.2, seed=0)
    assert len(split.y_train) + len(split.y_val) == 1797
    assert split.n_features == 64 and split.n_classes == 10
    train_share = np.bincount(split.y_train.numpy()) / len(split.y_train)
    val_share = np.bincount(split.y_val.numpy()) / len(split.y_val)
    assert np.abs(train_share - val_share).max() < 0.01
    # Images: one mean and std over all training pixels; validation only approximately.
    assert abs(split.x_train.mean().item()) < 1e-5
    assert split.x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert abs(split.x_val.mean().item()) > 1e-4
    assert split.image_shape == (8, 8)


def test_tabular_data_is_standardized_per_feature_with_train_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[0.0, 50.0, -3.0], scale=[1.0, 10.0, 0.1], size=(200, 3))
    split = prepare((x, np.arange(200) % 2), val_fraction=0.25, seed=0)
    assert torch.allclose(split.x_train.mean(dim=0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(split.x_train.std(dim=0, unbiased=False), torch.ones(3), atol=1e-4)
    assert not torch.allclose(split.x_val.mean(dim=0), torch.zeros(3), atol=1e-3)
    assert split.image_shape is None


def test_numpy_and_tensor_inputs_give_the_same_split():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)).astype(np.float64)
    y = np.repeat([3, 7], 50)  # labels that are not 0..n-1
    a = prepare((x, y), val_fraction=0.25, seed=1)
    b = prepare((torch.from_numpy(x), torch.from_numpy(y)), val_fraction=0.25, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.x_train.dtype == torch.float32
    assert a.classes.tolist() == [3, 7] and set(a.y_train.tolist()) == {0, 1}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="data X has 10 rows but y has 9 labels"):
        prepare((np.zeros((10, 2)), np.zeros(9)), val_fraction=0.2, seed=0)
