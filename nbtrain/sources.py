"""Turn what the user brings into what the engine trains: a device, data, a task, a loss,
a model and an optimizer.

Data comes in two shapes, and the engine handles both:

* tensors (`nbtrain.data.Split`): ``data=None`` (digits), ``data=(X, y)`` (split and
  standardized), or ``train_data=`` / ``val_data=`` given as ``(X, y)`` pairs of tensors or
  numpy arrays, or as a ``TensorDataset`` (used as given, no standardization). The engine
  batches these itself, so ``batch_size`` stays a live knob and runs are bit-for-bit
  repeatable.
* loaders (`Loaders`): any other ``Dataset`` (nbtrain wraps it in a seeded, shuffling
  ``DataLoader`` of ``batch_size``, remade at an epoch boundary when the batch size changes),
  or your own ``DataLoader``, used exactly as it is (its batch size is then yours).

The task: ``task="classification"`` (accuracy shown) or ``"regression"`` (loss only). Left
as None it is inferred: from the loss (MSE, L1, smooth L1 and Huber losses mean
regression; cross-entropy, NLL and BCE mean classification), else from the targets
(floating point means regression, integers mean classification; floats that are all whole
numbers, at most 100 distinct ones, are class labels too).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, random_split

from .data import Split, prepare

Task = Literal["classification", "regression"]
TASKS = ("classification", "regression")
REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
CLASSIFICATION_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCELoss, nn.BCEWithLogitsLoss)
BUILTIN_MODELS = ("mlp", "cnn")


# Devices


def resolve_device(value: Any) -> torch.device:
    """``"auto"``: cuda if available, then mps, else cpu; or a device that must exist."""
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {value!r} needs CUDA, and this torch ({torch.__version__}) sees no CUDA "
            "device; use device='cpu' or 'auto'"
        )
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {value!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device {value!r} needs Apple's MPS, which this machine does not have; "
                "use device='cpu' or 'auto'"
            )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'mps', got {value!r}")
    return device


# Tasks and losses


def infer_task(task: Any, loss_fn: Any, targets: torch.Tensor | None) -> Task:
    """The task from an explicit choice, the loss, or the targets' dtype (module docstring)."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(
                f"task must be None (inferred), 'classification' or 'regression', got {task!r}"
            )
        if task == "regression" and isinstance(loss_fn, CLASSIFICATION_LOSSES):
            raise ValueError(
                f"task='regression' with loss_fn {type(loss_fn).__name__}, a classification "
                "loss; use e.g. nn.MSELoss() or task='classification'"
            )
        if task == "classification" and isinstance(loss_fn, REGRESSION_LOSSES):
            raise ValueError(
                f"task='classification' with loss_fn {type(loss_fn).__name__}, a regression "
                "loss; use e.g. nn.CrossEntropyLoss() or task='regression'"
            )
        return task
    if isinstance(loss_fn, REGRESSION_LOSSES):
        return "regression"
    if isinstance(loss_fn, CLASSIFICATION_LOSSES):
        return "classification"
    if targets is not None and targets.is_floating_point():
        # Whole numbers, and few of them, are class labels that arrived as floats (pandas
        # turns integer labels into floats as soon as one is missing).
        values = targets[torch.isfinite(targets)]
        whole = bool((values == values.round()).all()) and values.unique().numel() <= 100
        return "classification" if whole else "regression"
    return "classification"


def default_loss(task: Task) -> nn.Module:
    return nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()


def check_loss(loss_fn: Any) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be None (cross-entropy, or MSE for regression) or a callable "
            f"loss(outputs, targets) such as nn.CrossEntropyLoss(), got {loss_fn!r:.60}"
        )


# Data


@dataclasses.dataclass
class Loaders:
    """Data the engine reads batch by batch from DataLoaders."""

    train: DataLoader
    val: DataLoader
    task: Task
    name: str
    own_batching: bool  # True: nbtrain made the loaders from Datasets, batch_size is live
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    seed: int = 0
    eval_batch_size: int = 512
    image_shape: tuple[int, int] | None = None  # loaders are never augmented

    def __post_init__(self) -> None:
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_train(self) -> int | None:
        try:
            return len(self.train.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    @property
    def n_features(self) -> int:
        """Input numbers per sample (from the first validation batch)."""
        x, _ = self.probe_batch(1)
        return x[0].numel() if isinstance(x, torch.Tensor) else 0

    def rebatch(self, batch_size: int) -> None:
        """A new shuffling train loader of `batch_size` (only for Datasets nbtrain batches)."""
        self.train = _shuffling(self.train_set, batch_size, self.seed)

    def eval_batches(self, split: str) -> Iterator[Any]:
        """Batches over a whole set for evaluation, in order."""
        if self.own_batching:
            dataset = self.train_set if split == "train" else self.val_set
            return iter(DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False))
        return iter(self.train if split == "train" else self.val)

    def probe_batch(self, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch for measurements (internals, the pre-training check): the first
        validation batch, kept so every measurement sees the same samples."""
        if self._probe is None:
            self._probe = split_batch(next(iter(self.val)), "val_data")
        x, y = self._probe
        return x[:size], y[:size]


def _shuffling(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def split_batch(batch: Any, where: str) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) from a batch a loader yields: a pair, or a longer tuple's first two."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"{where} must yield (inputs, targets) batches, got a {type(batch).__name__}; "
        "wrap it so each item is a pair"
    )


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")


def _pair(name: str, value: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(X, y) tensors from a pair or a TensorDataset of two; None for other Datasets."""
    if isinstance(value, TensorDataset) and len(value.tensors) == 2:
        return value.tensors[0], value.tensors[1]
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a pair (X, y), got {len(value)} items")
        x, y = _as_tensor(f"{name} X", value[0]), _as_tensor(f"{name} y", value[1])
        if len(x) != len(y):
            raise ValueError(f"{name} X has {len(x)} rows but y has {len(y)} targets")
        return x, y
    return None


def _targets(y: torch.Tensor, task: Task, loss_fn: Any, name: str) -> torch.Tensor:
    if task == "regression" or isinstance(loss_fn, (nn.BCELoss, nn.BCEWithLogitsLoss)):
        return y.float()
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(
                f"{name} targets are not whole numbers, so they cannot be class labels for "
                "task='classification'; use task='regression' or integer labels"
            )
    return y.long()


def make_data(
    data: Any,
    train_data: Any,
    val_data: Any,
    *,
    task: Any,
    loss_fn: Any,
    val_fraction: float,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    train_size: int | None = None,
    label_noise: float = 0.0,
) -> Split | Loaders:
    """The experiment's data from the user's arguments (see the module docstring)."""
    if isinstance(data, Split):
        return data  # prepared already (forks and checkpoints hand it over)
    if train_data is None:
        if val_data is not None:
            raise ValueError("val_data needs train_data; pass both, or data=(X, y) to split")
        targets = None
        if isinstance(data, (tuple, list)) and len(data) == 2:
            # Only numbers can tell the task; anything else is prepare()'s to refuse or map.
            y = data[1]
            if isinstance(y, np.ndarray) and y.dtype.kind in "iuf":
                targets = torch.from_numpy(y)
            elif isinstance(y, torch.Tensor):
                targets = y
        chosen = infer_task(task, loss_fn, targets)
        return prepare(
            data,
            val_fraction=val_fraction,
            seed=seed,
            train_size=train_size,
            label_noise=label_noise,
            task=chosen,
        )
    if data is not None:
        raise ValueError("pass either data=(X, y) or train_data= (and val_data=), not both")
    if train_size is not None or label_noise:
        raise ValueError(
            "train_size and label_noise shape the built-in data split (data=None or "
            "data=(X, y)); with train_data= choose your samples yourself"
        )

    # Your own DataLoaders: used as they are.
    if isinstance(train_data, DataLoader):
        if not isinstance(val_data, DataLoader):
            raise ValueError(
                f"train_data is a DataLoader, so val_data must be one too, got "
                f"{type(val_data).__name__}"
            )
        for name, loader in (("train_data", train_data), ("val_data", val_data)):
            if isinstance(loader.dataset, IterableDataset):
                raise ValueError(
                    f"{name} reads an IterableDataset, which has no length; nbtrain counts "
                    "epochs and progress, so it needs a map-style Dataset"
                )
        _, y = split_batch(next(iter(val_data)), "val_data")
        chosen = infer_task(task, loss_fn, y if isinstance(y, torch.Tensor) else None)
        return Loaders(train_data, val_data, chosen, "your DataLoader", own_batching=False)

    pair = _pair("train_data", train_data)
    if pair is not None:
        x, y = pair
        chosen = infer_task(task, loss_fn, y)
        y = _targets(y, chosen, loss_fn, "train_data")
        if val_data is None:
            x, y, x_val, y_val = _split_tensors(x, y, chosen, val_fraction, seed)
        else:
            val_pair = _pair("val_data", val_data)
            if val_pair is None:
                raise ValueError(
                    f"train_data is a pair of tensors, so val_data must be one too (or a "
                    f"TensorDataset), got {type(val_data).__name__}"
                )
            x_val, y_val = val_pair
        n = x[0].numel()
        return Split(
            x_train=x.float(),
            y_train=y,
            x_val=x_val.float(),
            y_val=_targets(y_val, chosen, loss_fn, "val_data"),
            classes=np.unique(y.cpu().numpy()) if chosen == "classification" else np.zeros(0),
            name="your tensors",
            mean=torch.zeros(n),
            std=torch.ones(n),
            task=chosen,
        )

    # Any other Dataset: nbtrain batches it.
    if not isinstance(train_data, Dataset):
        raise ValueError(
            f"train_data must be a pair (X, y) of tensors or numpy arrays, a Dataset or a "
            f"DataLoader, got {type(train_data).__name__}"
        )
    if isinstance(train_data, IterableDataset):
        raise ValueError(
            "train_data is an IterableDataset, which has no length; "
            "nbtrain counts epochs and progress, so it needs a map-style Dataset"
        )
    if val_data is None:
        n_val = max(1, round(len(train_data) * val_fraction))
        generator = torch.Generator().manual_seed(seed)
        train_data, val_data = random_split(
            train_data, [len(train_data) - n_val, n_val], generator=generator
        )
    elif not isinstance(val_data, Dataset):
        raise ValueError(
            f"train_data is a Dataset, so val_data must be one too, got {type(val_data).__name__}"
        )
    _, y = split_batch(val_data[0], "val_data")
    y = torch.as_tensor(y)
    chosen = infer_task(task, loss_fn, y)
    return Loaders(
        train=_shuffling(train_data, batch_size, seed),
        val=DataLoader(val_data, batch_size=eval_batch_size, shuffle=False),
        task=chosen,
        name="your Dataset",
        own_batching=True,
        train_set=train_data,
        val_set=val_data,
        seed=seed,
        eval_batch_size=eval_batch_size,
    )


def _split_tensors(
    x: torch.Tensor, y: torch.Tensor, task: Task, val_fraction: float, seed: int
) -> tuple[torch.Tensor, ...]:
    from sklearn.model_selection import train_test_split

    stratify = y.cpu().numpy() if task == "classification" else None
    index = np.arange(len(x))
    train, val = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    return x[train], y[train], x[val], y[val]


# Models


class ModelSource:
    """Makes the model for each (re)build: nbtrain's own from the config, or yours.

    Your model instance is trained in place (your variable holds the trained model). Its
    weights when the experiment was made are kept, so `Experiment.reset()` starts over
    from them, as a built-in model starts over from the seed.
    """

    def __init__(self, spec: Any) -> None:
        if spec is None:
            spec = "mlp"
        if isinstance(spec, str):
            if spec not in BUILTIN_MODELS:
                raise ValueError(f"model must be None, 'mlp', 'cnn' or an nn.Module, got {spec!r}")
            self.builtin: str | None = spec
            self.module: nn.Module | None = None
            self._initial: dict[str, torch.Tensor] | None = None
        elif isinstance(spec, nn.Module):
            self.builtin = None
            self.module = spec
            self._initial = copy.deepcopy(spec.state_dict())
        else:
            raise ValueError(
                f"model must be None, 'mlp', 'cnn' or an nn.Module, got {type(spec).__name__}"
            )

    def make(self, cfg: Any, data: Split | Loaders) -> nn.Module:
        from .model import FunnelMLP, SmallCNN

        if self.builtin and isinstance(data, Split) and data.task == "regression":
            # The built-in models output (n, outputs): 1-D targets become one column.
            if data.y_train.ndim == 1:
                data.y_train, data.y_val = data.y_train[:, None], data.y_val[:, None]

        if self.builtin == "mlp":
            if isinstance(data, Loaders):
                raise ValueError(
                    "the built-in MLP needs tensor data to size itself; with a Dataset or "
                    "DataLoader pass model= your own nn.Module"
                )
            return FunnelMLP(data.n_features, cfg.hidden, data.n_classes, cfg.activation)
        if self.builtin == "cnn":
            shape = getattr(data, "image_shape", None)
            if shape is None or isinstance(data, Loaders):
                raise ValueError(
                    "model='cnn' needs image data with a known shape (the digits, data=None); "
                    "for your images pass model=nbtrain.SmallCNN(image_shape=..., n_classes=...)"
                )
            return SmallCNN(shape, data.n_classes)
        assert self.module is not None and self._initial is not None
        self.module.load_state_dict(self._initial)
        return self.module


# Optimizers


class OptimizerSource:
    """Your optimizer: a factory ``f(params) -> Optimizer`` or an instance over your model.

    An instance is reused; its state when the experiment was made is kept and loaded again
    on every rebuild, so a reset (or switching back to it) starts it afresh.
    """

    def __init__(self, spec: Any, model: nn.Module | None) -> None:
        if isinstance(spec, torch.optim.Optimizer):
            if model is None:
                raise ValueError(
                    "optimizer= an Optimizer instance needs model= the nn.Module it optimizes; "
                    "for the built-in model pass a factory, e.g. lambda p: torch.optim.SGD(p, "
                    "lr=0.1)"
                )
            owned = {id(p) for p in model.parameters()}
            foreign = [p for g in spec.param_groups for p in g["params"] if id(p) not in owned]
            if foreign:
                raise ValueError(
                    f"optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                    "build it over model.parameters()"
                )
            self.instance: torch.optim.Optimizer | None = spec
            self.factory = None
            self._initial = copy.deepcopy(spec.state_dict())
        elif callable(spec):
            self.instance, self.factory, self._initial = None, spec, None
        else:
            raise ValueError(
                "optimizer must be a name ('sgd', 'momentum', 'adam', 'adamw', 'rmsprop'), a "
                f"factory f(params) -> torch.optim.Optimizer or an Optimizer, got {spec!r:.60}"
            )

    def make(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.instance is not None:
            self.instance.load_state_dict(self._initial)
            return self.instance
        made = self.factory(model.parameters())
        if not isinstance(made, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer factory must return a torch.optim.Optimizer, got {type(made).__name__}"
            )
        return made


def weight_decay_style(optimizer: torch.optim.Optimizer) -> str:
    """How an optimizer of a class we know applies weight_decay."""
    if isinstance(optimizer, torch.optim.AdamW):
        return "decoupled: weights shrink directly, outside Adam's scaling"
    if isinstance(optimizer, torch.optim.Adam):
        return "coupled: added to the gradient, then scaled by Adam"
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.RMSprop)):
        return "coupled: added to the gradient"
    return f"as {type(optimizer).__name__} defines it"
