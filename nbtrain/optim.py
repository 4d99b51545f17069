"""Optimizers and learning-rate schedules, by the names the configuration uses.

A schedule is stepped once per optimizer step, except "plateau", which watches the monitored
metric and is stepped once per evaluation. The learning rate the history records for a step
is the one the optimizer used for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

# How each optimizer applies weight_decay; the panel and the change events say it.
WEIGHT_DECAY_STYLE = {
    "sgd": "coupled: added to the gradient",
    "momentum": "coupled: added to the gradient",
    "adam": "coupled: added to the gradient, then scaled by Adam",
    "adamw": "decoupled: weights shrink directly, outside Adam's scaling",
    "rmsprop": "coupled: added to the gradient",
}

# Schedules that set the learning rate at every step; a manual change would be overwritten.
OWNS_LR = ("step", "cosine", "onecycle")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(WEIGHT_DECAY_STYLE)}, got {name!r}")


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, monitor: str
) -> lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None:
    """The schedule over the `total_steps` that remain from now, or None for "none".

    step: halve the rate every quarter of the run. cosine: anneal to 0 over the run.
    onecycle: warm up to the current rate over 30% of the run, then anneal far below it.
    plateau: divide by 10 after 3 evaluations without improvement of `monitor`.
    """
    total_steps = max(total_steps, 1)
    if name == "none":
        return None
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=max(total_steps // 4, 1), gamma=0.5)
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps + 1)
    if name == "plateau":
        mode = "max" if monitor == "val_acc" else "min"
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.1, patience=3)
    raise ValueError(
        f"schedule must be one of none, step, cosine, onecycle, plateau, got {name!r}"
    )
