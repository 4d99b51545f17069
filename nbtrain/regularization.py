"""Regularizers that need more than an optimizer flag: L1, early stopping, augmentation."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import nn


def l1_penalty(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of |w| over the given weights (Linear weights; biases are not penalized)."""
    return torch.stack([w.abs().sum() for w in weights]).sum()


@dataclasses.dataclass
class EarlyStopping:
    """Tracks the best evaluation and counts evaluations without improvement.

    An evaluation improves when the monitored metric beats the best so far by more than
    `min_delta` (lower for a loss, higher for an accuracy). The run stops at the `patience`-th
    evaluation in a row without improvement (patience 0: at the first one), so a run that
    keeps improving never stops. The best weights are kept to be restored when a run ends.
    """

    best: float = math.nan
    best_step: int | None = None
    wait: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    def update(
        self, value: float, step: int, model: nn.Module, *, mode: str, min_delta: float
    ) -> bool:
        """Record an evaluation; True if it improved on the best."""
        if math.isnan(self.best) or _better(value, self.best, mode, min_delta):
            self.best, self.best_step, self.wait = value, step, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return True
        self.wait += 1
        return False

    def should_stop(self, patience: int | None) -> bool:
        """After an evaluation without improvement: has patience run out?"""
        return patience is not None and self.wait > 0 and self.wait >= patience

    def reset(self) -> None:
        self.best, self.best_step, self.wait, self.best_state = math.nan, None, 0, None


def _better(value: float, best: float, mode: str, min_delta: float) -> bool:
    if mode == "max":
        return value > best + min_delta
    return value < best - min_delta


def shift_and_noise(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    shape: tuple[int, int],
    bounds: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    noise: float = 0.1,
) -> torch.Tensor:
    """Shift each image by up to one pixel each way and add Gaussian noise.

    `x` is standardized per pixel. The shift happens on the raw pixels (mean and std undo and
    redo the standardization), so a shifted-in border is a blank pixel, as in a real image;
    then noise of `noise` standard deviations is added. Each pixel is clamped to the range it
    takes in the training set (`bounds`): a nearly constant border pixel has a tiny std, and
    a neighbour's ink shifted onto it would otherwise become a huge standardized value.
    """
    height, width = shape
    raw = (x * std + mean).reshape(len(x), height, width)
    padded = nn.functional.pad(raw, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(x), 2), generator=generator).to(x.device)
    shifted = torch.empty_like(raw)
    for dy in range(3):
        for dx in range(3):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            shifted[chosen] = padded[chosen, dy : dy + height, dx : dx + width]
    out = (shifted.reshape(len(x), -1) - mean) / std
    out = out + noise * torch.randn(out.shape, generator=generator).to(x.device)
    return torch.clamp(out, bounds[0], bounds[1])
