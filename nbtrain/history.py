"""What a run recorded: per-step and per-evaluation metrics, and the events between them.

Naming, decided once: metrics are ``snake_case``; per-layer gradient statistics are
``grad_norm/<layer>``, ``grad_mean/<layer>`` (mean |g|) and ``grad_max/<layer>`` (max |g|).
Two tables hold them: ``"step"`` (one row per optimizer step: ``train_loss`` of the batch,
``lr``, ``grad_norm`` for the whole model before clipping, and the per-layer statistics) and
``"eval"`` (one row per evaluation over the full sets: ``train_loss``, ``train_acc``,
``val_loss``, ``val_acc``). Steps count from 1: the row for step N is recorded after the N-th
optimizer step; an evaluation at step 0 describes the model before any training.

Long runs keep their start: each table keeps its last `recent` rows (4,096 by default)
exactly and folds older rows into at most `max_buckets` buckets (1,024) that keep each
metric's minimum, mean and maximum, and the steps of the extremes. When the buckets are full,
neighbours merge and a bucket covers twice as many steps. `series()` returns the exact rows
and, before them, each bucket's minimum and maximum at the steps they happened, so a spike
at step 10 of a million-step run is still on the plot; `buckets()` gives the means. Per-step
values are float32 (the loss and the gradient statistics are float32 tensors anyway) except
``lr``, kept in float64 so that 1e-3 reads back as 1e-3. Memory is bounded: 1.3 MiB for the
default model's 15 per-step columns after a million steps, as after 10,000 (`History.nbytes`;
float64 rows kept whole would take 126 MiB).

One thread writes (the training loop) while others read (the panel): appends and reads take
a lock only for the moment it takes to copy the arrays they touch, which are bounded too.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from ._io import atomic_write

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
    "diverged",
    "stopped",
    "finished",
    "failed",
    "restart",
    "early_stopped",
    "restored",
    "finding",
    "cleared",
)
# The kinds drawn as markers on the plots; the others tell the story of the run.
MARKED_KINDS = ("change", "diverged", "early_stopped", "restored")


class Buckets(NamedTuple):
    """The folded part of one metric's history: per bucket its first and last step, how
    many values it holds, and their minimum, mean and maximum (NaN where it holds none)."""

    first: np.ndarray
    last: np.ndarray
    count: np.ndarray
    min: np.ndarray
    mean: np.ndarray
    max: np.ndarray


def _bucket_stats(block: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row of `block` (buckets × width): min, mean, max, the steps of both extremes,
    and how many values the row holds; NaN is a missing value, never an extreme."""
    missing = np.isnan(block)
    count = (~missing).sum(axis=1)
    low = np.where(missing, np.inf, block).argmin(axis=1)
    high = np.where(missing, -np.inf, block).argmax(axis=1)
    rows = np.arange(len(block))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(missing, 0.0, block).sum(axis=1) / count
    empty = count == 0
    vmin = np.where(empty, np.nan, block[rows, low])
    vmax = np.where(empty, np.nan, block[rows, high])
    return vmin, mean, vmax, steps[rows, low], steps[rows, high], count


class _Column:
    """One metric: its recent values in full, and per folded bucket min, mean and max (with
    the steps where the extremes happened, so a plot puts a spike where it was)."""

    def __init__(self, dtype: type, capacity: int, max_buckets: int) -> None:
        self.values = np.full(capacity, np.nan, dtype=dtype)
        # Whether a row recorded this metric: a NaN loss is a value (a run diverged), not a
        # gap in the record. Folded buckets count only finite values.
        self.present = np.zeros(capacity, dtype=bool)
        self.b_min = np.full(max_buckets, np.nan, dtype=dtype)
        self.b_mean = np.full(max_buckets, np.nan, dtype=dtype)
        self.b_max = np.full(max_buckets, np.nan, dtype=dtype)
        self.b_min_step = np.zeros(max_buckets, dtype=np.int64)
        self.b_max_step = np.zeros(max_buckets, dtype=np.int64)
        self.b_count = np.zeros(max_buckets, dtype=np.int32)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in vars(self).values())


class _Table:
    """Rows of floats under named columns, keyed by step, in two tiers.

    The last `recent` rows (at least) are kept exactly. Older rows are folded into at most
    `max_buckets` buckets of `width` rows; when they are full, neighbours merge in pairs and
    the width doubles. Memory is therefore bounded whatever the run's length, and the first
    steps are never dropped, only coarsened.
    """

    def __init__(
        self,
        dtype: type = np.float64,
        float64: Iterable[str] = (),
        recent: int = 10_000,
        max_buckets: int = 2048,
    ) -> None:
        self.dtype = dtype
        self.float64 = frozenset(float64)  # columns that need float64 (lr: 1e-3 stays 1e-3)
        self.recent = recent
        self.max_buckets = max_buckets
        self.fold_chunk = max(1, recent // 2)  # fold in chunks, not one row per append
        self.columns: list[str] = []
        self._cols: dict[str, _Column] = {}
        self._steps = np.zeros(64, dtype=np.int64)
        self._epochs = np.zeros(64, dtype=np.int32)
        self.n = 0  # rows recorded, folded ones included
        self.n_exact = 0

        # The folded tier's bookkeeping, shared by every column.
        self.width = 1
        self.n_buckets = 0
        self.b_first = np.zeros(max_buckets, dtype=np.int64)
        self.b_last = np.zeros(max_buckets, dtype=np.int64)
        self.b_epoch = np.zeros(max_buckets, dtype=np.int32)
        self._folded_points: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # series' old part

    @property
    def nbytes(self) -> int:
        own = sum(
            a.nbytes for a in (self._steps, self._epochs, self.b_first, self.b_last, self.b_epoch)
        )
        return own + sum(column.nbytes for column in self._cols.values())

    def _add_columns(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._cols:
                dtype = np.float64 if name in self.float64 else self.dtype
                self._cols[name] = _Column(dtype, len(self._steps), self.max_buckets)
                self.columns.append(name)

    def _reserve(self, extra: int) -> None:
        need = self.n_exact + extra
        if need <= len(self._steps):
            return
        capacity = len(self._steps)
        while capacity < need:
            capacity *= 2
        self._steps = np.resize(self._steps, capacity)
        self._epochs = np.resize(self._epochs, capacity)
        for column in self._cols.values():
            grown = np.full(capacity, np.nan, dtype=column.values.dtype)
            grown[: self.n_exact] = column.values[: self.n_exact]
            column.values = grown
            present = np.zeros(capacity, dtype=bool)
            present[: self.n_exact] = column.present[: self.n_exact]
            column.present = present

    def append(
        self, steps: np.ndarray, epochs: np.ndarray, names: Sequence[str], values: np.ndarray
    ) -> None:
        """Append len(steps) rows; `values` is (rows, len(names)); NaN means not recorded."""
        if len(steps) > self.fold_chunk:  # in pieces, so the exact tier never outgrows its size
            for at in range(0, len(steps), self.fold_chunk):
                piece = slice(at, at + self.fold_chunk)
                self.append(steps[piece], epochs[piece], names, values[piece])
            return
        if len(names) != len(self.columns) or list(names) != self.columns:
            self._add_columns(names)
        start, end = self.n_exact, self.n_exact + len(steps)
        self._reserve(len(steps))
        self._steps[start:end] = steps
        self._epochs[start:end] = epochs
        if len(names) != len(self.columns):
            for column in self._cols.values():
                column.values[start:end] = np.nan
                column.present[start:end] = False
        for j, name in enumerate(names):
            self._cols[name].values[start:end] = values[:, j]
            self._cols[name].present[start:end] = True
        self.n_exact = end
        self.n += len(steps)
        if self.n_exact >= self.recent + max(self.fold_chunk, self.width):
            self._fold((self.n_exact - self.recent) // self.width * self.width)

    def _fold(self, k: int) -> None:
        """Fold the oldest `k` exact rows (a multiple of the width) into new buckets."""
        while self.n_buckets + k // self.width > self.max_buckets:
            self._merge()
            k = k // self.width * self.width
        w, nb = self.width, k // self.width
        if nb == 0:
            return
        steps = self._steps[:k].reshape(nb, w)
        at = slice(self.n_buckets, self.n_buckets + nb)
        self.b_first[at], self.b_last[at] = steps[:, 0], steps[:, -1]
        self.b_epoch[at] = self._epochs[w - 1 : k : w]
        for column in self._cols.values():
            block = column.values[:k].reshape(nb, w).astype(np.float64)
            vmin, mean, vmax, smin, smax, count = _bucket_stats(block, steps)
            column.b_min[at], column.b_mean[at], column.b_max[at] = vmin, mean, vmax
            column.b_min_step[at], column.b_max_step[at], column.b_count[at] = smin, smax, count
        rest = self.n_exact - k
        columns = self._cols.values()
        for array in (
            self._steps,
            self._epochs,
            *(c.values for c in columns),
            *(c.present for c in columns),
        ):
            array[:rest] = array[k : self.n_exact].copy()
        for column in self._cols.values():
            column.values[rest : self.n_exact] = np.nan
            column.present[rest : self.n_exact] = False
        self.n_exact = rest
        self.n_buckets += nb
        self._folded_points.clear()

    def _merge(self) -> None:
        """Halve the folded tier by merging neighbours in pairs; the width doubles."""
        pairs, odd = divmod(self.n_buckets, 2)
        a, b = np.arange(pairs) * 2, np.arange(pairs) * 2 + 1
        tail, moved = self.n_buckets - 1, slice(pairs, pairs + odd)
        self.b_first[:pairs], self.b_last[:pairs] = self.b_first[a], self.b_last[b]
        self.b_epoch[:pairs] = self.b_epoch[b]
        if odd:
            self.b_first[moved], self.b_last[moved] = self.b_first[tail], self.b_last[tail]
            self.b_epoch[moved] = self.b_epoch[tail]
        for c in self._cols.values():
            na, nb = c.b_count[a].astype(np.float64), c.b_count[b].astype(np.float64)
            total = na + nb
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (np.nan_to_num(c.b_mean[a]) * na + np.nan_to_num(c.b_mean[b]) * nb) / total
            low_b = np.isnan(c.b_min[a]) | (c.b_min[b] < c.b_min[a])
            high_b = np.isnan(c.b_max[a]) | (c.b_max[b] > c.b_max[a])
            merged = (
                np.where(low_b, c.b_min[b], c.b_min[a]),
                np.where(total > 0, mean, np.nan),
                np.where(high_b, c.b_max[b], c.b_max[a]),
                np.where(low_b, c.b_min_step[b], c.b_min_step[a]),
                np.where(high_b, c.b_max_step[b], c.b_max_step[a]),
                total,
            )
            arrays = (c.b_min, c.b_mean, c.b_max, c.b_min_step, c.b_max_step, c.b_count)
            for array, value in zip(arrays, merged, strict=True):
                last = array[tail]
                array[:pairs] = value
                if odd:
                    array[moved] = last
        self.n_buckets = pairs + odd
        self.width *= 2
        self._folded_points.clear()

    def exact(self, name: str, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The recent, unfolded (steps, values) of one column; of its `last` rows only."""
        rows = slice(0 if last is None else max(0, self.n_exact - last), self.n_exact)
        values = self._cols[name].values[rows]
        keep = self._cols[name].present[rows]
        return self._steps[rows][keep], values[keep].astype(np.float64)

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        steps, values = self.exact(name)
        if not self.n_buckets:
            return steps, values
        if name not in self._folded_points:  # it changes only when rows are folded
            self._folded_points[name] = self._extremes(name)
        old_steps, old_values = self._folded_points[name]
        return np.concatenate([old_steps, steps]), np.concatenate([old_values, values])

    def _extremes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Each folded bucket's two extremes, at their steps, in step order."""
        c, nb = self._cols[name], self.n_buckets
        min_first = c.b_min_step[:nb] <= c.b_max_step[:nb]
        at = np.stack(
            [
                np.where(min_first, c.b_min_step[:nb], c.b_max_step[:nb]),
                np.where(min_first, c.b_max_step[:nb], c.b_min_step[:nb]),
            ],
            axis=1,
        )
        value = np.stack(
            [
                np.where(min_first, c.b_min[:nb], c.b_max[:nb]),
                np.where(min_first, c.b_max[:nb], c.b_min[:nb]),
            ],
            axis=1,
        )
        has = c.b_count[:nb] > 0
        keep = np.stack([has, has & (at[:, 0] != at[:, 1])], axis=1)
        return at[keep], value[keep].astype(np.float64)

    def buckets(self, name: str) -> Buckets:
        c, nb = self._cols[name], self.n_buckets
        return Buckets(
            self.b_first[:nb].copy(),
            self.b_last[:nb].copy(),
            c.b_count[:nb].copy(),
            c.b_min[:nb].astype(np.float64),
            c.b_mean[:nb].astype(np.float64),
            c.b_max[:nb].astype(np.float64),
        )

    def last(self, name: str) -> float | None:
        values = self._cols[name].values[: self.n_exact]
        found = np.flatnonzero(self._cols[name].present[: self.n_exact])
        if len(found):
            return float(values[found[-1]])
        _, folded = self.series(name)
        return float(folded[-1]) if len(folded) else None

    def rows(self) -> Iterable[tuple[int, int, dict[str, np.floating]]]:
        """The exact rows, oldest first, as numpy scalars: str() of a float32 value is its
        shortest form (0.123), where float() would widen it to 0.12300000339746475."""
        for i in range(self.n_exact):
            yield (
                int(self._steps[i]),
                int(self._epochs[i]),
                {name: c.values[i] for name, c in self._cols.items() if c.present[i]},
            )

    def bucket_rows(self) -> Iterable[tuple[int, int, dict[str, np.floating]]]:
        """The folded buckets, oldest first: (last step, epoch, {"name.min": ..., ...})."""
        for i in range(self.n_buckets):
            row = {}
            for name, c in self._cols.items():
                if c.b_count[i]:
                    row[f"{name}.min"] = c.b_min[i]
                    row[f"{name}.mean"] = c.b_mean[i]
                    row[f"{name}.max"] = c.b_max[i]
            yield int(self.b_last[i]), int(self.b_epoch[i]), row


class History:
    """Metrics and events of one run; see the module docstring for the names."""

    def __init__(self, recent: int = 4096, max_buckets: int = 1024) -> None:
        for name, value, low in (("recent", recent, 1), ("max_buckets", max_buckets, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
        self._lock = threading.Lock()
        self._tables: dict[str, _Table] = {
            "step": _Table(np.float32, ("lr",), recent, max_buckets),
            "eval": _Table(np.float64, (), recent, max_buckets),
        }
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
        row = np.asarray(values, dtype=np.float64).reshape(1, len(names))
        with self._lock:
            self._tables[table].append(np.array([step]), np.array([epoch]), names, row)

    def record_rows(
        self,
        table: TableName,
        steps: Sequence[int] | np.ndarray,
        epochs: Sequence[int] | np.ndarray,
        names: Sequence[str],
        values: np.ndarray,
    ) -> None:
        """Append many rows at once; `values` has one row per step and one column per name.

        The engine records a batch of steps this way, one lock and one copy per batch.
        """
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(steps), len(names)) or len(epochs) != len(steps):
            raise ValueError(
                f"values must have shape (steps, names) = ({len(steps)}, {len(names)}) with one "
                f"epoch per step, got {values.shape} and {len(epochs)} epochs"
            )
        with self._lock:
            self._tables[table].append(np.asarray(steps), np.asarray(epochs), names, values)

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
        """(steps, values) of one metric, as float64 copies. A name in both tables
        (``train_loss``) means the per-step one unless ``table="eval"`` is given.

        Recent steps are exact; before them, each folded bucket gives its minimum and its
        maximum at the steps where they happened (see the module docstring).
        """
        with self._lock:
            return self._table_for(name, table).series(name)

    def exact(
        self, name: str, table: TableName | None = None, last: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the recent, unfolded part of a metric's history only; with
        `last`, of the last that many rows (values not recorded there are left out)."""
        with self._lock:
            return self._table_for(name, table).exact(name, last)

    def tail(
        self, name: str, n: int, table: TableName | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The last `n` rows' (steps, values) of a metric (rows that lack it are left out)."""
        return self.exact(name, table, last=n)

    def head(
        self, name: str, n: int, table: TableName | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first `n` (steps, values) of a metric. Once the first steps are folded, these
        are the first buckets' extremes (see the module docstring)."""
        steps, values = self.series(name, table)
        return steps[:n], values[:n]

    def buckets(self, name: str, table: TableName | None = None) -> Buckets:
        """The folded part of a metric's history: first and last step, count, min, mean and
        max per bucket, oldest first (empty arrays while nothing is folded)."""
        with self._lock:
            return self._table_for(name, table).buckets(name)

    def last(self, name: str, table: TableName | None = None) -> float | None:
        """The latest recorded value of a metric, or None before the first."""
        try:
            with self._lock:
                return self._table_for(name, table).last(name)
        except KeyError:
            return None

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables' arrays (events not included)."""
        with self._lock:
            return sum(table.nbytes for table in self._tables.values())

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
        Folded history (long runs) comes first as ``step_bucket`` rows: ``step`` is the
        bucket's last step and ``name`` is ``<metric>.min``, ``.mean`` or ``.max``.
        The file is replaced atomically: a failure mid-write leaves the previous file intact.
        """
        with self._lock:
            tables = {}
            for name, table in self._tables.items():
                if table.n_buckets:
                    tables[f"{name}_bucket"] = list(table.bucket_rows())
                tables[name] = list(table.rows())
            events = list(self._events)
        with atomic_write(path, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["table", "step", "epoch", "name", "value"])
            for table_name, rows in tables.items():
                for step, epoch, metrics in rows:
                    for name, value in metrics.items():
                        writer.writerow([table_name, step, epoch, name, str(value)])
            for event in events:
                writer.writerow(["event", event.step, event.epoch, event.kind, event.label])
