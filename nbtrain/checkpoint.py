"""An experiment's whole state, captured between two steps: for forks and checkpoints.

`capture()` reads everything a run needs to continue exactly as if it had never stopped:
the model's parameters and buffers, the optimizer's state (and a scheduler's, when the
experiment has one), the step, epoch and target counters, the RNG behind dropout, the data
order (the shuffling generator, the current permutation and the position in it), the
changes queued by ``set()`` and the history. It is all plain tensors, lists, dicts, numbers
and strings, so `save()` writes a file that ``torch.load(path, weights_only=True)`` reads
without unpickling any object; `load()` refuses any other file.

Data in a checkpoint: the digits set is re-created from its seed and split (it ships with
scikit-learn, so the file stays small); a user's arrays and tensors (``data=(X, y)``,
``train_data=(X, y)``) are stored, already split and standardized, so such a checkpoint
loads without the original arrays.

Your own objects: a model you built, a Dataset or DataLoader, a loss function and an
optimizer (factory or instance) are code, not data, and a weights_only file cannot hold
code. The file holds their state (the model's weights and its weights when the experiment
was made, the optimizer's state, a DataLoader's shuffling generator) and lists them under
``"yours"``; `load()` then needs them again, as the same arguments `Experiment` takes, and
refuses with a ValueError naming each one that is missing, or a model whose parameters do
not match the saved ones.

Note: a Dataset or DataLoader's position inside an epoch lives in its iterator, which no
file holds; so an experiment reading one is captured at an epoch boundary (`save` and
`fork` of a running one wait for the end of the epoch; of a stopped or paused one
mid-epoch, they refuse).

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
from torch import nn

from .config import FIELDS, LIVE_KEYS, Config, check_value, make_config
from .data import Split
from .history import Event, History
from .runs import event_record, table_rows
from .sources import Loaders

if TYPE_CHECKING:
    from .engine import Experiment

FORMAT = "nbtrain-checkpoint"
VERSION = 1

#: What `Experiment.fork()` may change besides the live settings: how long and how often.
FORK_KEYS: tuple[str, ...] = (*LIVE_KEYS, "epochs", "eval_every")

#: The `Experiment` arguments a checkpoint cannot hold, which `load()` then needs again.
YOURS: tuple[str, ...] = ("model", "train_data", "val_data", "loss_fn", "optimizer")


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
    if isinstance(data, Loaders):
        if not between_epochs(exp):
            raise ValueError(
                f"this experiment reads {data.name}, and a checkpoint cannot hold a "
                f"DataLoader's position inside an epoch (batch {exp._pos} of "
                f"{len(exp._bounds)}); capture it at an epoch boundary: save() or fork() "
                "while it runs waits for one"
            )
        generator = data.train.generator
        data_state: dict[str, Any] = {
            "kind": "yours",
            "name": data.name,
            "task": data.task,
            "generator": generator.get_state() if generator is not None else None,
        }
    elif data.name == "digits":
        data_state = {"kind": "digits", "fingerprint": _fingerprint(data)}
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
            "task": data.task,
        }
    model_source = exp._model_source
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": {name: _plain(getattr(exp.config, name)) for name in FIELDS},
        "given": sorted(exp._given),
        "builtin_model": exp.builtin_model,
        "yours": yours(exp),
        "run": {
            "name": exp.current_run.name,
            "config": {n: _plain(getattr(exp.current_run.config, n)) for n in FIELDS},
        },
        "data": data_state,
        "model": copy.deepcopy(exp.model.state_dict()),
        # Your model's weights when the experiment was made: where reset() starts over.
        "model_initial": copy.deepcopy(model_source._initial) if model_source.module else None,
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


def between_epochs(exp: Experiment) -> bool:
    """True when no epoch is half-read: before the first batch of one, or after its last."""
    return exp._pos == 0 or exp._pos >= len(exp._bounds)


def _kind(value: Any) -> str:
    """What an object is, for a message: its class, or a function's name."""
    if isinstance(value, (nn.Module, torch.optim.Optimizer)) or not callable(value):
        return type(value).__name__
    return getattr(value, "__name__", type(value).__name__)


def yours(exp: Experiment) -> dict[str, str]:
    """The arguments `load` needs again (see YOURS), each with what it was, by class name.

    An optimizer you passed but have since switched away from (``set(optimizer="adam")``)
    is not listed: the loaded experiment trains on with the one in force, and
    ``optimizer="custom"`` is then unavailable to it.
    """
    _, train_data, val_data, _, loss_fn = exp._data_args
    out = {}
    if exp.builtin_model is None:
        out["model"] = type(exp.model).__name__
    if isinstance(exp.data, Loaders):
        out["train_data"] = _kind(train_data)
        if val_data is not None:
            out["val_data"] = _kind(val_data)
    if loss_fn is not None:
        out["loss_fn"] = _kind(loss_fn)
    if exp.config.optimizer == "custom":
        out["optimizer"] = type(exp.optimizer).__name__
    return out


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
    if values["optimizer"] == "custom":  # yours: no name a config checks
        return make_config({**values, "optimizer": "sgd"}).replace(optimizer="custom")
    return make_config(values)


def _stored_data(state: dict[str, Any], config: Config) -> Split:
    """The split a checkpoint names: the digits re-created, or the arrays it holds."""
    from .data import prepare

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
        return data
    return Split(
        stored["x_train"],
        stored["y_train"],
        stored["x_val"],
        stored["y_val"],
        np.asarray(stored["classes"]),
        stored["name"],
        stored["mean"],
        stored["std"],
        tuple(stored["image_shape"]) if stored["image_shape"] else None,
        stored.get("task", "classification"),
    )


def _check_model(saved: dict[str, torch.Tensor], model: nn.Module, saved_from: str) -> None:
    """Refuse a model whose parameters and buffers are not those the checkpoint holds."""
    given = model.state_dict()

    def some(names: list[str]) -> str:
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        return ", ".join(names[:4]) + more

    problems = []
    missing = [k for k in saved if k not in given]
    if missing:
        problems.append(f"the given model has no {some(missing)}")
    extra = [k for k in given if k not in saved]
    if extra:
        problems.append(f"the checkpoint has no {some(extra)}")
    shapes = [
        f"{k} is {tuple(given[k].shape)}, saved {tuple(saved[k].shape)}"
        for k in saved
        if k in given and given[k].shape != saved[k].shape
    ]
    if shapes:
        problems.append(some(shapes))
    if problems:
        raise ValueError(
            f"model={type(model).__name__} does not match the weights saved from "
            f"{saved_from}: {'; '.join(problems)}. Pass a model built the same way"
        )


def restore(state: dict[str, Any], objects: dict[str, Any] | None = None) -> Experiment:
    """A new experiment in the captured state, not running, in the session's registry.

    `objects` are the arguments the state lists under "yours" (see YOURS), and optionally
    ``data``: the split to train on; without it, the one the state names (digits
    re-created, or the stored arrays).
    """
    from .engine import Experiment

    objects = {k: v for k, v in (objects or {}).items() if v is not None}
    config = _config(state["config"])
    needed = state.get("yours", {})
    stored = state["data"]
    data = objects.pop("data", None)
    if data is None and stored["kind"] != "yours":
        data = _stored_data(state, config)
    if "model" in objects:
        _check_model(state["model"], objects["model"], needed.get("model", "the checkpoint"))

    settings = dataclasses.asdict(config)
    if "given" in state:
        # Only what the user chose, as the first time: the rest your model and optimizer
        # set again (dropout, batch norm, lr), and no check refuses a default that cannot
        # act on the model (activation on a CNN). The whole config is put back after.
        settings = {k: v for k, v in settings.items() if k in state["given"]}
    if config.optimizer == "custom":
        settings["optimizer"] = objects.pop("optimizer")
    if stored["kind"] == "yours":
        objects["task"] = stored["task"]
    if "model" not in objects:
        objects["model"] = state.get("builtin_model") or "mlp"  # files before "cnn" was kept
    # Building seeds torch's global generator: keep it for whoever is training now.
    with torch.random.fork_rng(devices=[]):
        exp = Experiment(data=data, **objects, **settings)
    if "given" in state:
        exp.config, exp._given = config, set(state["given"])
    exp.model.load_state_dict(state["model"])
    if state.get("model_initial") is not None:
        exp._model_source._initial = copy.deepcopy(state["model_initial"])
    _load_optimizer(exp, state)
    scheduler = getattr(exp, "scheduler", None)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator = stored.get("generator")
    if generator is not None:
        if exp.data.train.generator is None:
            raise ValueError(
                "train_data was saved as a DataLoader with a generator= that shuffles it, "
                "and the one given has none; build it the same way"
            )
        exp.data.train.generator.set_state(generator)

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


def _load_optimizer(exp: Experiment, state: dict[str, Any]) -> None:
    saved = state.get("yours", {}).get("optimizer")
    made = type(exp.optimizer).__name__
    if saved is not None and made != saved:
        raise ValueError(f"optimizer= makes a {made}, and the checkpoint holds a {saved}'s state")
    try:
        exp.optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ValueError(
            f"the optimizer's saved state does not fit this {made} ({exc}); build it over "
            "all of model.parameters(), as the saved one was"
        ) from None


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
        child = restore(state, _copies(exp))
        source = exp._optimizer_source
        if source is not None and source.instance is not None and child._optimizer_source:
            child._optimizer_source._initial = copy.deepcopy(source._initial)
        return child, state

    child, state = between_steps(exp, snapshot)
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


def _copies(exp: Experiment) -> dict[str, Any]:
    """What a fork of `exp` is built from: its model and optimizer copied, the rest shared.

    Note: the loss function, and a DataLoader you passed, are shared with the parent, not
    copied; a DataLoader's shuffling generator is then drawn from by both.
    """
    _, train_data, val_data, _, loss_fn = exp._data_args
    objects: dict[str, Any] = {"loss_fn": loss_fn}
    if isinstance(exp.data, Loaders):
        objects.update(train_data=train_data, val_data=val_data)
    else:
        objects["data"] = exp.data
    source = exp._optimizer_source
    custom = exp.config.optimizer == "custom" and source is not None
    if exp.builtin_model is None:
        # Copied together, so the optimizer's copy holds the model copy's parameters. A
        # batch norm bypassed by its switch is restored first: the copy gets no stale hook.
        switches = exp.switches
        bypassed = bool(switches.batchnorms) and not switches.batchnorm_on
        if bypassed:
            switches.set_batchnorm(True)
        try:
            model, optimizer = copy.deepcopy((exp.model, exp.optimizer))
        except Exception as exc:
            raise ValueError(
                f"fork() copies your model, and copy.deepcopy of {type(exp.model).__name__} "
                f"failed: {exc!r:.200}"
            ) from exc
        finally:
            if bypassed:
                switches.set_batchnorm(False)
        objects["model"] = model
        if custom:
            objects["optimizer"] = optimizer if source.instance is not None else source.factory
    elif custom:
        objects["optimizer"] = source.factory
    return objects


def between_steps(exp: Experiment, fn: Callable[[], Any]) -> Any:
    """`exp.at_boundary(fn)`; for an experiment reading loaders, at an epoch boundary.

    A running one is waited for, step boundary by step boundary, until its epoch ends; a
    paused or stopped one mid-epoch is refused by `capture` (see the module docstring).
    """
    if not isinstance(exp.data, Loaders):
        return exp.at_boundary(fn)
    box: list[Any] = []

    def at_epoch_end() -> bool:
        if between_epochs(exp) or not (exp.running and exp.state == "running"):
            box.append(fn())
            return True
        return False

    while not exp.at_boundary(at_epoch_end):
        pass
    return box[0]


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
    state = between_steps(exp, lambda: capture(exp))
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


#: How a message names each of YOURS.
_WORDS = {
    "model": "model",
    "train_data": "train_data",
    "val_data": "val_data",
    "loss_fn": "loss function",
    "optimizer": "optimizer",
}


def _check_objects(state: dict[str, Any], objects: dict[str, Any]) -> None:
    """Refuse a load that lacks one of the objects the checkpoint needs, or brings another."""
    needed = state.get("yours", {})
    given = [k for k, v in objects.items() if v is not None]
    missing = [k for k in needed if k not in given]
    if missing:
        names = [f"{_WORDS[k]} ({needed[k]})" for k in missing]
        what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        args = ", ".join(f"{k}=..." for k in missing)
        them = "it" if len(missing) == 1 else "them"
        raise ValueError(
            f"this checkpoint was saved from your own {what}; pass {them}: "
            f"Experiment.load(path, {args}) (a checkpoint holds state, never code)"
        )
    for name in given:
        if name not in needed:
            if name == "model":
                why = f"nbtrain's built-in model ({state.get('builtin_model') or 'mlp'})"
            elif name in ("train_data", "val_data"):
                kind = state["data"]["kind"]
                why = "the digits (re-created)" if kind == "digits" else "arrays it holds"
            elif name == "loss_fn":
                why = "the default loss"
            else:
                why = f"the built-in optimizer {state['config']['optimizer']!r}"
            raise ValueError(
                f"{name}= is not needed: this checkpoint was saved from {why}; load it "
                f"without {name}="
            )


def objects_from(path: str | os.PathLike[str], exp: Experiment) -> dict[str, Any]:
    """What the checkpoint at `path` needs of your objects, taken from `exp`: copies of its
    model and optimizer, its data and loss (the panel's Load passes the experiment it drives)."""
    needed = read(path).get("yours", {})
    if not needed:
        return {}
    mine = _copies(exp)
    return {name: mine[name] for name in needed if name in mine}


def load(path: str | os.PathLike[str], objects: dict[str, Any] | None = None) -> Experiment:
    """`Experiment.load`: the checkpoint at `path`, rebuilt with `objects` (see YOURS)."""
    state = read(path)
    objects = objects or {}
    _check_objects(state, objects)
    exp = restore(state, objects)
    exp.runs.adopt(exp, name=state["run"]["name"], config=_config(state["run"]["config"]))
    for name, value in state["pending"].items():
        exp.set(**{name: value})
    return exp
