"""What nbtrain needs from a model it did not build: its layers, its switches, its health.

* `probe_layers`: the layers the gradient-flow plots show, by their ``named_modules()``
  names: every leaf module with parameters (Linear, Conv, Embedding, ...) except
  normalization layers, whose scale and shift count in the total gradient norm only.
* `Switches`: the dropout and batch-norm switches, acting on the model's own ``nn.Dropout*``
  and ``nn.BatchNorm*`` modules; activation and skip switching exist on the built-in MLP only.
* `check_layers`: one forward and backward pass, before training, that finds the layers that
  are frozen (``requires_grad=False``) or receive no gradient (defined but unused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .model import FunnelMLP

NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
DROPOUTS = (nn.modules.dropout._DropoutNd,)  # Dropout, Dropout1d/2d/3d, AlphaDropout, ...
BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones


def probe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose gradients the plots show, in registration (usually forward) order."""
    if isinstance(model, FunnelMLP):
        return model.named_layers()  # hidden1, hidden2, ..., output: the course's names
    layers = [
        (name or type(module).__name__.lower(), module)
        for name, module in model.named_modules()
        if not any(True for _ in module.children())
        and any(True for _ in module.parameters(recurse=False))
        and not isinstance(module, NORMS)
    ]
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no layer with parameters to watch (a leaf "
            "module such as nn.Linear or nn.Conv2d); nbtrain shows gradients per layer"
        )
    return layers


def _pass_through(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    return inputs[0]


class Switches:
    """The live switches of one model, and why a switch cannot act where it cannot.

    Dropout sets ``p`` of every dropout module to the chosen rate (0 when off). Batch norm off
    bypasses every batch-norm module: a forward hook returns the module's input unchanged and
    ``track_running_stats`` is off, so neither its output nor its running statistics change
    while bypassed; its scale and shift then get no gradient, and optimizers skip them. The
    module stays in place, so the model's ``state_dict`` keeps its keys (early stopping's
    best weights and your checkpoints load either way). Note: under DDP, bypassing needs
    ``find_unused_parameters=True``, as for any parameter that gets no gradient.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.builtin = isinstance(model, FunnelMLP)
        self.dropouts = [m for m in model.modules() if isinstance(m, DROPOUTS)]
        self.batchnorms = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
        self._bypassed: dict[int, tuple[Any, bool]] = {}

    @property
    def dropout_rate(self) -> float:
        """The rate the model's dropout modules have now (the highest, if they differ)."""
        return max((m.p for m in self.dropouts), default=0.0)

    @property
    def batchnorm_on(self) -> bool:
        return bool(self.batchnorms) and not self._bypassed

    def unavailable(self, name: str) -> str | None:
        """Why switch `name` cannot act on this model, or None if it can."""
        kind = type(self.model).__name__
        if self.builtin:
            return None
        if name == "dropout" and not self.dropouts:
            return f"{kind} has no nn.Dropout modules to switch"
        if name == "batchnorm" and not self.batchnorms:
            return f"{kind} has no nn.BatchNorm modules to switch"
        if name in ("activation", "skip"):
            return f"{name} switching works on nbtrain's built-in MLP only, not on {kind}"
        return None

    def set_dropout(self, rate: float) -> None:
        if self.builtin:
            self.model.set_dropout(rate)
        for module in self.dropouts:
            module.p = rate

    def set_batchnorm(self, on: bool) -> None:
        if self.builtin:
            self.model.set_batchnorm(on)
            return
        for module in self.batchnorms:
            key = id(module)
            if on and key in self._bypassed:
                handle, tracked = self._bypassed.pop(key)
                handle.remove()
                module.track_running_stats = tracked
            elif not on and key not in self._bypassed:
                handle = module.register_forward_hook(_pass_through)
                self._bypassed[key] = (handle, module.track_running_stats)
                module.track_running_stats = False

    def set_activation(self, name: str) -> None:
        self.model.set_activation(name)

    def set_skip(self, on: bool) -> None:
        self.model.set_skip(on)

    @property
    def residual_blocks(self) -> int:
        return self.model.residual_blocks if self.builtin else 0


@dataclasses.dataclass
class LayerStatus:
    """One watched layer before training: ``ok``, ``frozen``, ``partly frozen`` or
    ``no gradient`` (trainable, but the loss does not depend on it)."""

    name: str
    kind: str
    parameters: int
    trainable: int
    status: str


@dataclasses.dataclass
class ModelReport:
    """What `Experiment.report()` finds before training."""

    model: str
    task: str
    device: str
    layers: list[LayerStatus]

    @property
    def problems(self) -> list[LayerStatus]:
        return [layer for layer in self.layers if layer.status != "ok"]

    @property
    def status(self) -> dict[str, str]:
        return {layer.name: layer.status for layer in self.layers}

    def __str__(self) -> str:
        lines = [f"{self.model} ({self.task}, on {self.device})"]
        width = max(len(layer.name) for layer in self.layers)
        for layer in self.layers:
            lines.append(
                f"  {layer.name:<{width}}  {layer.kind:<12} {layer.parameters:>8,} params"
                f"  {layer.status}"
            )
        problems = self.problems
        if problems:
            names = ", ".join(f"{layer.name} ({layer.status})" for layer in problems)
            lines.append(f"  gradient flow will show no bars for: {names}")
        return "\n".join(lines)


def _check_shapes(out: Any, y: Any, loss_fn: Any) -> None:
    """A regression loss broadcasts mismatched shapes silently, into a wrong loss: refuse."""
    from .sources import REGRESSION_LOSSES

    if not isinstance(loss_fn, REGRESSION_LOSSES) or not isinstance(out, torch.Tensor):
        return
    if isinstance(y, torch.Tensor) and out.shape != y.shape:
        raise ValueError(
            f"the model outputs shape {tuple(out.shape)} but the targets have shape "
            f"{tuple(y.shape)}; {type(loss_fn).__name__} would broadcast them into a wrong "
            "loss. Reshape the targets (e.g. y.reshape(-1, 1)) or the model's output"
        )


def check_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[LayerStatus]:
    """Which layers will get a gradient, from one pass that changes nothing.

    The pass runs in eval mode (batch norm's running statistics stay put), under a forked
    random state, and asks autograd for the gradients instead of accumulating ``.grad``, so
    the model, its gradients and the random stream are exactly as before.
    """
    trainable = [p for _, m in layers for p in m.parameters() if p.requires_grad]
    reached: set[int] = set()
    if trainable:
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                x, y = batch
                out = model(x)
                _check_shapes(out, y, loss_fn)
                loss = loss_fn(out, y)
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        finally:
            model.train(was_training)
        reached = {id(p) for p, g in zip(trainable, grads) if g is not None}
    result = []
    for name, module in layers:
        params = list(module.parameters())
        train = [p for p in params if p.requires_grad]
        if not train:
            status = "frozen"
        elif not any(id(p) in reached for p in train):
            status = "no gradient"
        elif len(train) < len(params):
            status = "partly frozen"
        else:
            status = "ok"
        result.append(
            LayerStatus(
                name=name,
                kind=type(module).__name__,
                parameters=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in train),
                status=status,
            )
        )
    return result
