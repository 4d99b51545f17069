"""Issue 6: your model, data, loss, optimizer and device."""

import numpy as np
import pytest
import torch
from mapdata import Pairs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbtrain import Experiment
from nbtrain.sources import infer_task, resolve_device


def _mlp(n_in=8, n_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))


def test_auto_device_is_cpu_here_and_cuda_without_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu")  # this machine has no GPU
    assert resolve_device("cpu") == torch.device("cpu")
    exp = Experiment(device="cpu", epochs=1)
    assert next(exp.model.parameters()).device.type == "cpu" and exp.data.x_train.is_cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' needs CUDA.*use device='cpu'"):
            Experiment(device="cuda")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu'"):
        Experiment(device="tpu")


def test_the_task_is_explicit_or_inferred_from_the_loss_then_the_targets():
    floats, ints = torch.tensor([0.5, 1.25, -2.0]), torch.zeros(3, dtype=torch.long)
    assert infer_task(None, None, floats) == "regression"
    # Whole-number floats are class labels that arrived as floats (pandas does that).
    assert infer_task(None, None, torch.tensor([0.0, 1.0, 2.0])) == "classification"
    assert infer_task(None, None, ints) == "classification"
    assert infer_task(None, nn.MSELoss(), ints) == "regression"
    assert infer_task(None, nn.CrossEntropyLoss(), floats) == "classification"
    with pytest.raises(ValueError, match="task='regression' with loss_fn CrossEntropyLoss"):
        infer_task("regression", nn.CrossEntropyLoss(), floats)
    with pytest.raises(ValueError, match="task must be None"):
        infer_task("ranking", None, floats)
    x = torch.randn(40, 8)
    with pytest.raises(ValueError, match="targets are not whole numbers"):
        Experiment(model=_mlp(), train_data=(x, torch.rand(40)), task="classification")


@pytest.mark.parametrize("kind", ["numpy", "tensors", "tensor_dataset", "dataset", "loader"])
def test_every_kind_of_data_trains_and_is_evaluated(kind, small_data):
    x, y = small_data
    train, val = (x[:240], y[:240]), (x[240:], y[240:])
    if kind == "numpy":
        train, val = (train[0].numpy(), train[1].numpy()), (val[0].numpy(), val[1].numpy())
    elif kind == "tensor_dataset":
        train, val = TensorDataset(*train), TensorDataset(*val)
    elif kind == "dataset":
        train, val = Pairs(*train), Pairs(*val)
    elif kind == "loader":
        g = torch.Generator().manual_seed(0)
        train = DataLoader(TensorDataset(*train), batch_size=30, shuffle=True, generator=g)
        val = DataLoader(TensorDataset(*val), batch_size=60)
    exp = Experiment(model=_mlp(), train_data=train, val_data=val, epochs=8, lr=1e-2)
    assert exp.steps_per_epoch == (8 if kind == "loader" else 4)  # 240 / 30, 240 / 64
    history = exp.run()
    assert exp.step_count == 8 * exp.steps_per_epoch
    assert history.last("val_acc") > 0.75  # chance: 1/3
    _, val_loss = history.series("val_loss")
    assert val_loss[-1] < val_loss[0]


def test_a_dataset_is_batched_by_nbtrain_and_its_batch_size_stays_live(small_data):
    x, y = small_data
    exp = Experiment(model=_mlp(), train_data=Pairs(x, y), batch_size=30, epochs=1)
    assert exp.n_train == 240 and exp.steps_per_epoch == 8  # 20% split off for validation
    exp.run()
    exp.set(batch_size=60)
    exp.run(epochs=1)
    assert exp.step_count == 8 + 4


def test_your_dataloader_keeps_its_batch_size_and_set_refuses_to_change_it(small_data):
    loader = DataLoader(TensorDataset(*small_data), batch_size=50)
    exp = Experiment(model=_mlp(), train_data=loader, val_data=loader)
    assert "batch 50" in repr(exp)
    with pytest.raises(ValueError, match=r"batch_size=32 cannot act here: .*DataLoader's \(50\)"):
        exp.set(batch_size=32)
    with pytest.raises(ValueError, match="val_data must be one too"):
        Experiment(model=_mlp(), train_data=loader, val_data=small_data)


def test_regression_records_loss_only_and_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32)
    exp = Experiment(data=(x, y), epochs=10, lr=1e-2)
    assert exp.task == "regression" and exp.data.y_train.shape == (320, 1)
    history = exp.run()
    assert history.names("eval") == ["train_loss", "val_loss"]  # no accuracy at all
    _, val_loss = history.series("val_loss")
    assert val_loss[-1] < 0.1 * val_loss[0]
    with pytest.raises(ValueError, match="monitor='val_acc' needs an accuracy"):
        Experiment(data=(x, y), monitor="val_acc", patience=2)


def test_the_small_cnn_learns_the_digits_and_names_its_layers():
    exp = Experiment(model="cnn", epochs=2, seed=0)
    assert exp.probe.layer_names == ["conv1", "conv2", "fc", "head"]
    assert exp.run().last("val_acc") > 0.85
    with pytest.raises(ValueError, match="model must be None, 'mlp', 'cnn' or an nn.Module"):
        Experiment(model="resnet")


def test_your_optimizer_factory_or_instance_keeps_its_rate_and_set_lr_reaches_it(small_data):
    model = _mlp()
    exp = Experiment(
        model=model,
        train_data=small_data,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    assert exp.config.optimizer == "custom" and exp.config.lr == 0.05
    assert isinstance(exp.optimizer, torch.optim.SGD) and "lr=0.05" in repr(exp)
    exp.set(lr=0.01)
    assert exp.optimizer.param_groups[0]["lr"] == 0.01
    exp.set(optimizer="adam")
    exp.set(optimizer="custom")  # back to yours, afresh at the rate in force
    assert isinstance(exp.optimizer, torch.optim.SGD)
    assert exp.optimizer.param_groups[0]["lr"] == 0.01

    model = _mlp()
    instance = torch.optim.Adam(model.parameters(), lr=3e-3)
    exp = Experiment(model=model, train_data=small_data, optimizer=instance, epochs=1)
    exp.run()
    assert exp.optimizer is instance and instance.state  # trained: Adam has moments
    exp.reset()
    assert not instance.state and exp.config.lr == 3e-3  # reset: its state as given
    with pytest.raises(ValueError, match="not the model's"):
        Experiment(model=_mlp(), optimizer=torch.optim.SGD(_mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer must be a name"):
        Experiment(model=_mlp(), optimizer=3)


def test_your_model_trains_in_place_and_reset_restores_its_first_weights(small_data):
    model = _mlp()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    exp = Experiment(model=model, train_data=small_data, epochs=1)
    exp.run()
    assert exp.model is model and not torch.equal(model[0].weight, first["0.weight"])
    exp.reset()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in first.items())


def test_your_models_init_is_kept_unless_you_choose_one(small_data):
    model = _mlp()
    before = model[0].weight.clone()
    Experiment(model=model, train_data=small_data)
    assert torch.equal(model[0].weight, before)
    Experiment(model=model, train_data=small_data, init="zeros")
    assert torch.count_nonzero(model[0].weight) == 0


def test_regression_shapes_that_would_broadcast_are_refused_before_training():
    x = torch.randn(100, 4)
    y = x.sum(1)  # 1-D targets
    exp = Experiment(train_data=(x, y), epochs=1)  # the built-in MLP: one column
    assert exp.data.y_train.shape == (80, 1) and exp.run().last("val_loss") > 0
    with pytest.raises(ValueError, match=r"outputs shape \(64, 1\) but the targets have shape"):
        Experiment(model=nn.Linear(4, 1), train_data=(x, y)).report()
