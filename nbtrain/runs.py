"""Runs: every training history of the session, kept so that runs can be compared.

A *run* is one history from step 0: an `Experiment` begins one when it is built and on every
`reset()`, and `Experiment.fork()` begins one that shares its parent's history up to the fork
step. Each run is a `Run` record with

* ``id``: a number unique in its registry, counting from 1 (the id of a run dropped before
  it trained is given to the next one);
* ``name``: free text, editable (``run.name = "with dropout"``, or in the panel's run table);
* ``config``: the `Config` its first step ran with (changes made between Reset and Start
  included); changes made later (``set()``, the panel's switches) are its ``change``
  events, and ``final_config`` is what is in force now (or was at its end);
* ``history``: the run's `History` (the experiment's ``history`` while the run is current);
* ``parent`` and ``fork_step``: for a fork, the run it was forked from and the first step
  it ran on its own;
* ``state``: running, paused, finished, stopped, diverged, failed, or idle before its start.

The registry (`RunRegistry`) is one per kernel session by default (`session_runs()`), so a
panel shows every run of the session: experiments built in other cells, forks, resets.
An experiment's ``runs`` attribute is that registry and ``current_run`` its own run.
A run that never trained (built, then reset before Start) is dropped at the reset.

Export, per run or for all runs of a registry: ``to_csv`` (long form, events included),
``to_json``, ``to_dataframe`` (needs pandas) and ``summary_markdown`` for lecture notes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Config
from .history import Event, History

if TYPE_CHECKING:
    import pandas

    from .engine import Experiment

#: The columns of the long form that `to_csv` and `to_dataframe` write.
LONG_COLUMNS = ("run_id", "run", "table", "step", "epoch", "name", "value")


# Rows of a history through its public API


def epoch_of(table: str, step: int, steps_per_epoch: int) -> int:
    """The epoch counter the engine held when it recorded this row.

    Note: `History` gives per-row epochs only inside ``to_csv``; rebuilding them from the
    step is exact for histories the engine records (a step row is written before the epoch
    counter moves, an evaluation after it). Swap for History's own epochs once it exposes
    them (issue 8 is reworking its storage).
    """
    if table == "step":
        return (step - 1) // steps_per_epoch
    return step // steps_per_epoch


def table_rows(history: History, table: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, names, values) of one table: one row per recorded step, NaN where a metric
    has no value at that step (values a metric never had are not kept by `History.series`)."""
    names = history.names(table)  # type: ignore[arg-type]
    series = [history.series(name, table) for name in names]  # type: ignore[arg-type]
    if not series:
        return np.zeros(0, dtype=np.int64), names, np.zeros((0, 0))
    steps = np.unique(np.concatenate([s for s, _ in series]).astype(np.int64))
    values = np.full((len(steps), len(names)), np.nan)
    for j, (s, v) in enumerate(series):
        values[np.searchsorted(steps, s), j] = v
    return steps, names, values


def long_rows(history: History, steps_per_epoch: int) -> Iterator[tuple]:
    """(table, step, epoch, name, value) for every metric value, then every event, whose
    ``name`` is its kind and ``value`` its label (the same long form as `History.to_csv`)."""
    for table in ("step", "eval"):
        steps, names, values = table_rows(history, table)
        for i, step in enumerate(steps.tolist()):
            epoch = epoch_of(table, step, steps_per_epoch)
            for name, value in zip(names, values[i].tolist(), strict=True):
                if not math.isnan(value):
                    yield table, step, epoch, name, value
    for event in history.events:
        yield "event", event.step, event.epoch, event.kind, event.label


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


def event_record(event: Event, plain: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """An event as a dict of plain values, its detail made plain by `plain` (JSON's types
    by default; checkpoints pass their own)."""
    return {
        "step": event.step,
        "epoch": event.epoch,
        "kind": event.kind,
        "label": event.label,
        "detail": (plain or _plain)(event.detail),
        "time": event.time,
    }


def _plain(value: Any) -> Any:
    """A config or event value in JSON's types (tuples become lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float):
        return _json_number(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


# One run

_ENDS = ("finished", "stopped", "failed", "diverged")


def _change_key(event: Event) -> tuple:
    """Two runs made the same change when it is the same setting, value and step."""
    return event.step, event.detail.get("name"), event.detail.get("new")


def _cell(text: Any) -> str:
    """Text for a Markdown table cell: a bare ``|`` would end the cell."""
    return str(text).replace("|", "\\|")


def _format_value(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "-".join(map(str, value))
    return str(value)


@dataclasses.dataclass(eq=False)
class Run:
    """One run of the session; see the module docstring."""

    id: int
    name: str
    base_config: Config = dataclasses.field(repr=False)
    history: History = dataclasses.field(repr=False)
    steps_per_epoch: int = dataclasses.field(repr=False)
    parent: int | None = None
    fork_step: int | None = None
    _experiment: Any = dataclasses.field(default=None, repr=False)  # weakref while current
    _final_config: Config | None = dataclasses.field(default=None, repr=False)

    @property
    def config(self) -> Config:
        """The configuration the run's first step ran with: the one it was built with and
        the changes made before that step (``set()`` between Reset and Start)."""
        early = {
            e.detail["name"]: e.detail["new"]
            for e in self.history.changes()
            if e.step == 1 and "name" in e.detail
        }
        return self.base_config.replace(**early) if early else self.base_config

    @property
    def experiment(self) -> Experiment | None:
        """The experiment while this is its current run, else None."""
        return self._experiment() if self._experiment is not None else None

    @property
    def final_config(self) -> Config:
        exp = self.experiment
        return exp.config if exp is not None else (self._final_config or self.config)

    @property
    def is_empty(self) -> bool:
        return len(self.history) == 0 and self.history.n_evals == 0

    @property
    def state(self) -> str:
        exp = self.experiment
        if exp is not None:
            state = exp.state
        else:  # ended: the run's last end event tells how (reset() stops a run first)
            ends = [e.kind for e in self.history.events if e.kind in _ENDS]
            state = ends[-1] if ends else "idle"
        if state in ("finished", "stopped") and self.diverged:
            return "diverged"
        return state

    @property
    def diverged(self) -> bool:
        """A NaN or infinite training loss was recorded (`History.series` drops NaN, so a
        step with an lr but no loss value is one)."""
        names = self.history.names("step")
        if "train_loss" not in names or "lr" not in names:
            return False
        steps, loss = self.history.series("train_loss", "step")
        return (
            len(steps) < len(self.history.series("lr", "step")[0]) or not np.isfinite(loss).all()
        )

    def _detach(self) -> None:
        """The experiment moves on to a new run: freeze what this one ended as."""
        exp = self.experiment
        if exp is not None:
            self._final_config = exp.config
        self._experiment = None

    # Results

    def best(self, name: str = "val_acc") -> tuple[int, float] | None:
        """(step, value) of the highest value of an evaluation metric, the earliest on ties."""
        if name not in self.history.names("eval"):
            return None
        steps, values = self.history.series(name, "eval")
        if not len(values) or not np.isfinite(values).any():
            return None
        i = int(np.nanargmax(np.where(np.isfinite(values), values, np.nan)))
        return int(steps[i]), float(values[i])

    def final(self, name: str = "val_acc") -> float | None:
        return self.history.last(name, "eval") if name in self.history.names("eval") else None

    def diff(self, baseline: Run) -> dict[str, tuple[Any, Any]]:
        """What this run did differently from `baseline`: ``{label: (baseline's, this run's)}``.

        Start configurations are compared field by field; then each change this run made
        after its first step that the baseline did not make at the same step (a fork's
        change, say) is listed as
        ``"<name> @<step>"``, with what the baseline had in force just before.
        """
        out: dict[str, tuple[Any, Any]] = {}
        for field in dataclasses.fields(Config):
            mine, theirs = getattr(self.config, field.name), getattr(baseline.config, field.name)
            if mine != theirs:
                out[field.name] = (theirs, mine)
        theirs_keys = {_change_key(e) for e in baseline.history.changes()}
        for event in self.history.changes():
            if event.step > 1 and _change_key(event) not in theirs_keys:  # step 1: in the config
                name = event.detail.get("name", event.label)
                out[f"{name} @{event.step}"] = (event.detail.get("old"), event.detail.get("new"))
        return out

    def diff_text(self, baseline: Run | None) -> str:
        if baseline is None or baseline is self:
            return "baseline" if baseline is self else ""
        parts = [
            f"{k} {_format_value(a)}→{_format_value(b)}"
            for k, (a, b) in self.diff(baseline).items()
        ]
        return ", ".join(parts) or "same"

    def summary(self) -> dict[str, Any]:
        best = self.best()
        cfg = self.final_config
        return {
            "run": f"{self.id}: {self.name}",
            "state": self.state,
            "steps": len(self.history),
            "model": f"mlp {_format_value(cfg.hidden)} {cfg.activation}, init {cfg.init}",
            "optimizer": f"{cfg.optimizer} lr={cfg.lr:g}, batch {cfg.batch_size}",
            "dropout / batch norm / clip": (
                f"{_format_value(cfg.dropout)} / {_format_value(cfg.batchnorm)} / "
                f"{_format_value(cfg.clip)}"
            ),
            "changes": "; ".join(e.label + f" @{e.step}" for e in self.history.changes())
            or "none",
            "best val acc": f"{best[1]:.4f} (step {best[0]})" if best else "n/a",
            "final val acc": f"{self.final():.4f}" if self.final() is not None else "n/a",
            "final val loss": (
                f"{self.final('val_loss'):.4f}" if self.final("val_loss") is not None else "n/a"
            ),
        }

    def summary_markdown(self) -> str:
        """The run's summary as a two-column Markdown table, for lecture notes.

        Note: written by hand (a table of two columns); pandas' ``to_markdown`` would need
        the tabulate package, which nbtrain does not depend on.
        """
        lines = ["| | |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in self.summary().items()]
        return "\n".join(lines)

    # Export

    def long_rows(self) -> Iterator[tuple]:
        for row in long_rows(self.history, self.steps_per_epoch):
            yield (self.id, self.name, *row)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """This run in long form (`LONG_COLUMNS`), events included."""
        _write_csv(path, [self])

    def to_json(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The run as a JSON object (written to `path` if given, and returned).

        ``{"id", "name", "parent", "fork_step", "state", "config", "final_config",
        "step": {...}, "eval": {...}, "events": [...]}``, where each table is
        ``{"step": [...], "epoch": [...], "metrics": {name: [...]}}`` with null for a value
        not recorded at that step or not finite.
        """
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "parent": self.parent,
            "fork_step": self.fork_step,
            "state": self.state,
            "config": _plain(dataclasses.asdict(self.config)),
            "final_config": _plain(dataclasses.asdict(self.final_config)),
        }
        for table in ("step", "eval"):
            steps, names, values = table_rows(self.history, table)
            out[table] = {
                "step": steps.tolist(),
                "epoch": [epoch_of(table, s, self.steps_per_epoch) for s in steps.tolist()],
                "metrics": {
                    n: [_json_number(v) for v in values[:, j].tolist()]
                    for j, n in enumerate(names)
                },
            }
        out["events"] = [event_record(e) for e in self.history.events]
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(out, handle, indent=1, allow_nan=False, ensure_ascii=False)
        return out

    def to_dataframe(self) -> pandas.DataFrame:
        return _dataframe([self])


def _write_csv(path: str | os.PathLike[str], runs: list[Run]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LONG_COLUMNS)
        for run in runs:
            for row in run.long_rows():
                writer.writerow(
                    row[:-1] + (repr(row[-1]) if isinstance(row[-1], float) else row[-1],)
                )


def _dataframe(runs: list[Run]) -> pandas.DataFrame:
    """Long form with a float ``value`` for metrics and the ``label`` text for events."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
    rows = [
        (*row[:-1], None if row[2] == "event" else row[-1], row[-1] if row[2] == "event" else None)
        for run in runs
        for row in run.long_rows()
    ]
    frame = pd.DataFrame(rows, columns=[*LONG_COLUMNS, "label"])
    frame["value"] = frame["value"].astype(float)
    return frame


# The registry


class RunRegistry:
    """The runs of a session, in the order they began."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[int, Run] = {}
        self._next_id = 1
        self._version = 0  # bumped on every add, removal and rename: the panel watches it

    def begin(
        self,
        experiment: Experiment,
        *,
        parent: Run | None = None,
        fork_step: int | None = None,
        name: str | None = None,
        config: Config | None = None,
    ) -> Run:
        """Begin `experiment`'s next run; its previous one is frozen, or dropped if empty."""
        previous = getattr(experiment, "current_run", None)
        with self._lock:
            if previous is not None:
                previous._detach()
                if previous.is_empty and self._runs.get(previous.id) is previous:
                    del self._runs[previous.id]
                    if previous.id == self._next_id - 1:
                        self._next_id -= 1  # the id was never seen in a table: reuse it
            run_id, self._next_id = self._next_id, self._next_id + 1
            if name is None:
                name = f"run {run_id}"
                if parent is not None:
                    name = f"{parent.name} ▸ fork @{fork_step}"
            run = Run(
                id=run_id,
                name=name,
                base_config=config or experiment.config,
                history=experiment.history,
                steps_per_epoch=experiment.steps_per_epoch,
                parent=parent.id if parent is not None else None,
                fork_step=fork_step,
                _experiment=weakref.ref(experiment),
            )
            self._runs[run_id] = run
            self._version += 1
        return run

    def adopt(self, experiment: Experiment, **kwargs: Any) -> Run:
        """Move `experiment` into this registry: drop its empty run elsewhere, begin here."""
        previous = experiment.current_run
        if experiment.runs is not self:
            if previous.is_empty:
                experiment.runs.remove(previous.id)
            else:
                previous._detach()
            experiment.current_run = None  # type: ignore[assignment]
            experiment.runs = self
        run = self.begin(experiment, **kwargs)
        experiment.current_run = run
        return run

    def remove(self, run_id: int) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None:
                run._detach()
                self._version += 1

    def rename(self, run_id: int, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self[run_id].name = name.strip()
        with self._lock:
            self._version += 1

    def clear(self) -> None:
        """Forget every run but the ones still current in an experiment."""
        with self._lock:
            self._runs = {i: r for i, r in self._runs.items() if r.experiment is not None}
            self._version += 1

    def __getitem__(self, run_id: int) -> Run:
        with self._lock:
            if run_id not in self._runs:
                raise ValueError(f"run_id must be one of {list(self._runs)}, got {run_id!r}")
            return self._runs[run_id]

    def __iter__(self) -> Iterator[Run]:
        with self._lock:
            return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def ids(self) -> list[int]:
        with self._lock:
            return list(self._runs)

    @property
    def version(self) -> int:
        return self._version

    # Export of several runs

    def _select(self, ids: list[int] | None) -> list[Run]:
        return list(self) if ids is None else [self[i] for i in ids]

    def to_csv(self, path: str | os.PathLike[str], ids: list[int] | None = None) -> None:
        """All runs (or those in `ids`) in one long-form CSV, `LONG_COLUMNS`."""
        _write_csv(path, self._select(ids))

    def to_json(
        self, path: str | os.PathLike[str] | None = None, ids: list[int] | None = None
    ) -> list[dict[str, Any]]:
        """A JSON list of `Run.to_json` objects (written to `path` if given, and returned)."""
        out = [run.to_json() for run in self._select(ids)]
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(out, handle, indent=1, allow_nan=False, ensure_ascii=False)
        return out

    def to_dataframe(self, ids: list[int] | None = None) -> pandas.DataFrame:
        return _dataframe(self._select(ids))


_SESSION = RunRegistry()


def session_runs() -> RunRegistry:
    """The registry every new `Experiment` joins: all runs of this kernel session."""
    return _SESSION


__all__ = ["Event", "LONG_COLUMNS", "Run", "RunRegistry", "session_runs"]
