"""A run's per-step rows: written where the loss lives, moved into the history in blocks.

Each step's row is its loss and the raw gradient norms of `GradientProbe.measure_raw`. The
rows wait in a small buffer (`ROW_BUFFER` steps) on the model's device; `flush` moves a
whole block into the history with one host transfer and turns the raw norms into per-layer
statistics there (`GradientProbe.combine`), where that costs the same few calls for a block
as for one step.

What cannot wait is the decision about the step itself: a non-finite loss or gradient must
be refused before the optimizer applies it. `measure` hands back the two numbers that
decide it. On the CPU the buffer is host memory, written and read with numpy (a torch
call costs more than the arithmetic on a small model); on a GPU they are one host read of
two numbers a step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .gradients import GradientProbe
from .history import History

ROW_BUFFER = 256  # steps whose rows wait on the device before reaching the history
FLUSH_SECONDS = 0.1  # the longest a finished step waits before it is in the history


class StepRows:
    """The buffered rows of one model's steps, and the columns they become in a history."""

    def __init__(self, probe: GradientProbe) -> None:
        self.probe = probe
        self.columns = ["train_loss", "lr", *probe.columns]
        self._rows: torch.Tensor | None = None  # made at the first step, on the loss's device
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []  # no indexing per step
        self._host: np.ndarray | None = None  # the buffer's memory, when it is on the CPU
        self._host_views: list[np.ndarray] = []
        self._meta: list[tuple[int, int, float]] = []  # (step, epoch, lr) per buffered row
        self._flushed_at = time.perf_counter()

    def __len__(self) -> int:
        """Rows measured and kept but not yet in the history."""
        return len(self._meta)

    def measure(self, loss: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """Write this step's loss and gradient norms into the next row, before clipping.

        Returns the loss, the probe's `health` (finite exactly when every gradient is) and
        the row's raw norms (for `GradientProbe.total_norm`). `keep` must follow.
        """
        if self._rows is None:
            self._rows = torch.empty(ROW_BUFFER, 1 + self.probe.raw_width, device=loss.device)
            self._views = [(row[0], row[1:]) for row in self._rows]
            if self._rows.device.type == "cpu":
                self._host = self._rows.numpy()
                self._host_views = list(self._host[:, 1:])
        slot = len(self._meta)
        loss_slot, raw = self._views[slot]
        if self._host is not None and self.probe.measure_host(self._host_views[slot]):
            loss_value = loss.item()
            self._host[slot, 0] = loss_value
            return loss_value, self.probe.host_health(), raw
        raw = self.probe.measure_raw(out=raw)
        loss_slot.copy_(loss.detach())
        loss_value, health = torch.stack([loss.detach().float(), self.probe.health(raw)]).tolist()
        return loss_value, health, raw

    def keep(self, step: int, epoch: int, lr: float) -> bool:
        """Label the row just measured; True when the buffer should be flushed now: it is
        full, or `FLUSH_SECONDS` have passed since the last flush."""
        self._meta.append((step, epoch, lr))
        return (
            len(self._meta) == ROW_BUFFER or time.perf_counter() - self._flushed_at > FLUSH_SECONDS
        )

    def flush(self, history: History) -> None:
        """Move the kept rows into `history`: one host transfer for all of them."""
        self._flushed_at = time.perf_counter()
        if not self._meta:
            return
        assert self._rows is not None
        block = self._rows[: len(self._meta)].cpu()
        stats = self.probe.combine(block[:, 1:])
        steps, epochs, lrs = zip(*self._meta, strict=True)
        self._meta = []
        values = np.column_stack([block[:, 0].numpy(), lrs, stats.numpy()])
        history.record_rows("step", steps, epochs, self.columns, values)
