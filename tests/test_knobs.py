"""Issue 4: every knob of the lecture, each with a known numeric outcome."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from nbtrain import Experiment
from nbtrain.internals import inspect_init, measure_internals
from nbtrain.model import FunnelMLP, initialize
from nbtrain.optim import make_optimizer
from nbtrain.regularization import EarlyStopping, shift_and_noise

FAN_IN, FAN_OUT = 64, 128


def _linear_std(scheme, activation="relu", std=0.01):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(FAN_IN, FAN_OUT))
    initialize(layer, scheme, activation, std)
    return layer[0].weight.std().item(), layer[0].bias


@pytest.mark.parametrize(
    ("scheme", "activation", "expected"),
    [
        ("default", "relu", 1 / math.sqrt(3 * FAN_IN)),  # U(±1/sqrt(fan_in)): not He
        ("he", "relu", math.sqrt(2 / FAN_IN)),
        ("he_uniform", "relu", math.sqrt(2 / FAN_IN)),
        ("xavier", "sigmoid", math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_uniform", "sigmoid", math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier", "tanh", 5 / 3 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier", "relu", math.sqrt(2 / (FAN_IN + FAN_OUT))),  # Glorot's: no ReLU factor
        ("normal", "relu", 0.05),
    ],
)
def test_weight_std_of_linear_64_128_matches_the_formula(scheme, activation, expected):
    measured, _ = _linear_std(scheme, activation, std=0.05)
    assert measured == pytest.approx(expected, rel=0.03)


def test_zeros_init_zeroes_weights_and_bias():
    measured, bias = _linear_std("zeros")
    assert measured == 0 and torch.count_nonzero(bias) == 0


def test_xavier_and_he_differ_by_sqrt2_on_a_relu_layer_of_equal_width():
    square = nn.Sequential(nn.Linear(64, 64))
    stds = {}
    for scheme in ("he", "xavier"):
        torch.manual_seed(0)
        initialize(square, scheme, "relu")
        stds[scheme] = square[0].weight.std().item()
    assert stds["he"] / stds["xavier"] == pytest.approx(math.sqrt(2), rel=0.05)


def test_pytorch_default_is_sqrt6_times_smaller_than_he():
    default, _ = _linear_std("default")
    he, _ = _linear_std("he")
    assert he / default == pytest.approx(math.sqrt(6), rel=0.05)


def test_init_inspector_shows_the_vanishing_signal_of_a_bad_scheme():
    exp = Experiment(hidden=(64,) * 6, activation="sigmoid")
    reports = inspect_init(exp, ("xavier", "default"))
    xavier, default = reports["xavier"].layers, reports["default"].layers
    assert [layer.name for layer in xavier][0] == "hidden1" and xavier[-1].name == "output"
    # Under sigmoid, the first layer's gradient is 10x weaker with PyTorch's default.
    assert xavier[0].grad_norm > 10 * default[0].grad_norm
    assert xavier[0].weight_std == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    # For ReLU, He keeps the activations' spread layer after layer; the default shrinks it.
    relu = inspect_init(Experiment(hidden=(64,) * 6), ("he", "default"))
    assert relu["he"].layers[5].activation_std > 3 * relu["default"].layers[5].activation_std


def test_adamw_decay_is_decoupled_and_adam_decay_is_coupled():
    def one_step(name):
        w = nn.Parameter(torch.full((4,), 2.0))
        opt = make_optimizer(name, [w], lr=0.1, momentum=0.9, weight_decay=0.5)
        w.grad = torch.zeros(4)  # no loss gradient: only the decay acts
        opt.step()
        return w.detach()

    assert torch.allclose(one_step("adamw"), torch.full((4,), 2.0 * (1 - 0.1 * 0.5)))
    assert torch.allclose(one_step("sgd"), torch.full((4,), 2.0 - 0.1 * 0.5 * 2.0))
    # Adam normalizes the decay gradient away: the step is lr, whatever the decay.
    assert torch.allclose(one_step("adam"), torch.full((4,), 2.0 - 0.1), atol=1e-4)
    exp = Experiment(optimizer="adamw")
    assert exp.weight_decay_style.startswith("decoupled")
    exp.set(weight_decay=0.01)
    assert exp.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert "decoupled" in exp.history.changes()[0].detail["note"]


def test_l1_shrinks_weights_towards_zero():
    def mean_abs(l1):
        exp = Experiment(epochs=5, l1=l1)
        exp.run()
        return exp.model.blocks[0].linear.weight.abs().mean().item()

    assert mean_abs(1e-2) < 0.7 * mean_abs(0.0)  # measured: 0.077 against 0.145


def test_early_stopping_stops_after_exactly_patience_evaluations_without_improvement():
    exp = Experiment(epochs=10, lr=1e-9, patience=3, min_delta=0.01)
    exp.run()
    assert exp.state == "finished"
    assert exp.epoch_count == 3 and exp.step_count == 3 * exp.steps_per_epoch
    stop = [e for e in exp.history.events if e.kind == "early_stopped"]
    assert len(stop) == 1 and stop[0].detail["best_step"] == 0


def test_early_stopping_rule_on_hand_built_sequences():
    model = nn.Linear(2, 2)
    improving = EarlyStopping()
    for step, loss in enumerate([5.0, 4.0, 3.0, 2.0, 1.0]):
        assert improving.update(loss, step, model, mode="min", min_delta=0.0)
        assert not improving.should_stop(0)  # patience 0, always improving: never stops
    flat = EarlyStopping()
    flat.update(1.0, 0, model, mode="min", min_delta=0.0)
    stops = [
        flat.update(1.0, s, model, mode="min", min_delta=0.0) or flat.should_stop(2)
        for s in (1, 2, 3)
    ]
    assert stops == [False, True, True]
    accuracy = EarlyStopping()
    accuracy.update(0.5, 0, model, mode="max", min_delta=0.0)
    assert accuracy.update(0.6, 1, model, mode="max", min_delta=0.0)


def test_patience_zero_on_an_improving_run_never_stops():
    exp = Experiment(epochs=3, patience=0)
    exp.run()
    _, val_loss = exp.history.series("val_loss")
    assert np.all(np.diff(val_loss) < 0)  # the premise: it kept improving
    assert exp.epoch_count == 3
    assert not [e for e in exp.history.events if e.kind == "early_stopped"]


def test_best_weights_are_restored_however_the_run_ends():
    exp = Experiment(epochs=500, lr=0.05, patience=1000, monitor="val_acc")
    exp.start()
    while exp.epoch_count < 6:
        pass
    exp.stop()
    best = exp.early_stopping
    restored = [e for e in exp.history.events if e.kind == "restored"]
    assert restored and restored[-1].detail["best_step"] == best.best_step
    for name, tensor in exp.model.state_dict().items():
        assert torch.equal(tensor, best.best_state[name])
    _, val_acc = exp.history.series("val_acc")
    assert best.best == val_acc.max()


def test_augmentation_shifts_and_stays_in_range():
    x = torch.zeros(3, 4)
    x[:, 5 % 4] = 1.0
    mean, std = torch.zeros(4), torch.ones(4)
    bounds = (torch.full((4,), -1.0), torch.full((4,), 1.0))
    out = shift_and_noise(x, mean, std, (2, 2), bounds, torch.Generator().manual_seed(0), 0.0)
    assert out.shape == x.shape and out.abs().max() <= 1.0
    # With no noise, each image is its original or a shift of it: the same ink, or less.
    assert torch.all(out.sum(dim=1) <= x.sum(dim=1))
    a = Experiment(epochs=1, augment=True).run().series("train_loss")[1]
    b = Experiment(epochs=1, augment=True).run().series("train_loss")[1]
    c = Experiment(epochs=1).run().series("train_loss")[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_augment_and_skip_are_refused_where_they_cannot_act():
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
    with pytest.raises(ValueError, match="augment=True shifts image pixels"):
        Experiment(data=(x, y), augment=True)
    with pytest.raises(
        ValueError, match=r"skip=True needs hidden blocks .* hidden=\(128, 64, 32\)"
    ):
        Experiment().set(skip=True)


def test_skip_connections_add_the_input_on_equal_width_blocks():
    exp = Experiment(hidden=(64, 64, 64))
    assert exp.model.residual_blocks == 3
    exp.set(skip=True)
    block = exp.model.blocks[1]
    x = torch.randn(5, 64)
    assert torch.allclose(block(x), torch.relu(block.linear(x)) + x)
    exp.set(skip=False)
    assert torch.allclose(block(x), torch.relu(block.linear(x)))


def test_optimizer_switch_mid_run_resets_its_state_and_is_noted():
    exp = Experiment(epochs=2)

    def switch(e, _):
        if e.step_count == 10:
            e.set(optimizer="momentum")

    exp.on("step_completed", switch)
    exp.run()
    assert isinstance(exp.optimizer, torch.optim.SGD)
    assert exp.optimizer.param_groups[0]["momentum"] == 0.9
    change = exp.history.changes()[0]
    assert change.step == 11 and "state reset" in change.detail["note"]


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(name):
    lr = {"sgd": 0.1, "momentum": 0.05}.get(name, 1e-3)
    history = Experiment(epochs=2, optimizer=name, lr=lr).run()
    assert history.last("val_acc") > 0.5


def test_schedules_shape_the_recorded_learning_rate():
    def lrs(schedule, **kw):
        exp = Experiment(epochs=4, lr=0.01, schedule=schedule, **kw)
        used = []
        exp.optimizer.register_step_pre_hook(
            lambda opt, a, k: used.append(opt.param_groups[0]["lr"])
        )
        exp.run()
        recorded = exp.history.series("lr")[1]
        return np.array(used), recorded

    used, cosine = lrs("cosine")
    assert cosine[0] == 0.01 and cosine[-1] < 1e-4 and np.all(np.diff(cosine) <= 1e-12)
    _, step = lrs("step")
    assert sorted(set(np.round(step, 8)), reverse=True)[:3] == [0.01, 0.005, 0.0025]
    _, onecycle = lrs("onecycle")
    peak = int(np.argmax(onecycle))
    assert onecycle[0] < 0.002 and onecycle.max() == pytest.approx(0.01, rel=1e-3)
    assert 0.2 < peak / len(onecycle) < 0.4 and onecycle[-1] < 1e-4
    # Note: the hook sees the optimizer's lr for the very step the history records.
    assert np.array_equal(used, cosine)


def test_plateau_schedule_follows_the_monitored_metric():
    # At lr=1e-6 nothing improves, so the plateau schedule divides the rate by 10.
    exp = Experiment(epochs=6, lr=1e-6, schedule="plateau", monitor="val_acc")
    exp.run()
    assert exp.scheduler.mode == "max"
    _, lr = exp.history.series("lr")
    assert lr[0] == 1e-6 and lr[-1] == pytest.approx(1e-7)
    exp.set(lr=1e-3)  # plateau only lowers the rate: a manual change is allowed
    assert exp.optimizer.param_groups[0]["lr"] == 1e-3


def test_a_manual_lr_under_an_owning_schedule_is_refused():
    exp = Experiment(schedule="cosine")
    with pytest.raises(ValueError, match="lr is set by the 'cosine' schedule at every step"):
        exp.set(lr=0.1)
    exp.set(schedule="none", lr=0.1)
    assert exp.in_force["lr"] == 0.1


def test_batch_size_changes_at_the_next_epoch_boundary():
    exp = Experiment(epochs=2)
    per_epoch = exp.steps_per_epoch

    def change(e, _):
        if e.step_count == 5:
            e.set(batch_size=32)

    exp.on("step_completed", change)
    exp.run()
    event = exp.history.changes()[0]
    assert event.step == per_epoch + 1
    assert exp.step_count == per_epoch + math.ceil(len(exp.data.y_train) / 32)


def test_activation_switches_mid_run():
    exp = Experiment(epochs=1)
    exp.on("step_completed", lambda e, _: e.step_count == 3 and e.set(activation="tanh"))
    exp.run()
    assert all(isinstance(block.act, nn.Tanh) for block in exp.model.blocks)
    assert exp.history.changes()[0].step == 4


def test_restart_rebuilds_with_new_architecture_and_records_it():
    exp = Experiment(epochs=1)
    exp.run()
    exp.restart(hidden=(32, 16), init="xavier")
    assert exp.step_count == 0 and [n for n, _ in exp.model.named_layers()] == [
        "hidden1",
        "hidden2",
        "output",
    ]
    assert [e.label for e in exp.history.events] == ["restart: hidden=(32, 16), init=xavier"]
    with pytest.raises(ValueError, match="hidden must be a sequence of positive integers"):
        exp.restart(hidden=(0,))


def test_internals_histograms_and_dead_relu_fraction():
    torch.manual_seed(0)
    model = FunnelMLP(4, (8, 8), 2)
    with torch.no_grad():
        model.blocks[0].linear.bias.fill_(-100.0)  # every unit of the first layer is dead
    snapshot = measure_internals(
        model, model.named_layers(), model.activations(), torch.randn(32, 4), step=7
    )
    first, second = snapshot.layers[0], snapshot.layers[1]
    assert first.dead_fraction == 1.0 and second.dead_fraction < 1.0
    assert first.weights.counts.sum() == 8 * 4 and first.gradients is None
    assert first.activations.counts.sum() == 32 * 8
    assert math.isnan(snapshot.layers[-1].dead_fraction)
    exp = Experiment(epochs=1)
    exp.run()
    exp.request_internals()
    assert exp.internals.step == exp.step_count and exp.internals.layers[0].gradients


@pytest.mark.parametrize("order", ["lr first", "schedule first"])
def test_a_schedule_switched_on_with_its_rate_starts_from_that_rate(order):
    # The slow-convergence remedy "One-cycle schedule up to 0.03" is one set() of both.
    exp = Experiment(epochs=2, optimizer="sgd", lr=1e-3)
    exp.run(epochs=1)
    changes = {"lr": 0.03, "schedule": "onecycle"}
    if order == "schedule first":
        changes = {"schedule": "onecycle", "lr": 0.03}
    exp.set(**changes)
    assert exp.config.lr == 0.03 and exp.config.schedule == "onecycle"
    exp.run(epochs=1)
    _, lr = exp.history.series("lr")
    after = lr[exp.steps_per_epoch :]
    assert after.max() == pytest.approx(0.03, rel=0.02)  # the cycle peaks at the new rate
    with pytest.raises(ValueError, match="lr is set by the 'onecycle' schedule"):
        exp.set(lr=0.1)  # alone, under a schedule that owns the rate: still refused
