"""Per-layer gradient statistics, measured for every layer at once.

One call reduces every gradient tensor with fused ``torch._foreach_norm`` kernels and returns
a single tensor, so a step costs one host transfer however many layers the model has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn


class GradientProbe:
    """Measures the total gradient norm and, per named layer, L2 norm, mean |g| and max |g|.

    A layer's statistics cover all of its parameters (weight and bias together). A layer
    whose parameters received no gradient in this step reads NaN, never zero: "no gradient"
    and "a gradient of zero" are different diagnoses. The total norm covers every parameter
    of the model, layers or not (batch norm's scale and shift, say), before any clipping.
    """

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> None:
        self.layer_names = [name for name, _ in layers]
        self._layer_params = [[p for p in m.parameters() if p.requires_grad] for _, m in layers]
        # A layer none of whose parameters train can never have a gradient: "frozen".
        self.frozen = [not params for params in self._layer_params]
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        in_layers = {id(p) for params in self._layer_params for p in params}
        self._other_params = [
            p for p in model.parameters() if p.requires_grad and id(p) not in in_layers
        ]
        self.parameters = [p for params in self._layer_params for p in params]
        self.parameters += self._other_params
        self._index_cache: tuple[tuple, list[torch.Tensor]] | None = None
        self.columns = ["grad_norm"]
        for stat in ("grad_norm", "grad_mean", "grad_max"):
            self.columns += [f"{stat}/{name}" for name in self.layer_names]

    def measure(self, grads_by_id: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``[total_norm, norms..., means..., maxes...]`` as one float32 tensor.

        The gradients are the parameters' ``.grad``, or with `grads_by_id` the tensors it
        maps ``id(parameter)`` to (what hooks kept: see `nbtrain.external`). The result stays
        on the gradients' device; reading it is the caller's one host transfer.
        """

        def grad_of(p: torch.Tensor) -> torch.Tensor | None:
            return p.grad if grads_by_id is None else grads_by_id.get(id(p))

        grads: list[torch.Tensor] = []
        owners: list[int] = []
        numel = [0] * len(self._layer_params)
        for index, params in enumerate(self._layer_params):
            for p in params:
                g = grad_of(p)
                if g is not None:
                    grads.append(g)
                    owners.append(index)
                    numel[index] += g.numel()
        n_layers = len(self._layer_params)
        other = [g for g in map(grad_of, self._other_params) if g is not None]
        if not grads and not other:
            return torch.full((1 + 3 * n_layers,), math.nan, device=self.device)
        device = (grads or other)[0].device

        norms = torch.full((n_layers,), math.nan, device=device)
        means = torch.full((n_layers,), math.nan, device=device)
        maxes = torch.full((n_layers,), math.nan, device=device)
        total_sq = torch.zeros((), device=device)
        if grads:
            owner, has, counts = self._indices(owners, numel, device)
            l2 = torch.stack(torch._foreach_norm(grads, 2)).float()
            l1 = torch.stack(torch._foreach_norm(grads, 1)).float()
            linf = torch.stack(torch._foreach_norm(grads, math.inf)).float()
            sq = torch.zeros(n_layers, device=device).index_add_(0, owner, l2 * l2)
            l1_sum = torch.zeros(n_layers, device=device).index_add_(0, owner, l1)
            mx = torch.zeros(n_layers, device=device).scatter_reduce_(0, owner, linf, "amax")
            norms = torch.where(has, sq.sqrt(), norms)
            means = torch.where(has, l1_sum / counts, means)
            maxes = torch.where(has, mx, maxes)
            total_sq = total_sq + sq.sum()
        if other:
            total_sq = total_sq + torch.stack(torch._foreach_norm(other, 2)).float().pow(2).sum()
        return torch.cat([total_sq.sqrt().reshape(1), norms, means, maxes])

    def _indices(
        self, owners: list[int], numel: list[int], device: torch.device
    ) -> list[torch.Tensor]:
        """Which layer owns each gradient, as device tensors, made once and then reused.

        Note: a tensor built from a Python list is copied to the device synchronously (a
        host sync on CUDA), so they are remade only when the set of gradients changes.
        """
        key = (tuple(owners), tuple(numel), device)
        if self._index_cache is None or self._index_cache[0] != key:
            made = [
                torch.tensor(owners, device=device),
                torch.tensor([n > 0 for n in numel], device=device),
                torch.tensor([max(n, 1) for n in numel], device=device, dtype=torch.float32),
            ]
            self._index_cache = (key, made)
        return self._index_cache[1]
