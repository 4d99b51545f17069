"""The funnel MLP whose batch norm and dropout can be switched at any step.

Each hidden block is Linear -> (BatchNorm1d) -> activation -> (Dropout). The bracketed
modules always exist, so switching them on mid-run needs no new parameters in the optimizer;
switched off, they are skipped entirely rather than set to an identity-like state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def funnel_widths(n_features: int, depth: int = 3) -> tuple[int, ...]:
    """Widths of the order of the input feature count, halving layer by layer.

    The course's rule of thumb: start at the power of two at or above the number of input
    features, then shrink. 64 features give (128, 64, 32) when rounding up to 2x the inputs.
    """
    first = 2 ** math.ceil(math.log2(max(2, 2 * n_features)))
    return tuple(max(2, first // 2**i) for i in range(depth))


class Block(nn.Module):
    """Linear -> (batch norm) -> activation -> (dropout)."""

    def __init__(self, n_in: int, n_out: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm = nn.BatchNorm1d(n_out)
        self.act = _ACTIVATIONS[activation]()
        self.drop = nn.Dropout(0.0)
        self.use_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.use_norm:
            x = self.norm(x)
        x = self.act(x)
        if self.drop.p > 0:
            x = self.drop(x)
        return x


class FunnelMLP(nn.Module):
    """Hidden blocks of the given widths, then a Linear layer to the class logits."""

    def __init__(
        self, n_features: int, hidden: Sequence[int], n_classes: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        widths = [n_features, *hidden]
        self.blocks = nn.ModuleList(
            Block(n_in, n_out, activation) for n_in, n_out in zip(widths, widths[1:])
        )
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def named_layers(self) -> list[tuple[str, nn.Linear]]:
        """The Linear layers in network order, under the names the plots show."""
        layers = [(f"hidden{i + 1}", block.linear) for i, block in enumerate(self.blocks)]
        return [*layers, ("output", self.head)]

    def set_dropout(self, rate: float) -> None:
        for block in self.blocks:
            block.drop.p = rate

    def set_batchnorm(self, on: bool) -> None:
        for block in self.blocks:
            block.use_norm = on


def initialize(model: nn.Module, scheme: str, activation: str) -> None:
    """Apply an initialization scheme to every Linear layer of `model`.

    'default' keeps PyTorch's own: Kaiming-uniform with a=sqrt(5), which works out to
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); that is not He initialization, whose std is
    sqrt(2/fan_in). Biases start at zero under 'he' and 'xavier'.
    """
    if scheme == "default":
        return
    gain_name = {"leaky_relu": "leaky_relu", "gelu": "relu"}.get(activation, activation)
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        if scheme == "he":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(gain_name))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
