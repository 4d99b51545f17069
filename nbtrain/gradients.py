"""Per-layer gradient statistics, measured for every layer at once.

A step does only what cannot wait: the L2, L1 and max of every gradient tensor, written into
one row of a device buffer with no host transfer. On a GPU that is three fused
``torch._foreach_norm`` kernels; on the CPU, where ``_foreach_norm`` is a loop of one call
per tensor, it is numpy's ``reduceat`` over one concatenated copy of the gradients (three to
five times faster on the models in benchmarks/bench_overhead.py). Turning those per-tensor
norms into per-layer statistics (`combine`) waits until a whole block of rows reaches the
history, where it costs the same few calls for a block of 256 steps as for one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
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
        self._in_layers = [p for params in self._layer_params for p in params]
        self.parameters = self._in_layers + self._other_params
        self.columns = ["grad_norm"]
        for stat in ("grad_norm", "grad_mean", "grad_max"):
            self.columns += [f"{stat}/{name}" for name in self.layer_names]

        # A raw row: L2, L1 and max of each layer parameter's gradient (NaN: no gradient),
        # then the L2 of each other parameter's gradient (0: none).
        n = len(self._in_layers)
        self.raw_width = 3 * n + len(self._other_params)
        owners = [i for i, params in enumerate(self._layer_params) for _ in params]
        self._member = torch.zeros(len(self._layer_params), n)
        self._member[owners, range(n)] = 1.0
        self._numel = torch.tensor([float(p.numel()) for p in self._in_layers])
        sizes = [p.numel() for p in self._in_layers]
        self._offsets = np.cumsum([0, *sizes[:-1]]) if sizes else np.zeros(0, dtype=np.int64)
        # The CPU path's scratch memory, made once: |g| of every gradient end to end, and
        # its square.
        self._magnitude = np.empty(sum(sizes), dtype=np.float32)
        self._square = np.empty(sum(sizes), dtype=np.float32)
        self._member_np = self._member.numpy()
        self._numel_np = self._numel.numpy()
        self._none_missing = [False] * n
        self._missing: list[bool] = self._none_missing
        self.on_host = False  # the last row was measured on the CPU, all gradients present
        self._host_health = math.nan

    def measure_raw(
        self,
        out: torch.Tensor | None = None,
        grads_by_id: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """This step's per-tensor norms as one row of `raw_width` floats (into `out`).

        The gradients are the parameters' ``.grad``, or with `grads_by_id` the tensors it
        maps ``id(parameter)`` to (what hooks kept: see `nbtrain.external`).
        """
        if grads_by_id is None:
            grads = [p.grad for p in self._in_layers]
            other = [p.grad for p in self._other_params]
        else:
            grads = [grads_by_id.get(id(p)) for p in self._in_layers]
            other = [grads_by_id.get(id(p)) for p in self._other_params]
        if out is None or (out.is_cpu and out.dtype is torch.float32):
            row = torch.empty(self.raw_width) if out is None else out
            if self._measure_host(grads, other, row.numpy()):
                return row
        self._missing = [g is None for g in grads]  # for health(): NaN there means "none"
        if True not in self._missing and all(g is None for g in other):
            parts = [*torch._foreach_norm(grads, 2), *torch._foreach_norm(grads, 1)]
            parts += torch._foreach_norm(grads, math.inf)
            zeros = [torch.zeros((), device=grads[0].device)] * len(other) if other else []
            return (
                torch.stack(parts + zeros, out=out)
                if out is not None
                else torch.stack(parts + zeros)
            )

        # The general case: some gradients missing (a layer unused, batch norm switched on).
        present = [g for g in grads + other if g is not None]
        device = present[0].device if present else torch.device("cpu")
        nan, zero = torch.full((), math.nan, device=device), torch.zeros((), device=device)
        have = [g for g in grads if g is not None]
        per_order = []
        for order in (2, 1, math.inf):
            norms = iter(torch._foreach_norm(have, order)) if have else iter(())
            per_order += [next(norms) if g is not None else nan for g in grads]
        others = [g for g in other if g is not None]
        norms = iter(torch._foreach_norm(others, 2)) if others else iter(())
        per_order += [next(norms) if g is not None else zero for g in other]
        row = torch.stack([t.float() for t in per_order]) if per_order else torch.zeros(0)
        if out is not None:
            out.copy_(row)
            return out
        return row

    def measure_host(self, row: np.ndarray) -> bool:
        """`measure_raw` of the parameters' ``.grad`` into `row`, a float32 numpy array,
        for gradients in host memory; True when done, and `host_health()` is then the
        step's `health`.

        False, with nothing written, unless every layer parameter has a gradient numpy can
        read (on the CPU, not bfloat16) and no other parameter has one: use `measure_raw`.
        """
        grads = [p.grad for p in self._in_layers]
        other = [p.grad for p in self._other_params] if self._other_params else []
        return self._measure_host(grads, other, row)

    def _measure_host(
        self, grads: list[torch.Tensor | None], other: list[torch.Tensor | None], row: np.ndarray
    ) -> bool:
        self.on_host = False
        if not grads or any(g is not None for g in other):
            return False
        try:
            arrays = [g.numpy() for g in grads]  # type: ignore[union-attr]
        except (AttributeError, TypeError, RuntimeError):  # None, on a device, or bfloat16
            return False
        self._missing = self._none_missing
        self._measure_on_cpu(arrays, row)
        self.on_host = True
        return True

    def _measure_on_cpu(self, arrays: list[np.ndarray], row: np.ndarray) -> None:
        # Every call here is a numpy call into memory made once: on a small model each step's
        # cost is the calls, not the arithmetic (benchmarks/bench_overhead.py).
        n = len(arrays)
        magnitude, square = self._magnitude, self._square
        np.concatenate(arrays, axis=None, out=magnitude)
        np.abs(magnitude, out=magnitude)
        # Note: an exploding gradient's squares overflow float32 to inf, which is then its norm.
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(magnitude, magnitude, out=square)
            np.add.reduceat(square, self._offsets, out=row[:n])
        np.sqrt(row[:n], out=row[:n])
        self._host_health = float(np.add.reduce(row[:n]))
        np.add.reduceat(magnitude, self._offsets, out=row[n : 2 * n])
        np.maximum.reduceat(magnitude, self._offsets, out=row[2 * n : 3 * n])
        row[3 * n :] = 0.0

    def health(self, raw: torch.Tensor) -> torch.Tensor:
        """A scalar that is finite exactly when every gradient in the raw row is: the sum of
        their L2 norms (a layer without gradient, NaN in the row, is left out)."""
        n = len(self._in_layers)
        l2 = raw[:n]
        if any(getattr(self, "_missing", ())):
            l2 = l2[torch.tensor([not m for m in self._missing], device=raw.device)]
        return l2.sum() + raw[3 * n :].sum()

    def host_health(self) -> float:
        """`health` of the row `measure_raw` last wrote on the host (`on_host`), as a float:
        summed as the row was written, with no torch call and no transfer."""
        assert self.on_host, "host_health() is for a row measured on the CPU"
        return self._host_health

    def total_norm(self, raw: torch.Tensor) -> torch.Tensor:
        """The whole model's gradient L2 norm from one raw row (for clipping)."""
        n = len(self._in_layers)
        l2 = torch.cat([raw[:n].nan_to_num(0.0), raw[3 * n :]])
        return l2.square().sum().sqrt()

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Rows of ``[total_norm, norms..., means..., maxes...]`` from rows of raw norms.

        In numpy, on the host: a block of a few hundred rows is a handful of small arrays,
        for which a numpy call costs a fraction of a torch call.
        """
        raw = raw.float().reshape(-1, self.raw_width).cpu().numpy()
        n, member = len(self._in_layers), self._member_np
        l2, l1, linf, other = raw[:, :n], raw[:, n : 2 * n], raw[:, 2 * n : 3 * n], raw[:, 3 * n :]
        present = ~np.isnan(l2)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            square = np.where(present, l2, 0.0) ** 2
            norms = np.sqrt(square @ member.T)
            numel = (present * self._numel_np) @ member.T
            means = (np.where(present, l1, 0.0) @ member.T) / np.maximum(numel, 1)
            # |g| >= 0, so a non-member's zero never wins the max.
            maxes = (np.where(present, linf, 0.0)[:, None, :] * member).max(axis=2, initial=0.0)
            missing = np.where(numel > 0, 0.0, np.nan)
            total = np.sqrt(square.sum(axis=1) + (other**2).sum(axis=1))
        no_grad = ~present.any(axis=1) & (other.sum(axis=1) == 0)
        total = np.where(no_grad, np.nan, total)
        out = np.concatenate(
            [total[:, None], norms + missing, means + missing, maxes + missing], 1
        )
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def measure(self) -> torch.Tensor:
        """``[total_norm, norms..., means..., maxes...]`` of the gradients now, as one
        float32 tensor."""
        return self.combine(self.measure_raw())[0]

    def first_nonfinite(self) -> str | None:
        """The first layer, in network order, holding a NaN or infinite gradient, or None.

        Parameters outside the named layers (batch norm's scale and shift) are checked last
        and reported as "other parameters". Reads every gradient: meant for the rare step
        whose total norm came out non-finite, not for every step.
        """
        groups = [
            *zip(self.layer_names, self._layer_params),
            ("other parameters", self._other_params),
        ]
        for name, params in groups:
            for p in params:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return name
        return None
