"""The experiment's configuration: every knob, its default and what it may be.

Validation happens here, once, for both `Experiment(...)` and `Experiment.set(...)`, so an
error always reads the same way: the parameter, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu"]
Init = Literal[
    "default",
    "he",
    "he_normal",
    "he_uniform",
    "xavier",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
    "normal",
]
OptimizerName = Literal["sgd", "momentum", "adam", "adamw", "rmsprop"]
Schedule = Literal["none", "step", "cosine", "onecycle", "plateau"]
Monitor = Literal["val_loss", "val_acc"]

# The allowed values, in the order error messages list them: the Literal types' own.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
INITS: tuple[str, ...] = get_args(Init)  # "he" and "xavier": the normal variants' usual names
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
MONITORS: tuple[str, ...] = get_args(Monitor)

# What `Experiment.set()` may change while a run is going. Everything else is fixed for a run
# and changes with `Experiment.restart()`. batch_size waits for the next epoch boundary.
LIVE_KEYS: tuple[str, ...] = (
    "dropout",
    "batchnorm",
    "clip",
    "lr",
    "optimizer",
    "weight_decay",
    "l1",
    "schedule",
    "batch_size",
    "activation",
    "skip",
    "augment",
    "patience",
    "min_delta",
    "restore_best",
)


@dataclasses.dataclass
class Config:
    """Everything that defines an experiment apart from its data.

    Defaults are the course's usual starting point: a funnel MLP 128-64-32 with ReLU and He
    initialization, trained by Adam at lr=1e-3 in batches of 64.
    """

    # Architecture
    hidden: tuple[int, ...] = (128, 64, 32)
    activation: Activation = "relu"
    skip: bool = False  # residual connections on blocks whose input and output widths match
    init: Init = "he"
    init_std: float = 0.01  # for init="normal"
    # Optimization
    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # for optimizer="momentum" (SGD with momentum) and "rmsprop"
    schedule: Schedule = "none"
    batch_size: int = 64
    epochs: int = 20
    # Regularization
    weight_decay: float = 0.0  # L2; coupled into the gradient except for AdamW (decoupled)
    l1: float = 0.0  # L1 penalty weight on the Linear weights, added to the loss
    dropout: float = 0.0
    batchnorm: bool = False
    clip: float | None = None
    augment: bool = False  # random shifts of up to one pixel and noise, for image data
    patience: int | None = None  # early stopping: evaluations without improvement; None: off
    min_delta: float = 0.0  # the least change of `monitor` that counts as an improvement
    restore_best: bool = True  # with early stopping: end every run on the best weights
    monitor: Monitor = "val_loss"  # what early stopping and the plateau schedule watch
    # Run
    seed: int = 0
    val_fraction: float = 0.2
    train_size: int | None = None  # keep only this many training samples (stratified)
    label_noise: float = 0.0  # share of training labels replaced by random ones (seeded)
    eval_every: int | None = None
    eval_batch_size: int = 512
    threads: int | None = None
    device: str = "auto"  # "auto": cuda if available, then mps, else cpu; or "cpu", "cuda:1"
    speed: float | None = None  # steps per second at most (a lecture's pace); None: full speed

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    """An integer, numpy's included (a slider or an array hands those over); never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    return real and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise _fail(name, value, "a positive integer")
    return int(value)


def _check_positive_number(name: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise _fail(name, value, "a positive finite number")
    return float(value)


def _check_fraction(name: str, value: Any, *, low_open: bool) -> float:
    ok = _is_number(value) and (value > 0 if low_open else value >= 0) and value < 1
    if not ok:
        raise _fail(name, value, "a number in (0, 1)" if low_open else "a number in [0, 1)")
    return float(value)


def check_value(name: str, value: Any) -> Any:
    """Validate one parameter and return it in its canonical form."""
    if name == "hidden":
        ok = isinstance(value, Iterable) and not isinstance(value, (str, bytes))
        widths = tuple(value) if ok else ()
        if not ok or not all(_is_int(w) and w >= 1 for w in widths):
            raise _fail(name, value, "a sequence of positive integers such as (128, 64, 32)")
        return tuple(int(w) for w in widths)
    if name == "activation":
        return _check_choice(name, value, ACTIVATIONS)
    if name == "init":
        return _check_choice(name, value, INITS)
    if name == "optimizer":
        return _check_choice(name, value, OPTIMIZERS)
    if name == "schedule":
        return _check_choice(name, value, SCHEDULES)
    if name == "monitor":
        return _check_choice(name, value, MONITORS)
    if name in ("weight_decay", "l1", "min_delta"):
        if not _is_number(value) or value < 0:
            raise _fail(name, value, "a non-negative finite number")
        return float(value)
    if name == "init_std":
        return _check_positive_number(name, value)
    if name == "momentum":
        return _check_fraction(name, value, low_open=False)
    if name == "patience":
        if value is None:
            return None
        if not _is_int(value) or value < 0:
            raise _fail(name, value, "None (no early stopping) or a non-negative integer")
        return int(value)
    if name == "lr":
        return _check_positive_number(name, value)
    if name in ("batch_size", "epochs", "eval_batch_size"):
        return _check_positive_int(name, value)
    if name == "dropout":
        return _check_fraction(name, value, low_open=False)
    if name in ("batchnorm", "skip", "augment", "restore_best"):
        if not isinstance(value, (bool, np.bool_)):
            raise _fail(name, value, "True or False")
        return bool(value)
    if name == "clip":
        if value is None:
            return None
        if not _is_number(value) or value <= 0:
            raise _fail(name, value, "None (no clipping) or a positive max gradient norm")
        return float(value)
    if name == "seed":
        if not _is_int(value) or value < 0:
            raise _fail(name, value, "a non-negative integer")
        return int(value)
    if name == "val_fraction":
        return _check_fraction(name, value, low_open=True)
    if name == "device":
        if not isinstance(value, (str, torch.device)):
            raise _fail(name, value, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return str(value)
    if name == "label_noise":
        return _check_fraction(name, value, low_open=False)
    if name == "speed":
        if value is None:
            return None
        if not _is_number(value) or value <= 0:
            raise _fail(name, value, "None (full speed) or a positive number of steps per second")
        return float(value)
    if name in ("eval_every", "threads", "train_size"):
        return None if value is None else _check_positive_int(name, value)
    raise unknown_parameter(name, FIELDS)


def unknown_parameter(name: str, allowed: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown parameter {name!r}{hint}; allowed: {', '.join(allowed)}")


def check_combination(config: Config) -> Config:
    """Refuse settings that are each fine but cannot work together; names both fields."""
    if config.batchnorm and config.batch_size < 2:
        raise ValueError(
            f"batchnorm=True needs batch_size of at least 2 (batch norm cannot normalize a "
            f"single sample), got batch_size={config.batch_size!r}; raise batch_size or "
            f"leave batchnorm off"
        )
    return config


def make_config(values: Mapping[str, Any]) -> Config:
    """Build a validated Config from keyword arguments."""
    checked = {name: check_value(name, value) for name, value in values.items()}
    return check_combination(Config(**checked))


def check_changes(changes: Mapping[str, Any], config: Config | None = None) -> dict[str, Any]:
    """Validate the keyword arguments of `Experiment.set()`, against `config` if given."""
    if not changes:
        raise ValueError(f"set() needs at least one change; allowed: {', '.join(LIVE_KEYS)}")
    checked = {}
    for name, value in changes.items():
        if name not in LIVE_KEYS:
            where = "is fixed for a run" if name in FIELDS else "is not a parameter"
            raise ValueError(
                f"{name!r} {where}; set() can change {', '.join(LIVE_KEYS)} while training "
                "(and the pace, speed)"
            )
        checked[name] = check_value(name, value)
    if config is not None:
        check_combination(config.replace(**checked))
    return checked
