"""The IPython extension: ``%load_ext nbtrain`` registers the ``%nbtrain`` line magic.

``%nbtrain`` opens a panel and returns it (``dash = %nbtrain ...`` keeps it):

* ``%nbtrain``: the default experiment (digits, the funnel MLP);
* ``%nbtrain --preset vanishing``: a training challenge from `nbtrain.presets`;
* ``%nbtrain model train_loader val_loader``: variables of the notebook, by name: a model
  (an ``nn.Module``), then its training and validation data (tensors as ``(X, y)``, a
  Dataset or a DataLoader); or a single existing Experiment or ``nbtrain.watch`` Watcher;
* ``%nbtrain --help``: the options.

The arguments are parsed by argparse; a mistake is an IPython UsageError naming it.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from torch import nn

from .challenges import PRESET_NAMES
from .engine import Experiment
from .external import Watcher


class _HelpShown(Exception):
    """argparse printed --help and wants to exit; the magic just returns."""


class _Parser(argparse.ArgumentParser):
    # Note: argparse exits the process on --help and on errors; a magic must not.
    def exit(self, status: int = 0, message: str | None = None) -> None:
        if status:
            self.error(message or "invalid arguments")
        raise _HelpShown

    def error(self, message: str) -> None:
        from IPython.core.error import UsageError

        raise UsageError(f"%nbtrain: {message} (see %nbtrain --help)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="%nbtrain",
        description="Open an nbtrain panel for a preset or for variables of this notebook.",
        epilog="Examples: %nbtrain --preset vanishing | %nbtrain model train_loader "
        "val_loader --epochs 5 | dash = %nbtrain exp",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="variable",
        help="notebook variables: MODEL [TRAIN_DATA [VAL_DATA]], or one Experiment or Watcher",
    )
    parser.add_argument(
        "--preset", choices=list(PRESET_NAMES), help="a training challenge (nbtrain.presets)"
    )
    parser.add_argument("--loss", metavar="VAR", help="a variable holding the loss function")
    parser.add_argument(
        "--optimizer",
        metavar="NAME_OR_VAR",
        help="an optimizer name (sgd, momentum, adam, adamw, rmsprop) or a variable holding "
        "a factory f(params) or an Optimizer",
    )
    parser.add_argument("--task", choices=("classification", "regression"))
    parser.add_argument("--epochs", type=int, help="epochs per Start")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--batch-size", type=int, help="batch size (not for a DataLoader)")
    parser.add_argument("--device", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--seed", type=int)
    return parser


def _lookup(namespace: dict[str, Any], name: str) -> Any:
    from IPython.core.error import UsageError

    if name not in namespace:
        raise UsageError(f"%nbtrain: no variable {name!r} in this notebook")
    return namespace[name]


def build(line: str, namespace: dict[str, Any]) -> Experiment | Watcher | None:
    """What the magic opens a panel for; None after --help."""
    from IPython.core.error import UsageError

    try:
        args = make_parser().parse_args(shlex.split(line))
    except _HelpShown:
        return None
    values = [_lookup(namespace, name) for name in args.names]
    if len(values) == 1 and isinstance(values[0], (Experiment, Watcher)):
        if args.preset:
            raise UsageError("%nbtrain: --preset makes a new experiment; pass no variable")
        return values[0]

    config: dict[str, Any] = {
        key: value
        for key, value in (
            ("epochs", args.epochs),
            ("lr", args.lr),
            ("batch_size", args.batch_size),
            ("device", args.device),
            ("seed", args.seed),
        )
        if value is not None
    }
    if args.optimizer is not None:
        known = ("sgd", "momentum", "adam", "adamw", "rmsprop")
        config["optimizer"] = (
            args.optimizer if args.optimizer in known else _lookup(namespace, args.optimizer)
        )
    if args.loss is not None:
        config["loss_fn"] = _lookup(namespace, args.loss)
    if args.task is not None:
        config["task"] = args.task
    if args.preset:
        if values:
            raise UsageError("%nbtrain: pass either --preset or variables, not both")
        return Experiment(preset=args.preset, **config)
    if len(values) > 3:
        raise UsageError(
            f"%nbtrain: at most MODEL TRAIN_DATA VAL_DATA, got {len(values)} variables"
        )
    if values and not isinstance(values[0], nn.Module):
        raise UsageError(
            f"%nbtrain: the first variable must be a model (an nn.Module), "
            f"{args.names[0]!r} is a {type(values[0]).__name__}"
        )
    model, train_data, val_data = (*values, None, None, None)[:3]
    try:
        return Experiment(model=model, train_data=train_data, val_data=val_data, **config)
    except ValueError as exc:
        raise UsageError(f"%nbtrain: {exc}") from None


def register(ipython: Any) -> None:
    """Register ``%nbtrain`` on an IPython shell (what ``%load_ext nbtrain`` calls)."""

    def nbtrain_magic(line: str) -> Any:
        from .panel import Dashboard

        target = build(line, ipython.user_ns)
        return None if target is None else Dashboard(target)

    nbtrain_magic.__doc__ = make_parser().format_help()
    ipython.register_magic_function(nbtrain_magic, magic_kind="line", magic_name="nbtrain")
