"""``python -m nbtrain``: train an experiment headless, with a progress bar and a table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from .challenges import PRESET_NAMES
from .config import ACTIVATIONS, FIELDS, INITS, OPTIMIZERS, Config
from .engine import Experiment

DEFAULTS = Config()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nbtrain",
        description="Train an nbtrain experiment on the embedded digits data, headless. "
        "Options left out take the preset's value, or nbtrain's default.",
    )
    add = parser.add_argument
    add("--preset", choices=PRESET_NAMES, help="start from a training-challenge preset")
    add("--epochs", type=int, help=f"default {DEFAULTS.epochs}")
    add("--hidden", type=int, nargs="+", help="hidden widths, input to output (default 128 64 32)")
    add("--activation", choices=ACTIVATIONS, help=f"default {DEFAULTS.activation}")
    add("--init", choices=INITS, help=f"default {DEFAULTS.init}")
    add("--optimizer", choices=OPTIMIZERS, help=f"default {DEFAULTS.optimizer}")
    add("--lr", type=float, help=f"default {DEFAULTS.lr}")
    add("--batch-size", type=int, help=f"default {DEFAULTS.batch_size}")
    add("--dropout", type=float, help="dropout rate (default off)")
    add("--batchnorm", action="store_true", default=None, help="batch norm on")
    add("--clip", type=float, help="max gradient norm (default no clipping)")
    add("--seed", type=int, help=f"default {DEFAULTS.seed}")
    add("--threads", type=int, help="torch threads (1: exactly repeatable)")
    add("--csv", metavar="PATH", help="write the history here as CSV")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    if "hidden" in given:
        given["hidden"] = tuple(given["hidden"])
    try:
        exp = Experiment(preset=args.preset, **given)
    except ValueError as exc:
        print(f"nbtrain: {exc}", file=sys.stderr)
        return 2

    print(exp)
    columns = [
        ("epoch", 5),
        ("step", 6),
        ("train_loss", 10),
        ("train_acc", 9),
        ("val_loss", 9),
        ("val_acc", 8),
    ]
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    bar = tqdm(
        total=exp.config.epochs * exp.steps_per_epoch,
        unit="step",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    bar.write(header)

    def on_epoch(e: Experiment, _: object) -> None:
        h = e.history
        bar.write(
            f"{e.epoch_count:>5} {e.step_count:>6} {h.last('train_loss', 'eval'):>10.4f} "
            f"{h.last('train_acc'):>9.4f} {h.last('val_loss'):>9.4f} {h.last('val_acc'):>8.4f}"
        )

    exp.on("step_completed", lambda e, _: bar.update(1))
    exp.on("epoch_completed", on_epoch)
    try:
        exp.run()
    except KeyboardInterrupt:
        bar.write("interrupted: the history so far is kept")
    finally:
        bar.close()

    summary = exp.summary()
    rate = exp.steps_per_second or 0.0
    print(
        f"{summary['state']} after {summary['step']} steps ({rate:,.0f} steps/s): "
        f"val_acc={summary['val_acc']:.4f} val_loss={summary['val_loss']:.4f} "
        f"train_acc={summary['train_acc']:.4f}"
    )
    for finding in exp.findings:
        print(f"finding: {finding.title}: {finding.evidence}")
    if exp.error:
        print(exp.error, file=sys.stderr)
    if args.csv:
        exp.history.to_csv(args.csv)
        print(f"history written to {args.csv}")
    return 0 if exp.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
