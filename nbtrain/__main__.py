"""``python -m nbtrain``: train an experiment headless, with a progress bar and a table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from .config import ACTIVATIONS, INITS, OPTIMIZERS, Config
from .engine import Experiment

DEFAULTS = Config()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nbtrain",
        description="Train an nbtrain experiment on the embedded digits data, headless.",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(DEFAULTS.hidden),
        help="hidden widths, input to output (default: %(default)s)",
    )
    parser.add_argument("--activation", choices=ACTIVATIONS, default=DEFAULTS.activation)
    parser.add_argument("--init", choices=INITS, default=DEFAULTS.init)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--dropout", type=float, default=DEFAULTS.dropout)
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--clip", type=float, default=None, help="max gradient norm")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: exact)")
    parser.add_argument("--csv", metavar="PATH", help="write the history here as CSV")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        exp = Experiment(
            epochs=args.epochs,
            hidden=tuple(args.hidden),
            activation=args.activation,
            init=args.init,
            optimizer=args.optimizer,
            lr=args.lr,
            batch_size=args.batch_size,
            dropout=args.dropout,
            batchnorm=args.batchnorm,
            clip=args.clip,
            seed=args.seed,
            threads=args.threads,
        )
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
        total=args.epochs * exp.steps_per_epoch,
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
    if exp.error:
        print(exp.error, file=sys.stderr)
    if args.csv:
        exp.history.to_csv(args.csv)
        print(f"history written to {args.csv}")
    return 0 if exp.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
