"""An experiment's whole state, captured between two steps: for forks and checkpoints.

`capture()` reads everything a run needs to continue exactly as if it had never stopped:
the model's parameters and buffers, the optimizer's state (and a scheduler's, when the
experiment has one), the step, epoch and target counters, the RNG behind dropout, the data
order (the shuffling generator, the current permutation and the position in it), the
changes queued by ``set()`` and the history. It is all plain tensors, lists, dicts, numbers
and strings, so `save()` writes a file that ``torch.load(path, weights_only=True)`` reads
without unpickling any object; `load()` refuses any other file.

Data in a checkpoint: the digits set is re-created from its seed and split (it ships with
scikit-learn, so the file stays small); a user's arrays are stored, already split and
standardized, so a checkpoint loads on its own without the original arrays.

Between two steps: a running experiment is captured by the training thread itself at its
next step boundary (`Experiment.at_boundary`); a paused one is waiting at a boundary, and
an idle or ended one is between steps anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from .config import FIELDS, LIVE_KEYS, Config, check_value, make_config
from .data import Split
from .history import Event, History
from .runs import event_record, table_rows

if TYPE_CHECKING:
    from .engine import Experiment

FORMAT = "nbtrain-checkpoint"
VERSION = 1

#: What `Experiment.fork()` may change besides the live settings: how long and how often.
FORK_KEYS: tuple[str, ...] = (*LIVE_KEYS, "epochs", "eval_every")


def _plain(value: Any) -> Any:
    """An event detail in weights_only-loadable types (anything else becomes its repr)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# History as arrays


def history_state(history: History) -> dict[str, Any]:
    """A history as tensors and lists, through its public API."""
    out: dict[str, Any] = {}
    for table in ("step", "eval"):
        steps, names, values = table_rows(history, table)
        out[table] = {
            "steps": torch.from_numpy(steps.astype(np.int64)),
            "names": list(names),
            "values": torch.from_numpy(values.astype(np.float64)),
        }
    out["events"] = [event_record(e, _plain) for e in history.events]
    return out


def history_from_state(state: dict[str, Any], steps_per_epoch: int) -> History:
    """The inverse of `history_state` (see `runs.epoch_of` for the rows' epochs)."""
    from .runs import epoch_of

    history = History()
    for table in ("step", "eval"):
        part = state[table]
        names, values = part["names"], part["values"].numpy()
        for step, row in zip(part["steps"].tolist(), values, strict=True):
            keep = ~np.isnan(row)
            history.record_row(
                table,
                step,
                epoch_of(table, step, steps_per_epoch),
                [n for n, k in zip(names, keep, strict=True) if k],
                row[keep].tolist(),
            )
    for e in state["events"]:
        history.add_event(
            Event(e["step"], e["epoch"], e["kind"], e["label"], e["detail"], e["time"])
        )
    return history


# Capture and restore


def capture(exp: Experiment) -> dict[str, Any]:
    """Everything `restore` needs, copied (the experiment may train on right after).

    Call between two steps only: through `Experiment.at_boundary`, or on an experiment that
    is not running.
    """
    in_loop = exp.running  # inside the loop, dropout's generator is torch's global one
    scheduler = getattr(exp, "scheduler", None)
    data = exp.data
    if data.name == "digits":
        data_state: dict[str, Any] = {"kind": "digits", "fingerprint": _fingerprint(data)}
    else:
        data_state = {
            "kind": "arrays",
            "name": data.name,
            "classes": np.asarray(data.classes).tolist(),
            "x_train": data.x_train,
            "y_train": data.y_train,
            "x_val": data.x_val,
            "y_val": data.y_val,
            "mean": data.mean,
            "std": data.std,
            "image_shape": list(data.image_shape) if data.image_shape else None,
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": {name: _plain(getattr(exp.config, name)) for name in FIELDS},
        "run": {
            "name": exp.current_run.name,
            "config": {n: _plain(getattr(exp.current_run.config, n)) for n in FIELDS},
        },
        "data": data_state,
        "model": copy.deepcopy(exp.model.state_dict()),
        "optimizer": copy.deepcopy(exp.optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        "counters": {
            "step": exp.step_count,
            "epoch": exp.epoch_count,
            "target_epoch": exp.target_epoch,
            "state": exp.state,
        },
        "rng": {
            "torch": torch.get_rng_state() if in_loop else exp._rng_state.clone(),
            "order": exp._order.get_state(),
            "augment": exp._augment_rng.get_state(),
        },
        "early_stopping": {
            "best": exp.early_stopping.best,
            "best_step": exp.early_stopping.best_step,
            "wait": exp.early_stopping.wait,
            "best_state": copy.deepcopy(exp.early_stopping.best_state),
        },
        "order": {
            "perm": exp._perm.clone(),
            "bounds": torch.tensor(exp._bounds, dtype=torch.long).reshape(-1, 2),
            "pos": exp._pos,
        },
        "pending": _plain(exp.pending),
        "history": history_state(exp.history),
    }


def _fingerprint(data: Split) -> list[float]:
    """Sizes and sums of the split: re-created digits must be the data the run trained on."""
    x = data.x_train.double()
    weights = torch.arange(x.numel(), dtype=torch.float64).remainder(97).reshape(x.shape)
    return [
        float(len(data.y_train)),
        float(len(data.y_val)),
        (x * weights).sum().item(),
        data.y_train.double().sum().item(),
    ]


def _config(values: dict[str, Any]) -> Config:
    values = dict(values)
    values["hidden"] = tuple(values["hidden"])
    return make_config(values)


def restore(state: dict[str, Any], data: Split | None = None) -> Experiment:
    """A new experiment in the captured state, not running, in the session's registry.

    `data` is the split to train on; None takes the one the state names (digits re-created,
    or the stored arrays).
    """
    from .data import prepare
    from .engine import Experiment

    config = _config(state["config"])
    if data is None:
        stored = state["data"]
        if stored["kind"] == "digits":
            data = prepare(
                None,
                val_fraction=config.val_fraction,
                seed=config.seed,
                train_size=config.train_size,
                label_noise=config.label_noise,
            )
            if _fingerprint(data) != stored["fingerprint"]:
                raise ValueError(
                    "the digits data re-created for this checkpoint differs from the data it "
                    "was trained on (a different scikit-learn?); it cannot resume exactly"
                )
        else:
            data = Split(
                stored["x_train"],
                stored["y_train"],
                stored["x_val"],
                stored["y_val"],
                np.asarray(stored["classes"]),
                stored["name"],
                stored["mean"],
                stored["std"],
                tuple(stored["image_shape"]) if stored["image_shape"] else None,
            )
    # Building seeds torch's global generator: keep it for whoever is training now.
    with torch.random.fork_rng(devices=[]):
        exp = Experiment(data=data, **dataclasses.asdict(config))
    exp.model.load_state_dict(state["model"])
    exp.optimizer.load_state_dict(state["optimizer"])
    scheduler = getattr(exp, "scheduler", None)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])

    counters = state["counters"]
    exp.step_count, exp.epoch_count = counters["step"], counters["epoch"]
    exp._target_epoch = counters["target_epoch"]
    exp.state = "stopped" if counters["state"] in ("running", "paused") else counters["state"]
    exp._rng_state = state["rng"]["torch"].clone()
    exp._order.set_state(state["rng"]["order"])
    exp._augment_rng.set_state(state["rng"]["augment"])
    stopper = state["early_stopping"]
    exp.early_stopping.best, exp.early_stopping.best_step = stopper["best"], stopper["best_step"]
    exp.early_stopping.wait, exp.early_stopping.best_state = stopper["wait"], stopper["best_state"]
    exp._perm = state["order"]["perm"].clone()
    exp._bounds = [tuple(b) for b in state["order"]["bounds"].tolist()]
    exp._pos = state["order"]["pos"]
    exp.history = history_from_state(state["history"], exp.steps_per_epoch)
    return exp


# Fork


def fork(exp: Experiment, changes: dict[str, Any]) -> Experiment:
    """`Experiment.fork`: capture at the next boundary, build the copy, apply `changes`.

    Note: dropout draws from torch's global generator, so two experiments training at the
    same time (a fork started while its parent runs) share one random stream: each run is
    still valid, but neither is then reproducible bit for bit. Sequential runs are exact.
    """
    for name in changes:
        if name not in FORK_KEYS:
            where = "is fixed for a run" if name in FIELDS else "is not a parameter"
            raise ValueError(
                f"{name!r} {where}; fork() can change {', '.join(FORK_KEYS)} "
                "(other settings need a new run: reset() or a new Experiment)"
            )
    checked = {name: check_value(name, value) for name, value in changes.items()}

    def snapshot() -> tuple[Experiment, dict[str, Any]]:
        # Built here, between the parent's steps, so building seeds no generator it is using.
        state = capture(exp)
        return restore(state, data=exp.data), state

    child, state = exp.at_boundary(snapshot)
    parent_run = exp.current_run
    fixed = {k: v for k, v in checked.items() if k not in LIVE_KEYS}
    if fixed:
        child.config = child.config.replace(**fixed)
    exp.runs.adopt(
        child,
        parent=parent_run,
        fork_step=child.step_count + 1,
        config=parent_run.config.replace(**fixed),
    )
    live = {**state["pending"], **{k: v for k, v in checked.items() if k in LIVE_KEYS}}
    if live:
        child.set(**live)  # idle: applied now, marked at the first step the fork runs
    child.state = "idle"
    return child


# Files


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file all at once: into a temporary file beside it, then `os.replace`.

    A crash or a full disk mid-write leaves the old file (or none), never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(exp: Experiment, path: str | os.PathLike[str]) -> None:
    state = exp.at_boundary(lambda: capture(exp))
    atomic_write(path, lambda handle: torch.save(state, handle))


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's contents, loaded without unpickling any object, or a clear refusal."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {os.fspath(path)!r}: it holds objects that only arbitrary "
            "unpickling could rebuild (an nbtrain checkpoint holds tensors, numbers, strings, "
            f"lists and dicts only). torch said: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an nbtrain checkpoint (no {FORMAT!r} mark)")
    if state.get("version") != VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} is an nbtrain checkpoint of version {state.get('version')!r}; "
            f"this nbtrain reads version {VERSION}"
        )
    return state


def load(path: str | os.PathLike[str]) -> Experiment:
    state = read(path)
    exp = restore(state)
    exp.runs.adopt(exp, name=state["run"]["name"], config=_config(state["run"]["config"]))
    for name, value in state["pending"].items():
        exp.set(**{name: value})
    return exp
