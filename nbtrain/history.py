"""What a run recorded: per-step and per-evaluation metrics, and the events between them.

Naming, decided once: metrics are ``snake_case``; per-layer gradient statistics are
``grad_norm/<layer>``, ``grad_mean/<layer>`` (mean |g|) and ``grad_max/<layer>`` (max |g|).
Two tables hold them: ``"step"`` (one row per optimizer step: ``train_loss`` of the batch,
``lr``, ``grad_norm`` for the whole model before clipping, and the per-layer statistics) and
``"eval"`` (one row per evaluation over the full sets: ``train_loss``, ``train_acc``,
``val_loss``, ``val_acc``). Steps count from 1: the row for step N is recorded after the N-th
optimizer step; an evaluation at step 0 describes the model before any training.

One thread writes (the training loop) while others read (the panel): appends and reads take
a lock only for the moment it takes to swap or copy array references.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

TableName = Literal["step", "eval"]


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened between two steps.

    ``step`` is the number of the first step that ran under the new state (steps count from
    1), so a change made before the first step has step 1. ``kind`` is one of the names in
    `EVENT_KINDS`; ``label`` is the short text shown on the plots' markers.
    """

    step: int
    epoch: int
    kind: str
    label: str
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    time: float = dataclasses.field(default_factory=time.time)


EVENT_KINDS = (
    "change",
    "started",
    "paused",
    "resumed",
    "stopped",
    "finished",
    "failed",
    "restart",
    "early_stopped",
    "restored",
)
# The kinds drawn as markers on the plots; the others tell the story of the run.
MARKED_KINDS = ("change", "early_stopped", "restored")


class _Table:
    """Rows of floats under named columns, keyed by step, growing by doubling.

    A value may be NaN or inf (a diverging loss is data, not a gap in the record); whether a
    row recorded a metric at all is kept apart, in `_present`.
    """

    def __init__(self) -> None:
        self.columns: list[str] = []
        self._index: dict[str, int] = {}
        self._steps = np.zeros(0, dtype=np.int64)
        self._epochs = np.zeros(0, dtype=np.int32)
        self._values = np.zeros((0, 0), dtype=np.float64)
        self._present = np.zeros((0, 0), dtype=bool)
        self.n = 0

    def _add_columns(self, names: Iterable[str]) -> None:
        new = [name for name in names if name not in self._index]
        if not new:
            return
        for name in new:
            self._index[name] = len(self.columns)
            self.columns.append(name)
        grown = np.full((self._values.shape[0], len(self.columns)), np.nan)
        grown[:, : self._values.shape[1]] = self._values
        present = np.zeros(grown.shape, dtype=bool)
        present[:, : self._present.shape[1]] = self._present
        self._values, self._present = grown, present

    def _reserve(self) -> None:
        capacity = len(self._steps)
        if self.n < capacity:
            return
        capacity = max(64, 2 * capacity)
        steps = np.zeros(capacity, dtype=np.int64)
        epochs = np.zeros(capacity, dtype=np.int32)
        values = np.full((capacity, len(self.columns)), np.nan)
        present = np.zeros((capacity, len(self.columns)), dtype=bool)
        steps[: self.n], epochs[: self.n], values[: self.n], present[: self.n] = (
            self._steps[: self.n],
            self._epochs[: self.n],
            self._values[: self.n],
            self._present[: self.n],
        )
        self._steps, self._epochs, self._values = steps, epochs, values
        self._present = present

    def append(self, step: int, epoch: int, names: Sequence[str], values: Sequence[float]) -> None:
        if len(names) != len(self.columns) or list(names) != self.columns:
            self._add_columns(names)
        self._reserve()
        row = self._values[self.n]
        if len(names) == len(self.columns):
            row[:] = values
            self._present[self.n] = True
        else:
            row[:] = np.nan
            where = [self._index[name] for name in names]
            row[where] = values
            self._present[self.n, where] = True
        self._steps[self.n] = step
        self._epochs[self.n] = epoch
        self.n += 1

    def series(self, name: str, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows in `rows` where the metric was recorded."""
        index = self._index[name]
        column = self._values[: self.n, index][rows]
        keep = self._present[: self.n, index][rows]
        return self._steps[: self.n][rows][keep].copy(), column[keep].copy()

    def rows(self) -> Iterable[tuple[int, int, dict[str, float]]]:
        """Each row's step, epoch and the metrics it recorded."""
        for i in range(self.n):
            present = self._present[i]
            values = self._values[i].tolist()
            yield (
                int(self._steps[i]),
                int(self._epochs[i]),
                {name: v for name, v, p in zip(self.columns, values, present) if p},
            )


class History:
    """Metrics and events of one run; see the module docstring for the names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, _Table] = {"step": _Table(), "eval": _Table()}
        self._events: list[Event] = []

    # Writing (the training loop)

    def record(self, table: TableName, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.record_row(table, step, epoch, list(metrics), list(metrics.values()))

    def record_row(
        self,
        table: TableName,
        step: int,
        epoch: int,
        names: Sequence[str],
        values: Sequence[float],
    ) -> None:
        with self._lock:
            self._tables[table].append(step, epoch, names, values)

    def add_event(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    # Reading

    def names(self, table: TableName = "step") -> list[str]:
        with self._lock:
            return list(self._tables[table].columns)

    def _table_for(self, name: str, table: TableName | None) -> _Table:
        if table is not None:
            if table not in self._tables:
                raise ValueError(f"table must be 'step' or 'eval', got {table!r}")
            found = self._tables[table]
            if name not in found.columns:
                raise KeyError(f"no metric {name!r} in the {table} table; it has {found.columns}")
            return found
        for candidate in ("step", "eval"):
            if name in self._tables[candidate].columns:
                return self._tables[candidate]
        known = self._tables["step"].columns + self._tables["eval"].columns
        raise KeyError(f"no metric {name!r} recorded; known: {known}")

    def series(self, name: str, table: TableName | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric. A name in both tables (``train_loss``) means the
        per-step one unless ``table="eval"`` is given."""
        with self._lock:
            return self._table_for(name, table).series(name)

    def tail(
        self, name: str, n: int, table: TableName | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The last `n` rows' (steps, values) of a metric, without copying the rest."""
        with self._lock:
            return self._table_for(name, table).series(name, slice(-n, None))

    def head(
        self, name: str, n: int, table: TableName | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first `n` rows' (steps, values) of a metric."""
        with self._lock:
            return self._table_for(name, table).series(name, slice(0, n))

    def last(self, name: str, table: TableName | None = None) -> float | None:
        """The latest recorded value of a metric, or None before the first."""
        try:
            _, values = self.series(name, table)
        except KeyError:
            return None
        return float(values[-1]) if len(values) else None

    def __len__(self) -> int:
        """Number of optimizer steps recorded."""
        return self._tables["step"].n

    @property
    def n_evals(self) -> int:
        return self._tables["eval"].n

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def changes(self) -> list[Event]:
        """The events that changed a setting."""
        return [event for event in self.events if event.kind == "change"]

    def markers(self) -> list[Event]:
        """The events the plots mark: changes, an early stop, a restore of best weights."""
        return [event for event in self.events if event.kind in MARKED_KINDS]

    # Export

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write everything in long form: one row per (table, step, metric), events included.

        Columns: ``table, step, epoch, name, value``; ``table`` is ``step``, ``eval`` or
        ``event`` (for events ``name`` is the kind and ``value`` the label). Long form keeps
        one schema whatever the model's layers are, and pivots straight into a DataFrame.
        """
        with self._lock:
            tables = {name: list(table.rows()) for name, table in self._tables.items()}
            events = list(self._events)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["table", "step", "epoch", "name", "value"])
            for table_name, rows in tables.items():
                for step, epoch, metrics in rows:
                    for name, value in metrics.items():
                        writer.writerow([table_name, step, epoch, name, repr(value)])
            for event in events:
                writer.writerow(["event", event.step, event.epoch, event.kind, event.label])
