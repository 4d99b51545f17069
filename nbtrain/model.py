"""The funnel MLP whose batch norm, dropout, activation and skips can be switched at any step.

Each hidden block is Linear -> (BatchNorm1d) -> activation -> (Dropout), plus its input when
skip connections are on and the block's input and output widths match. The bracketed
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
        self.residual = n_in == n_out  # only then can the input be added to the output
        self.use_skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.use_norm:
            out = self.norm(out)
        out = self.act(out)
        if self.drop.p > 0:
            out = self.drop(out)
        if self.use_skip and self.residual:
            out = out + x
        return out


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

    def set_activation(self, name: str) -> None:
        for block in self.blocks:
            block.act = _ACTIVATIONS[name]()

    def set_skip(self, on: bool) -> None:
        for block in self.blocks:
            block.use_skip = on

    @property
    def residual_blocks(self) -> int:
        """How many blocks a skip connection can bridge (equal input and output widths)."""
        return sum(block.residual for block in self.blocks)

    def activations(self) -> list[tuple[str, nn.Module]]:
        """The activation modules, under the names of their layers, for hooks."""
        return [(f"hidden{i + 1}", block.act) for i, block in enumerate(self.blocks)]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a small classifier, for little images such as digits' 8x8.

    conv1 -> bn1 -> ReLU -> conv2 -> bn2 -> ReLU -> 2x2 max pool -> drop -> fc -> ReLU ->
    drop -> head. Inputs may come flat (``(n, channels*height*width)``, as the digits rows
    do) or as images ``(n, channels, height, width)``. The dropout and batch-norm switches act
    on its ``nn.Dropout`` and ``nn.BatchNorm2d`` modules like on any model's; the gradient
    flow shows conv1, conv2, fc and head.
    """

    def __init__(
        self,
        image_shape: tuple[int, int] = (8, 8),
        n_classes: int = 10,
        in_channels: int = 1,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        height, width = image_shape
        if height < 2 or width < 2:
            raise ValueError(f"image_shape must be at least (2, 2), got {image_shape!r}")
        self.input_shape = (in_channels, height, width)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels[1])
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(channels[1] * (height // 2) * (width // 2), hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), *self.input_shape)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.drop(x.flatten(1))
        return self.head(self.drop(self.act(self.fc(x))))


def initialize(model: nn.Module, scheme: str, activation: str = "relu", std: float = 0.01) -> None:
    """Apply an initialization scheme to every Linear and Conv layer of `model`.

    Weight standard deviations, for fan_in inputs and fan_out outputs:

    * ``default``: PyTorch's own reset, Kaiming-uniform with a=sqrt(5), which works out to
      U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in). That is *not* He
      initialization: it is sqrt(6) times smaller, and a deep ReLU net's signal shrinks.
    * ``he``/``he_normal`` and ``he_uniform``: std sqrt(2/fan_in), derived for ReLU.
    * ``xavier``/``xavier_normal`` and ``xavier_uniform``: std gain*sqrt(2/(fan_in+fan_out)),
      derived for tanh and sigmoid: the gain is tanh's 5/3 under tanh, else 1, as Glorot and
      Bengio had it. Under ReLU that is sqrt(2) smaller than He on layers of equal width (the
      factor He et al. added for ReLU), so the two can be compared; with ReLU's gain they
      would be the same numbers.
    * ``zeros``: every weight 0, so every unit of a layer computes the same thing forever.
    * ``normal``: N(0, std^2) with the given `std`.

    Biases start at zero except under ``default``, which keeps PyTorch's bias reset.
    """
    gain = nn.init.calculate_gain("tanh") if activation == "tanh" else 1.0  # Xavier's
    he_nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
    he_slope = 0.01 if activation == "leaky_relu" else 0.0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        weight = module.weight
        if scheme == "default":
            module.reset_parameters()
            continue
        if scheme in ("he", "he_normal"):
            nn.init.kaiming_normal_(weight, a=he_slope, nonlinearity=he_nonlinearity)
        elif scheme == "he_uniform":
            nn.init.kaiming_uniform_(weight, a=he_slope, nonlinearity=he_nonlinearity)
        elif scheme in ("xavier", "xavier_normal"):
            nn.init.xavier_normal_(weight, gain=gain)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain)
        elif scheme == "zeros":
            nn.init.zeros_(weight)
        elif scheme == "normal":
            nn.init.normal_(weight, 0.0, std)
        else:
            raise ValueError(f"init must be one of nbtrain.config.INITS, got {scheme!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
