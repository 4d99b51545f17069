"""Bad configuration is refused with a message naming the parameter, the value and what is
allowed; odd but legal data trains."""

import numpy as np
import pytest
import torch

from nbtrain import Dashboard, Experiment

# Each entry: keyword arguments for Experiment(...) and the message they must produce.
BAD_CONFIG = [
    ({"hidden": None}, r"hidden must be a sequence of positive integers .*, got None"),
    ({"hidden": "128"}, r"hidden must be a sequence of positive integers .*, got '128'"),
    ({"hidden": 64}, r"hidden must be a sequence of positive integers .*, got 64"),
    ({"hidden": (64, 2.5)}, r"hidden must be .*, got \(64, 2.5\)"),
    ({"hidden": (64, True)}, r"hidden must be .*, got \(64, True\)"),
    ({"hidden": (64, -1)}, r"hidden must be .*, got \(64, -1\)"),
    ({"activation": "ReLU"}, r"activation must be one of 'relu', .*, got 'ReLU'"),
    ({"activation": None}, r"activation must be one of .*, got None"),
    ({"init": "kaiming"}, r"init must be one of 'default', 'he', .*, got 'kaiming'"),
    ({"optimizer": "lbfgs"}, r"optimizer must be one of .*'adam'.*, got 'lbfgs'"),
    ({"lr": 0}, r"lr must be a positive finite number, got 0"),
    ({"lr": -0.1}, r"lr must be a positive finite number, got -0.1"),
    ({"lr": float("nan")}, r"lr must be a positive finite number, got nan"),
    ({"lr": float("inf")}, r"lr must be a positive finite number, got inf"),
    ({"lr": "1e-3"}, r"lr must be a positive finite number, got '1e-3'"),
    ({"lr": True}, r"lr must be a positive finite number, got True"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"batch_size": 32.0}, r"batch_size must be a positive integer, got 32.0"),
    ({"batch_size": None}, r"batch_size must be a positive integer, got None"),
    ({"epochs": -1}, r"epochs must be a positive integer, got -1"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\), got -0.1"),
    ({"dropout": None}, r"dropout must be a number in \[0, 1\), got None"),
    ({"batchnorm": 1}, r"batchnorm must be True or False, got 1"),
    ({"batchnorm": "yes"}, r"batchnorm must be True or False, got 'yes'"),
    ({"clip": 0}, r"clip must be None \(no clipping\) or a positive max gradient norm, got 0"),
    ({"clip": float("nan")}, r"clip must be None .*, got nan"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ({"seed": 1.5}, r"seed must be a non-negative integer, got 1.5"),
    ({"val_fraction": 0}, r"val_fraction must be a number in \(0, 1\), got 0"),
    ({"val_fraction": 1}, r"val_fraction must be a number in \(0, 1\), got 1"),
    ({"eval_every": 0}, r"eval_every must be a positive integer, got 0"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be a positive integer, got 0"),
    ({"threads": 0}, r"threads must be a positive integer, got 0"),
    ({"epoch": 3}, r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"),
    (
        {"batchnorm": True, "batch_size": 1},
        r"batchnorm=True needs batch_size of at least 2 .*, got batch_size=1",
    ),
]

BAD_CHANGES = [
    ({"lr": 0.0}, r"lr must be a positive finite number, got 0.0"),
    ({"dropout": 0.99999 + 1}, r"dropout must be a number in \[0, 1\)"),
    ({"clip": -1}, r"clip must be None \(no clipping\) or a positive max gradient norm, got -1"),
    ({"batchnorm": None}, r"batchnorm must be True or False, got None"),
    ({"hidden": (8,)}, r"'hidden' is fixed for a run; set\(\) can change dropout, "),
    ({"colour": 0.9}, r"'colour' is not a parameter; set\(\) can change"),
    ({}, r"set\(\) needs at least one change; allowed: dropout, batchnorm, clip, lr"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIG)
def test_bad_configuration_is_refused_by_name(small_data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Experiment(data=small_data, **kwargs)


@pytest.mark.parametrize(("changes", "message"), BAD_CHANGES)
def test_bad_live_changes_are_refused_and_nothing_is_queued(small_data, changes, message):
    exp = Experiment(data=small_data, hidden=(16,))
    with pytest.raises(ValueError, match=message):
        exp.set(**changes)
    assert exp.pending == {} and exp.history.changes() == []


def test_batchnorm_switched_on_with_a_batch_of_one_names_both_fields(small_data):
    exp = Experiment(data=small_data, hidden=(16,), batch_size=1)
    with pytest.raises(ValueError, match=r"batchnorm=True needs batch_size of at least 2.*=1"):
        exp.set(batchnorm=True)
    assert exp.config.batchnorm is False and exp.pending == {}


def test_a_batch_of_one_while_batchnorm_is_on_is_refused_live(small_data):
    exp = Experiment(data=small_data, hidden=(16,), batchnorm=True)
    with pytest.raises(ValueError, match=r"batchnorm=True needs batch_size of at least 2.*=1"):
        exp.set(batch_size=1)
    assert exp.config.batch_size == 64 and exp.pending == {}


def test_batchnorm_on_a_single_training_sample_is_refused():
    x, y = np.eye(2, dtype=np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match=r"batchnorm=True needs at least 2 training samples"):
        Experiment(data=(x, y), hidden=(4,), batchnorm=True)


@pytest.mark.parametrize(
    ("epochs", "message"),
    [(0, "got 0"), (True, "got True"), (1.5, "got 1.5"), ("3", "got '3'")],
)
def test_bad_epochs_for_run_start_are_refused(small_data, epochs, message):
    exp = Experiment(data=small_data, hidden=(16,))
    for method in (exp.run, exp.start):
        with pytest.raises(ValueError, match=f"epochs must be a positive integer, {message}"):
            method(epochs)
    assert not exp.running and exp.state == "idle"


def test_numpy_scalars_from_arrays_and_sliders_are_accepted(small_data):
    exp = Experiment(
        data=small_data, hidden=np.array([16, 8]), batch_size=np.int64(32), lr=np.float32(0.01)
    )
    assert exp.config.hidden == (16, 8) and exp.config.batch_size == 32
    assert type(exp.config.batch_size) is int and abs(exp.config.lr - 0.01) < 1e-6


# Data


BAD_DATA = [
    ([1, 2, 3], r"data must be None \(digits\) or a pair \(X, y\)"),
    (([[1.0]], [0]), r"data X must be a numpy array or a torch tensor, got list"),
    ((np.zeros((4, 2)), np.zeros(3)), r"data X has 4 rows but y has 3 labels"),
    (
        (np.array(["a", "b", "c", "d"]), np.arange(4)),
        r"data X must hold real numbers, got dtype <U1",
    ),
    ((np.zeros((4, 2), dtype=complex), np.arange(4)), r"data X must hold real numbers, got dtype"),
    ((np.zeros((4, 2)), np.zeros((4, 3))), r"data y must hold one class label per row .*\(4, 3\)"),
    ((np.zeros((1, 2)), np.zeros(1)), r"data must leave at least one sample for training and one"),
    ((np.zeros(()), np.zeros(())), r"data X and y must be arrays over samples"),
    (
        (np.zeros((4, 2)), np.array([0, 1, np.nan, 1])),
        r"data y must be finite class labels, got 1",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_DATA)
def test_bad_data_is_refused_by_name(data, message):
    with pytest.raises(ValueError, match=message):
        Experiment(data=data, hidden=(4,))


def test_nan_and_inf_inputs_are_refused_with_the_count_and_the_first_position(small_data):
    x, y = small_data
    x = x.clone()
    x[7, 3] = float("nan")
    x[9, 0] = float("inf")
    x[200, 5] = float("-inf")
    with pytest.raises(
        ValueError, match=r"got 3 NaN or infinite value\(s\).*first at index \(7, 3\)"
    ):
        Experiment(data=(x, y))


def test_float64_beyond_float32_range_counts_as_infinite():
    x = np.ones((20, 3, 2))
    x[4, 2, 1] = 1e300
    with pytest.raises(ValueError, match=r"got 1 NaN or infinite.*first at index \(4, 2, 1\)"):
        Experiment(data=(x, np.arange(20) % 2))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint8, np.bool_])
def test_float64_and_integer_inputs_train(small_data, dtype):
    x, y = small_data
    x = (x.numpy() * 10).astype(dtype)
    exp = Experiment(data=(x, y.numpy()), hidden=(16,), epochs=2)
    assert exp.data.x_train.dtype == torch.float32
    exp.run()
    assert exp.state == "finished" and np.isfinite(exp.history.series("train_loss")[1]).all()


def test_labels_that_are_not_0_to_n_minus_1_are_mapped_in_sorted_order(small_data):
    x, y = small_data
    names = np.array(["cat", "dog", "emu"])[y.numpy()]
    exp = Experiment(data=(x, names), hidden=(16,), epochs=3)
    assert list(exp.data.classes) == ["cat", "dog", "emu"]
    assert sorted(set(exp.data.y_train.tolist())) == [0, 1, 2]
    sparse = np.array([-5, 10, 99])[y.numpy()]
    exp2 = Experiment(data=(x, sparse), hidden=(16,), epochs=5, lr=0.05)
    assert list(exp2.data.classes) == [-5, 10, 99]
    assert torch.equal(exp2.data.y_train, exp.data.y_train)  # same split, same indices
    assert exp2.run().last("val_acc") > 0.8


def test_a_single_class_trains_to_zero_loss_and_full_accuracy():
    x = np.random.default_rng(0).normal(size=(40, 3))
    exp = Experiment(data=(x, np.full(40, 7)), hidden=(8,), epochs=2, batchnorm=True)
    assert exp.data.n_classes == 1
    exp.run()
    assert exp.state == "finished" and exp.history.last("val_acc") == 1.0
    assert exp.history.last("train_loss") == 0.0


def test_a_class_with_one_member_falls_back_to_a_plain_shuffled_split(small_data):
    x, y = small_data
    y = y.clone()
    y[0] = 3  # a fourth class, seen once: stratification is impossible
    exp = Experiment(data=(x, y), hidden=(16,), epochs=5, lr=0.05)
    assert len(exp.data.y_train) + len(exp.data.y_val) == 300 and len(exp.data.y_val) == 60
    assert exp.data.n_classes == 4
    assert exp.run().last("val_acc") > 0.5
    again = Experiment(data=(x, y), hidden=(16,))
    assert torch.equal(again.data.y_val, exp.data.y_val)  # still seeded


def test_more_classes_than_validation_samples_falls_back_too():
    x = np.random.default_rng(1).normal(size=(24, 2))
    y = np.repeat(np.arange(6), 4)  # 6 classes, a validation split of 5
    exp = Experiment(data=(x, y), hidden=(4,), epochs=1)
    assert len(exp.data.y_val) == 5
    exp.run()
    assert exp.state == "finished"


def test_a_validation_set_smaller_than_a_batch_is_evaluated_whole(small_data):
    x, y = small_data
    exp = Experiment(
        data=(x, y), hidden=(16,), val_fraction=0.02, batch_size=64, eval_batch_size=64, epochs=1
    )
    assert len(exp.data.y_val) == 6
    exp.run()
    acc = exp.history.last("val_acc")
    assert acc * 6 == pytest.approx(round(acc * 6))  # a fraction of the 6 samples


def test_a_last_batch_of_one_sample_with_batchnorm_is_folded_into_the_one_before():
    # 81 samples, val 0.2 -> 64 train + 17 val, batch 21: batches 21, 21, 22 (not 21, 21, 21, 1)
    x = np.random.default_rng(2).normal(size=(81, 4)).astype(np.float32)
    y = np.arange(81) % 2
    exp = Experiment(data=(x, y), hidden=(8,), batch_size=21, batchnorm=True, epochs=2)
    assert len(exp.data.y_train) == 64
    assert exp.steps_per_epoch == 3
    sizes = []
    exp.on("step_completed", lambda e, _: sizes.append(e._bounds[e._pos - 1]))
    exp.run()
    assert exp.state == "finished" and len(exp.history) == 6
    assert [end - start for start, end in sizes[:3]] == [21, 21, 22]


def test_panel_controls_hold_every_configured_value_unclamped(small_data):
    exp = Experiment(data=small_data, hidden=(16,), lr=5.0, clip=500.0, dropout=0.95)
    dash = Dashboard(exp)
    try:
        assert dash.lr_slider.value == pytest.approx(5.0)
        assert dash.clip_norm.value == pytest.approx(500.0)
        assert dash.dropout_rate.value == pytest.approx(0.95)
        assert dash.dropout_rate.max < 1  # the control cannot produce dropout=1
        assert exp.pending == {} and exp.history.changes() == []  # building sent nothing
    finally:
        dash.close()


def test_the_further_controls_hold_every_configured_value_unclamped(small_data):
    exp = Experiment(
        data=small_data,
        hidden=(16,),
        weight_decay=0.5,
        l1=0.1,
        patience=5000,
        min_delta=50.0,
        batch_size=1000,
    )
    dash = Dashboard(exp)
    try:
        more = dash.more
        assert more.weight_decay.value == pytest.approx(0.5)
        assert more.l1.value == pytest.approx(0.1)
        assert more.patience.value == 5000 and more.min_delta.value == 50.0
        assert more.batch_size.value == 1000
        assert exp.pending == {} and exp.history.changes() == []
    finally:
        dash.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, r"rate must be in \(0, 10\] refreshes per second, got 0"),
        ({"rate": 11}, r"rate must be in \(0, 10\] refreshes per second, got 11"),
        ({"rate": "fast"}, r"rate must be in \(0, 10\] refreshes per second, got 'fast'"),
        ({"max_points": 5}, r"max_points must be an integer of at least 10, got 5"),
        ({"max_points": 100.5}, r"max_points must be an integer of at least 10, got 100.5"),
    ],
)
def test_bad_panel_arguments_are_refused_by_name(small_data, kwargs, message):
    exp = Experiment(data=small_data, hidden=(16,))
    with pytest.raises(ValueError, match=message):
        Dashboard(exp, **kwargs)
    with pytest.raises(ValueError, match=r"experiment must be an nbtrain.Experiment, got 'exp'"):
        Dashboard("exp")


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((90,), {"hidden": (8,)}),  # one feature as a flat vector
        ((90, 2, 3), {"hidden": (8,)}),  # images are flattened
        ((90, 4), {"hidden": ()}),  # no hidden layer: logistic regression
        ((90, 4), {"hidden": (8,), "batch_size": 500}),  # one batch bigger than the set
        ((90, 4), {"hidden": (8,), "batch_size": 1}),  # pure SGD, batch norm off
    ],
)
def test_odd_but_legal_shapes_and_sizes_train(shape, kwargs):
    x = np.random.default_rng(3).normal(size=shape)
    y = np.arange(90) % 2
    exp = Experiment(data=(x, y), epochs=1, **kwargs)
    exp.run()
    assert exp.state == "finished" and len(exp.history) == exp.steps_per_epoch
    assert np.isfinite(exp.history.series("train_loss")[1]).all()
