"""What happens inside the network: weight, activation and gradient distributions per layer.

Two measurements, both made on demand rather than every step:

* `measure_internals`: histograms of each layer's weights, gradients (from the last step)
  and activations (on a fixed probe batch, in eval mode), and the fraction of dead ReLU units.
* `inspect_init`: before any training, one batch through freshly initialized networks, one
  per scheme, to compare activation statistics and gradient norms layer by layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .gradients import GradientProbe

if TYPE_CHECKING:
    from .engine import Experiment

BINS = 30
_RELU_LIKE = (nn.ReLU, nn.ReLU6)


@dataclasses.dataclass
class Histogram:
    counts: np.ndarray
    edges: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2


def histogram(values: torch.Tensor, bins: int = BINS) -> Histogram:
    values = values.detach().float().flatten().cpu()
    values = values[torch.isfinite(values)]
    if len(values) == 0:
        return Histogram(np.zeros(bins), np.linspace(-1, 1, bins + 1))
    low, high = values.min().item(), values.max().item()
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = torch.histogram(values, bins=bins, range=(low, high))
    return Histogram(counts.numpy(), edges.numpy())


def _record_outputs(
    modules: Sequence[tuple[str, nn.Module]],
) -> tuple[dict[str, torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Forward hooks that keep each named module's latest output (detached)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, inputs, output: outputs.__setitem__(name, output.detach())

    return outputs, [module.register_forward_hook(keep(name)) for name, module in modules]


@dataclasses.dataclass
class LayerInternals:
    name: str
    weights: Histogram
    gradients: Histogram | None  # None before the first backward pass
    activations: Histogram | None  # None for the output layer (its outputs are logits)
    dead_fraction: float  # ReLU units that output 0 for every probe sample; NaN if not ReLU


@dataclasses.dataclass
class Internals:
    step: int
    layers: list[LayerInternals]


@torch.no_grad()
def measure_internals(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    activations: Sequence[tuple[str, nn.Module]],
    probe_x: torch.Tensor,
    step: int,
) -> Internals:
    """Histograms per layer and dead-unit fractions, with the model's mode restored."""
    outputs, handles = _record_outputs(activations)
    was_training = model.training
    model.eval()
    try:
        model(probe_x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    kinds = {name: module for name, module in activations}
    result = []
    for name, layer in layers:
        # A layer's weight, or for a layer without one (your own) its first parameter.
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(layer.parameters())
        grad = weight.grad
        out = outputs.get(name)
        dead = math.nan
        if out is not None and isinstance(kinds.get(name), _RELU_LIKE):
            dead = (out <= 0).all(dim=0).float().mean().item()
        result.append(
            LayerInternals(
                name=name,
                weights=histogram(weight),
                gradients=None if grad is None else histogram(grad),
                activations=None if out is None else histogram(out),
                dead_fraction=dead,
            )
        )
    return Internals(step=step, layers=result)


@dataclasses.dataclass
class LayerStart:
    """One layer of a freshly initialized network, after one batch forward and backward."""

    name: str
    weight_std: float
    activation_mean: float | None
    activation_std: float | None
    grad_norm: float


@dataclasses.dataclass
class InitReport:
    scheme: str
    layers: list[LayerStart]

    def table(self) -> list[dict[str, float | str | None]]:
        return [dataclasses.asdict(layer) for layer in self.layers]


def inspect_init(
    experiment: Experiment, schemes: Sequence[str] = ("he", "default"), batch_size: int = 256
) -> dict[str, InitReport]:
    """For each scheme, a fresh copy of the experiment's network pushed through one batch.

    The same seed, architecture, activation and batch for every scheme, so the only
    difference is the initialization. Activations are measured after each hidden block's
    activation function, in train mode as in a first training step; gradient norms are of
    each Linear layer's weight and bias, from the loss of that batch.
    """
    from .model import FunnelMLP, initialize

    if experiment.builtin_model != "mlp":
        raise ValueError(
            "inspect_init compares fresh built-in MLPs, and this experiment trains "
            f"{type(experiment.model).__name__}; it needs Experiment(model=None)"
        )
    cfg, data = experiment.config, experiment.data
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    reports = {}
    for scheme in schemes:
        torch.manual_seed(cfg.seed)
        model = FunnelMLP(data.n_features, cfg.hidden, data.n_classes, cfg.activation)
        initialize(model, scheme, cfg.activation, cfg.init_std)
        model.set_batchnorm(cfg.batchnorm)
        outputs, _ = _record_outputs(model.activations())
        nn.functional.cross_entropy(model(x), y).backward()
        probe = GradientProbe(model, model.named_layers())
        stats = dict(zip(probe.columns, probe.measure().tolist()))
        layers = []
        for name, layer in model.named_layers():
            out = outputs.get(name)
            layers.append(
                LayerStart(
                    name=name,
                    weight_std=layer.weight.std().item(),
                    activation_mean=None if out is None else out.mean().item(),
                    activation_std=None if out is None else out.std().item(),
                    grad_norm=stats[f"grad_norm/{name}"],
                )
            )
        reports[scheme] = InitReport(scheme, layers)
    return reports
