import pytest

from nbtrain import Experiment
from nbtrain.config import check_changes, make_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1}, r"lr must be a positive finite number, got -1"),
        ({"lr": float("nan")}, r"lr must be a positive finite number, got nan"),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"batch_size": 6.5}, r"batch_size must be a positive integer, got 6.5"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"activation": "relu6"}, r"activation must be one of 'relu', .*'gelu', got 'relu6'"),
        (
            {"hidden": (128, 0)},
            r"hidden must be a sequence of positive integers .*, got \(128, 0\)",
        ),
        ({"clip": 0}, r"clip must be None \(no clipping\) or a positive max gradient norm, got 0"),
        ({"batchnorm": "yes"}, r"batchnorm must be True or False, got 'yes'"),
        ({"val_fraction": 0}, r"val_fraction must be a number in \(0, 1\), got 0"),
        ({"lrr": 0.1}, r"unknown parameter 'lrr' \(did you mean 'lr'\?\)"),
    ],
)
def test_bad_configuration_names_parameter_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config(kwargs)


def test_experiment_validates_before_loading_anything():
    with pytest.raises(ValueError, match=r"epochs must be a positive integer, got -3"):
        Experiment(epochs=-3)


def test_set_refuses_what_is_fixed_for_a_run_and_bad_values():
    with pytest.raises(ValueError, match=r"'hidden' is fixed for a run; set\(\) can change"):
        check_changes({"hidden": (8,)})
    with pytest.raises(ValueError, match=r"'nesterov' is not a parameter"):
        check_changes({"nesterov": True})
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got -0.1"):
        check_changes({"dropout": -0.1})
    with pytest.raises(ValueError, match=r"set\(\) needs at least one change"):
        check_changes({})


def test_valid_values_come_back_canonical():
    cfg = make_config({"hidden": [16, 8], "lr": 1, "clip": 2})
    assert cfg.hidden == (16, 8)
    assert isinstance(cfg.lr, float) and cfg.clip == 2.0


def test_no_hidden_layers_is_a_linear_model(small_data):
    # hidden=() is the Playground's linear model: inputs straight to the output layer.
    exp = Experiment(data=small_data, hidden=(), lr=0.05, epochs=5)
    assert exp.config.hidden == ()
    assert len(exp.model.blocks) == 0 and exp.model.head.in_features == 8
    assert exp.probe.layer_names == ["output"]
    exp.run()
    assert exp.history.last("val_acc") > 0.5
