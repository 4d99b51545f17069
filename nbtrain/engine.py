"""The training engine: an experiment that trains in a worker thread and takes changes live.

Pure PyTorch: nothing here imports ipywidgets or bqplot, so the engine runs in scripts, tests
and CI as it does under the panel.

Counting: ``step`` is the number of training steps completed and ``epoch`` the number of
epochs completed, both starting at 0; history rows for step N are recorded after the N-th step.

Cost: a step's row (loss and gradient statistics) stays on the device in a small buffer and
reaches the history in batches: when the buffer is full (`ROW_BUFFER` steps), every
`FLUSH_SECONDS` at the latest, and at every boundary a reader can observe (an evaluation, a
pause, a single step, the end of the run). So the history may trail `step_count` by up to
50 ms while a run goes, and a GPU run pays one host transfer per batch instead of one per step.
An observer of "step_completed" is the exception: it may read the history, so with one
attached every step is flushed before it is called.

A step refused as non-finite (the run then diverged) counts too, though no update was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .challenges import preset_config
from .config import LIVE_KEYS, Config, check_changes, check_value, make_config
from .data import Split, prepare
from .diagnosis import CHECK_EVERY, Diagnosis, Finding
from .gradients import GradientProbe
from .history import Event, History
from .internals import Internals, measure_internals
from .model import FunnelMLP, initialize
from .optim import OWNS_LR, WEIGHT_DECAY_STYLE, make_optimizer, make_scheduler
from .regularization import EarlyStopping, l1_penalty, shift_and_noise
from .runs import Run, RunRegistry, session_runs

log = logging.getLogger(__name__)

ROW_BUFFER = 256  # steps whose rows wait on the device before reaching the history
FLUSH_SECONDS = 0.05  # the longest a finished step waits before it is in the history

State = Literal["idle", "running", "paused", "diverged", "finished", "stopped", "failed"]

# States in which a run is going but waiting at a step boundary for resume(), step() or stop().
WAITING: tuple[str, ...] = ("paused", "diverged")

# What observers can attach to with `Experiment.on()`. Callbacks run in the training thread,
# between steps, and receive the experiment and a payload (the Event, for "change_applied").
OBSERVABLE = (
    "run_started",
    "step_completed",
    "evaluated",
    "epoch_completed",
    "change_applied",
    "run_ended",
)

Callback = Callable[["Experiment", Any], None]


def _format(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return "off" if value == 0 else f"{value:g}"
    return str(value)


class Experiment:
    """A network, its data and optimizer, and the controls to train it live.

    >>> exp = Experiment(epochs=1)
    >>> exp.run().last("val_acc") > 0.5
    True
    """

    def __init__(self, data: Any = None, *, preset: str | None = None, **config: Any) -> None:
        if preset is not None:
            config = {**preset_config(preset), **config}
        self.preset = preset
        self.config: Config = make_config(config)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self._data_arg = data
        self.data: Split = self._prepare(self.config)
        self._check_fits(
            self.config,
            {
                "skip": self.config.skip,
                "augment": self.config.augment,
                "batchnorm": self.config.batchnorm,
            },
        )
        self._internals_wanted = False
        self.internals: Internals | None = None
        self._cond = threading.Condition(threading.RLock())
        self._observers: dict[str, list[Callback]] = defaultdict(list)
        self._worker: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None  # the worker, or run()'s caller
        self._loop_active = False
        self._stop_requested = False
        self._pause_requested = False
        self._single_steps = 0
        self._pending: dict[str, Any] = {}
        self._boundary_calls: list[Callable[[], None]] = []  # see at_boundary()
        self._loop_thread: threading.Thread | None = None
        self.runs: RunRegistry = session_runs()  # every run of the session (nbtrain.runs)
        self.current_run: Run | None = None
        self._build()

    def _prepare(self, cfg: Config) -> Split:
        return prepare(
            self._data_arg,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            train_size=cfg.train_size,
            label_noise=cfg.label_noise,
        )

    def _build(self) -> None:
        """A fresh model, optimizer and history from the seed and the current config."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model: nn.Module = FunnelMLP(
            self.data.n_features, cfg.hidden, self.data.n_classes, cfg.activation
        )
        initialize(self.model, cfg.init, cfg.activation, cfg.init_std)
        self.model.set_dropout(cfg.dropout)
        self.model.set_batchnorm(cfg.batchnorm)
        self.model.set_skip(cfg.skip)
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = self._make_optimizer()
        self.scheduler: Any = None  # made when a run begins; see _schedule()
        self._schedule_left = 0
        self.early_stopping = EarlyStopping()
        self._early_stop_hit = False
        self._augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.probe = GradientProbe(self.model, self.model.named_layers())
        # Batch norm's running statistics, saved before each step while batch norm is on, so
        # a step refused as non-finite leaves no trace in them either.
        self._buffers = [b for b in self.model.buffers()]
        self._saved_buffers = [b.clone() for b in self._buffers]
        self._step_columns = ["train_loss", "lr", *self.probe.columns]
        self._rows: torch.Tensor | None = None  # the device buffer; made at the first step
        self._row_views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._row_meta: list[tuple[int, int, float]] = []  # (step, epoch, lr) per buffered row
        self._flushed_at = time.perf_counter()
        self._next_step_at = 0.0  # the pace's clock (see `speed`)
        self._rng_state = torch.get_rng_state()  # dropout's draws continue across start/stop
        self._order = torch.Generator().manual_seed(cfg.seed)  # shuffling only
        self._perm = torch.zeros(0, dtype=torch.long)
        self._bounds: list[tuple[int, int]] = []
        self._pos = 0
        self.history = History()
        self.diagnosis = Diagnosis()
        self.step_count = 0
        self.epoch_count = 0
        self._target_epoch = 0
        self.state: State = "idle"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._run_started_at: float | None = None
        self._run_ended_at: float | None = None
        self._run_start_step = 0
        self.current_run = self.runs.begin(self)

    def _make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        cfg = self.config
        return make_optimizer(
            cfg.optimizer,
            self.model.parameters(),
            lr=cfg.lr if lr is None else lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )

    def _schedule(self) -> None:
        """(Re)make the learning-rate schedule over what is left of the current run.

        Each schedule starts from the base rate `config.lr`, so switching one on mid-run, or
        starting a new run, begins at the rate the user chose.
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr
            group.pop("initial_lr", None)  # a fresh scheduler on a used optimizer starts over
        left = max(self._target_epoch - self.epoch_count, 1) * self.steps_per_epoch - self._pos
        self._schedule_left = max(left, 1)
        self.scheduler = make_scheduler(
            cfg.schedule, self.optimizer, total_steps=self._schedule_left, monitor=cfg.monitor
        )

    @property
    def weight_decay_style(self) -> str:
        """How weight_decay (L2) is applied by the optimizer in force."""
        return WEIGHT_DECAY_STYLE[self.config.optimizer]

    # Observers

    def on(self, name: str, callback: Callback) -> Callback:
        """Call `callback(experiment, payload)` on each `name` event; returns the callback."""
        if name not in OBSERVABLE:
            raise ValueError(f"event must be one of {', '.join(OBSERVABLE)}, got {name!r}")
        self._observers[name].append(callback)
        return callback

    def off(self, name: str, callback: Callback) -> None:
        self._observers[name].remove(callback)

    def _emit(self, name: str, payload: Any = None) -> None:
        # Note: an observer's exception is not caught here; it fails the run, visibly.
        for callback in list(self._observers.get(name, ())):  # on()/off() may run meanwhile
            callback(self, payload)

    # Live settings

    @property
    def in_force(self) -> dict[str, Any]:
        """The live settings the next step will run with (pending changes not included)."""
        return {name: getattr(self.config, name) for name in LIVE_KEYS}

    @property
    def pending(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._pending)

    def set(self, **changes: Any) -> None:
        """Queue live changes (``dropout``, ``batchnorm``, ``clip``, ``lr``), or set the pace.

        They are applied together at the next step boundary, never inside a step, and each
        becomes a "change" event whose step is the first step that runs with it. When no
        run is going, that boundary is now.

        ``speed`` (steps per second, None for full speed) is different: it changes how fast
        the run goes, not what it computes, so it takes effect at once and is no event.
        """
        if "speed" in changes:
            speed = check_value("speed", changes.pop("speed"))
            with self._cond:
                self.config = self.config.replace(speed=speed)
                self._next_step_at = 0.0
                self._cond.notify_all()  # a step waiting on the old pace goes on the new one
            if not changes:
                return
        checked = check_changes(changes, self.config)
        with self._cond:
            after = {**dataclasses.asdict(self.config), **self._pending, **checked}
            self._check_fits(after, checked)
            if "lr" in checked and after["schedule"] in OWNS_LR:
                raise ValueError(
                    f"lr is set by the {after['schedule']!r} schedule at every step; "
                    f"set(schedule='none') or 'plateau' first to change it by hand"
                )
            self._pending.update(checked)
            if not self._loop_active:
                self._apply_pending()

    def _check_fits(self, after: Any, changed: dict[str, Any]) -> None:
        """Refuse settings that are valid alone but not for this model, data or schedule."""
        get = after.get if isinstance(after, dict) else lambda k: getattr(after, k)
        if changed.get("skip") and not self._residual_blocks(get("hidden")):
            raise ValueError(
                f"skip=True needs hidden blocks of equal input and output width, and "
                f"hidden={get('hidden')} has none; use e.g. hidden=(64, 64, 64)"
            )
        n_train = len(self.data.y_train)
        if changed.get("batchnorm") and n_train < 2:
            raise ValueError(
                f"batchnorm=True needs at least 2 training samples (batch norm cannot "
                f"normalize a single sample), got a training split of {n_train}"
            )
        if changed.get("augment") and self.data.image_shape is None:
            raise ValueError(
                "augment=True shifts image pixels, and this data has no image shape; "
                "it works on the embedded digits"
            )

    def _residual_blocks(self, hidden: tuple[int, ...]) -> int:
        widths = [self.data.n_features, *hidden]
        return sum(a == b for a, b in zip(widths, widths[1:]))

    def _apply_pending(self) -> None:
        with self._cond:
            changes, self._pending = self._pending, {}
            mid_epoch = 0 < self._pos < len(self._bounds)
            if "batch_size" in changes and mid_epoch:
                # Batch size changes the epoch's batches: it waits for the epoch boundary.
                self._pending["batch_size"] = changes.pop("batch_size")
        for name, value in changes.items():
            old = getattr(self.config, name)
            if old == value:
                continue
            self.config = self.config.replace(**{name: value})
            note = self._apply_one(name, value)
            label = f"{name} {_format(old)}→{_format(value)}"
            detail = {"name": name, "old": old, "new": value}
            if note:
                detail["note"] = note
            event = self._event("change", label, detail)
            self._emit("change_applied", event)

    def _apply_one(self, name: str, value: Any) -> str | None:
        """Make one live change take effect; returns a note for the event, if any."""
        if name == "dropout":
            self.model.set_dropout(value)
        elif name == "batchnorm":
            self.model.set_batchnorm(value)
        elif name == "activation":
            self.model.set_activation(value)
        elif name == "skip":
            self.model.set_skip(value)
        elif name == "lr":
            for group in self.optimizer.param_groups:
                group["lr"] = value
        elif name == "weight_decay":
            for group in self.optimizer.param_groups:
                group["weight_decay"] = value
            return self.weight_decay_style
        elif name == "optimizer":
            current = self.optimizer.param_groups[0]["lr"]
            self.optimizer = self._make_optimizer(lr=current)
            if self.scheduler is not None:
                self._schedule()
            return "optimizer state reset (moments start from zero)"
        elif name == "schedule":
            self._schedule()
            return f"over the {self._schedule_left} steps left in this run"
        return None

    def _event(self, kind: str, label: str, detail: dict[str, Any] | None = None) -> Event:
        """Record an event at the boundary before the next step."""
        event = Event(self.step_count + 1, self.epoch_count + 1, kind, label, detail or {})
        self.history.add_event(event)
        return event

    # Controls

    def start(self, epochs: int | None = None) -> None:
        """Train in a background thread for `epochs` more epochs (default: config.epochs).

        Returns at once, so the notebook stays free. While a run is going, a second call
        does not start a second worker; on a paused run it resumes.
        """
        epochs = self._check_epochs(epochs)
        with self._cond:
            if self._loop_active:
                self.resume()
                return
        self._join_previous()
        with self._cond:
            if self._loop_active:  # another thread started a run meanwhile
                self.resume()
                return
            self._begin(epochs)
            self._launch()

    def _launch(self) -> None:
        self._worker = threading.Thread(target=self._loop, name="nbtrain-training", daemon=True)
        self._worker.start()

    def _join_previous(self) -> None:
        """Let a worker that has ended its run finish its last observers before a new one.

        Called without the lock held: those observers (the panel's refresh) may need it.
        """
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(30.0)
            if worker.is_alive():
                raise RuntimeError("the last run's run_ended observers are still busy after 30 s")

    def run(self, epochs: int | None = None) -> History:
        """Train `epochs` more epochs in this thread and return the history when done.

        For scripts and notebooks checked by nbval. Ctrl-C (KeyboardInterrupt) stops the run
        cleanly, keeping the history and the model, and is then raised again: on the main
        thread the first Ctrl-C asks for a stop at the next step boundary (a second one
        interrupts at once); elsewhere, or raised by user code, it ends the run where it lands.
        """
        epochs = self._check_epochs(epochs)
        self._refuse_if_running()
        self._join_previous()
        with self._cond:
            self._refuse_if_running()
            self._begin(epochs)
            self._worker = None
        with self._ctrl_c_stops() as interrupted:
            self._loop()
        if interrupted:
            raise KeyboardInterrupt
        return self.history

    def _refuse_if_running(self) -> None:
        if self._loop_active:
            raise RuntimeError(
                "a run is already going in the background; use wait() or stop() first"
            )

    @contextlib.contextmanager
    def _ctrl_c_stops(self) -> Iterator[list[bool]]:
        """While run() blocks the main thread, turn the first SIGINT into a clean stop.

        A KeyboardInterrupt raised wherever the interpreter happens to be can land inside
        the bookkeeping that ends a run; a stop request lands at a step boundary instead.
        """
        interrupted: list[bool] = []
        if threading.current_thread() is not threading.main_thread():
            yield interrupted
            return
        previous = signal.getsignal(signal.SIGINT)

        def stop_at_boundary(signum: int, frame: Any) -> None:
            interrupted.append(True)
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once
            with self._cond:  # an RLock: fine even if this thread holds it already
                self._stop_requested = True
                self._cond.notify_all()  # a run paused from another thread stops too

        signal.signal(signal.SIGINT, stop_at_boundary)
        try:
            yield interrupted
        finally:
            if signal.getsignal(signal.SIGINT) is stop_at_boundary:
                signal.signal(signal.SIGINT, previous)

    def _check_epochs(self, epochs: int | None) -> int:
        if epochs is None:
            return self.config.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        return epochs

    def _begin(self, epochs: int) -> None:
        self._loop_active = True
        self._stop_requested = False
        self._early_stop_hit = False
        self._target_epoch = self.epoch_count + epochs
        self.error = None
        self.exception = None
        if self.config.schedule != "none":
            self._schedule()

    def pause(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Pause at the next step boundary; with `wait`, return once the run is paused."""
        with self._cond:
            if not self._loop_active:
                return
            self._pause_requested = True
            self._cond.notify_all()
            if wait and threading.current_thread() is not self._loop_thread:
                self._cond.wait_for(
                    lambda: self.state in WAITING or not self._loop_active, timeout
                )

    def resume(self) -> None:
        """Continue a paused or diverged run (with whatever set() changed meanwhile)."""
        with self._cond:
            self._pause_requested = False
            self._single_steps = 0
            self._cond.notify_all()

    def step(self, timeout: float = 30.0) -> None:
        """Run exactly one step and stay paused (starting a paused run if none is going).

        Returns once the step is done, refused as diverged, or the run has ended.
        """
        if self._loop_active and threading.current_thread() is self._loop_thread:
            raise RuntimeError("step() cannot run inside the training thread (an observer)")
        with self._cond:
            if self._loop_active and not self._pause_requested:
                raise RuntimeError("step() works on a paused run; pause() first")
            launch = not self._loop_active
        if launch:
            self._join_previous()
        with self._cond:
            if self._loop_active and not self._pause_requested:
                raise RuntimeError("step() works on a paused run; pause() first")
            if self._loop_active:  # after pause(wait=False) the step in flight ends first
                paused = lambda: self.state in WAITING or not self._loop_active  # noqa: E731
                self._cond.wait_for(paused, timeout)
            target = self.step_count + 1  # a step refused as non-finite counts too
            if self._loop_active:
                self._single_steps += 1
                self._cond.notify_all()
            else:
                self._pause_requested = True
                self._single_steps = 1
                self._begin(self.config.epochs)
                self._launch()
            self._cond.wait_for(
                lambda: self.step_count >= target or not self._loop_active, timeout
            )

    def stop(self, timeout: float = 30.0) -> None:
        """End the run at the next step boundary and wait for the worker to finish."""
        with self._cond:
            if not self._loop_active:
                return
            self._stop_requested = True
            self._cond.notify_all()
        self._join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background run ends; True if it has ended."""
        return self._join(timeout)

    def _join(self, timeout: float | None) -> bool:
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            return not worker.is_alive()
        if self._loop_thread is threading.current_thread():
            return not self._loop_active  # an observer cannot wait for its own run
        with self._cond:  # a blocking run() going in another thread
            return self._cond.wait_for(lambda: not self._loop_active, timeout)

    def reset(self) -> None:
        """Stop any run and start over: same seed, current settings, empty history."""
        if self._loop_active and threading.current_thread() is self._loop_thread:
            raise RuntimeError("reset() cannot run inside the training thread (an observer)")
        while True:
            self.stop()
            if not self._join(30.0):
                raise RuntimeError("the training thread did not stop within 30 s; not resetting")
            with self._cond:
                if self._loop_active:  # another thread started a run meanwhile: stop it too
                    continue
                self._pause_requested = False
                self._single_steps = 0
                self._build()
                return

    def restart(self, **changes: Any) -> None:
        """Start over with changes to anything, architecture and initialization included.

        A change of depth, widths, initialization, seed or split cannot be made to a network
        that is training, so it is a new run: the model is rebuilt, the history starts empty.
        """
        before = self.config
        config = make_config({**dataclasses.asdict(before), **changes})
        self.stop()
        with self._cond:
            split_keys = ("seed", "val_fraction", "train_size", "label_noise")
            if any(getattr(config, k) != getattr(before, k) for k in split_keys):
                self.data = self._prepare(config)
            self._check_fits(config, changes)
            self.config = config
            self._pause_requested = False
            self._single_steps = 0
            self._pending.clear()
            self._build()
            changed = {
                k: v for k, v in changes.items() if getattr(before, k) != getattr(config, k)
            }
            if changed:
                text = ", ".join(f"{k}={_format(getattr(config, k))}" for k in changed)
                self._event("restart", f"restart: {text}", changed)

    def extend(self, epochs: int) -> None:
        """Train `epochs` more: the run going now trains longer, or a new run starts."""
        epochs = self._check_epochs(epochs)
        with self._cond:
            if self._loop_active:
                self._target_epoch += epochs
                self._event(
                    "change",
                    f"train {epochs} epochs longer",
                    {
                        "name": "epochs",
                        "old": self._target_epoch - epochs,
                        "new": self._target_epoch,
                    },
                )
                return
        self.start(epochs)

    def load_preset(self, name: str, seed: int | None = None) -> None:
        """Start over as the preset `name` (a new run), everything else at its default."""
        config = preset_config(name)
        config["seed"] = self.config.seed if seed is None else seed
        self.stop()
        defaults = dataclasses.asdict(Config())
        self.restart(**{**defaults, **config})
        self.preset = name

    @property
    def findings(self) -> list[Finding]:
        """The challenges the detectors see now (see `nbtrain.diagnosis`)."""
        return list(self.diagnosis.standing.values())

    @property
    def running(self) -> bool:
        return self._loop_active

    @property
    def steps_per_second(self) -> float | None:
        """Average rate of the current (or last) run, pauses included; None before a run."""
        if self._run_started_at is None:
            return None
        elapsed = (self._run_ended_at or time.perf_counter()) - self._run_started_at
        steps = self.step_count - self._run_start_step
        return steps / elapsed if elapsed > 0 and steps else None

    @property
    def progress(self) -> float:
        """Fraction of the current run's epochs done, 0 to 1 (1 once it has finished)."""
        if self._target_epoch == 0:
            return 0.0
        within = (
            self._pos / len(self._bounds) if self._bounds and self._pos < len(self._bounds) else 0
        )
        return min(1.0, (self.epoch_count + within) / self._target_epoch)

    @property
    def target_epoch(self) -> int:
        """The epoch count the current (or last) run trains up to."""
        return self._target_epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batch_bounds())

    # The loop

    def _loop(self) -> None:
        self._loop_thread = threading.current_thread()
        self._run_started_at, self._run_ended_at = time.perf_counter(), None
        self._run_start_step = self.step_count
        self.state = "running"
        self._event("started", "start")
        outcome: State = "stopped"
        interrupted = False
        torch.set_rng_state(self._rng_state)
        try:
            self._emit("run_started")
            if self.history.n_evals == 0:
                self._evaluate()
            while self.epoch_count < self._target_epoch:
                if not self._take_turn():
                    break
                applied = self._train_step()
                if not applied and self._worker is None:
                    outcome = "diverged"  # run() blocks its caller: nobody could resume
                    break
                if self.step_count % CHECK_EVERY == 0:  # the detectors read the history
                    self._flush()
                    self.diagnosis.check(self)
                if self._pos >= len(self._bounds):
                    self.epoch_count += 1
                    self._evaluate()
                    self._emit("epoch_completed")
                elif (
                    applied
                    and self.config.eval_every
                    and self.step_count % self.config.eval_every == 0
                ):
                    self._evaluate()
                if self._early_stop_hit:
                    outcome = "finished"
                    break
            else:
                outcome = "finished"
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # a user's model, data or observer failed: show, don't die
            outcome = "failed"
            self.exception = exc
            self.error = traceback.format_exc()
            log.error("run failed at step %d:\n%s", self.step_count, self.error)
        finally:
            self._flush()
            self._end_run(outcome)
        if interrupted:
            raise KeyboardInterrupt

    def _end_run(self, outcome: State) -> None:
        """Record the outcome, then tell observers; the event lands before any new run's."""
        self._rng_state = torch.get_rng_state()
        self._run_ended_at = time.perf_counter()
        self._restore_best()
        with self._cond:
            if outcome not in ("failed", "diverged"):
                self.error = None  # a divergence message is moot once the run is stopped
            self._pause_requested = False
            self._single_steps = 0
            self.state = outcome
            if outcome != "diverged":  # that event is recorded already, where it happened
                label = outcome if outcome != "failed" else f"failed: {self.exception!r:.60}"
                self._event(outcome, label)
            self._apply_pending()  # a change that arrived as the run ended: now is a boundary
            self._loop_active = False
            self._cond.notify_all()
        try:
            self._emit("run_ended", outcome)
        except Exception as exc:  # the run is over, but its last observer failed: show it
            self.state, self.exception = "failed", exc
            self.error = traceback.format_exc()
            log.error("a run_ended observer failed:\n%s", self.error)

    def _restore_best(self) -> None:
        """With early stopping and restore_best, every run ends on its best weights."""
        stopper = self.early_stopping
        if self.config.patience is None or not self.config.restore_best:
            return
        if stopper.best_state is None or stopper.best_step == self.step_count:
            return
        self.model.load_state_dict(stopper.best_state)
        label = f"restored best weights from step {stopper.best_step}"
        self._event("restored", label, {"best_step": stopper.best_step, "best": stopper.best})

    def _take_turn(self) -> bool:
        """At a step boundary: honour stop, pause and the pace; False means end the run."""
        if self._boundary_calls:
            self._run_boundary_calls()
        if self.config.speed is not None:
            self._pace()
        if not (self._pause_requested or self._stop_requested) and self.state == "running":
            return True  # the common case, without the lock
        # Note: a paused run resumed while its single step was still finishing arrives here
        # with no pause requested; it must still become "running" and record the resume.
        with self._cond:
            while True:
                if self._boundary_calls:
                    self._run_boundary_calls()
                if self._stop_requested:
                    return False
                if not self._pause_requested:
                    if self.state in WAITING:
                        self.state, self.error = "running", None
                        self._event("resumed", "resume")
                    return True
                if self.state == "running":
                    self._flush()  # a reader may look at a paused run: show every step
                    self.state = "paused"
                    self._event("paused", "pause")
                    self._cond.notify_all()
                if self._single_steps > 0:
                    self._single_steps -= 1
                    if self.state == "diverged":  # one step to try the new settings
                        self.state, self.error = "paused", None
                    return True
                self._cond.wait()

    def _run_boundary_calls(self) -> None:
        with self._cond:
            calls, self._boundary_calls = self._boundary_calls, []
            for call in calls:
                call()  # never raises: at_boundary() hands its outcome to the caller
            self._cond.notify_all()

    def _pace(self) -> None:
        """Wait until the next step is due at `config.speed` steps a second.

        Only time passes here: the step that follows is the one that would have run at full
        speed, so a paced run has the same history as an unpaced one. Stop, pause and a new
        speed wake the wait; a change queued by set() lands at the step that follows it.
        """
        with self._cond:
            while (speed := self.config.speed) is not None:
                now = time.perf_counter()
                if not self._next_step_at:
                    self._next_step_at = now
                if now >= self._next_step_at or self._stop_requested or self._pause_requested:
                    break
                self._flush()  # a slow run shows each step as it happens
                self._cond.wait(self._next_step_at - now)
            if speed is not None:
                # A fixed schedule, so late wake-ups do not add up; a step later than one
                # period is not made up by a burst (the class would see the jump).
                period = 1.0 / speed
                self._next_step_at = max(self._next_step_at + period, time.perf_counter() - period)

    def _batch_bounds(self) -> list[tuple[int, int]]:
        n, size = len(self.data.y_train), self.config.batch_size
        starts = list(range(0, n, size))
        if n % size == 1 and len(starts) > 1:
            starts.pop()  # fold a last batch of one sample into the one before (batch norm)
        ends = [*starts[1:], n]
        return list(zip(starts, ends))

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos >= len(self._bounds):
            self._perm = torch.randperm(len(self.data.y_train), generator=self._order)
            self._bounds = self._batch_bounds()
            self._pos = 0
        start, end = self._bounds[self._pos]
        self._pos += 1
        index = self._perm[start:end]
        return self.data.x_train[index], self.data.y_train[index]

    def _train_step(self) -> bool:
        """One step; False if it was refused as non-finite (no update; the run diverged)."""
        # Changes queued by set() land here, between steps, all at once.
        if self._pending:
            self._apply_pending()
        if self._internals_wanted:
            self._capture_internals()
        x, y = self._next_batch()
        cfg = self.config
        if cfg.augment:
            shape = self.data.image_shape
            bounds = self.data.x_train.amin(dim=0), self.data.x_train.amax(dim=0)
            x = shift_and_noise(x, self.data.mean, self.data.std, shape, bounds, self._augment_rng)
        if cfg.batchnorm:
            torch._foreach_copy_(self._saved_buffers, self._buffers)

        # Forward and backward; the L1 penalty joins the objective, not the recorded loss.
        self.model.train()
        loss = self.loss_fn(self.model(x), y)
        objective = loss
        if cfg.l1 > 0:
            objective = loss + cfg.l1 * l1_penalty(m.weight for _, m in self.probe_layers)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()

        # Measure before clipping (the plots show what the network produced), on the device.
        if self._rows is None:
            self._rows = torch.empty(ROW_BUFFER, 1 + self.probe.raw_width, device=loss.device)
            self._row_views = [(row[0], row[1:]) for row in self._rows]  # no indexing per step
        loss_slot, raw_slot = self._row_views[len(self._row_meta)]
        loss_slot.copy_(loss.detach())
        raw = self.probe.measure_raw(out=raw_slot)
        total = self.probe.total_norm(raw)

        # Decide the step: a NaN or inf anywhere shows in the loss or in the sum of the
        # gradient norms. Note: this is one host transfer of two numbers a step (on a GPU
        # too): a non-finite step must be refused before the optimizer applies it, and the
        # batched rows reach the host too late for that.
        loss_value, health = torch.stack([loss.detach().float(), self.probe.health(raw)]).tolist()
        refused = not (math.isfinite(loss_value) and math.isfinite(health)) and self._diverge(
            [loss_value, float(total)]
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if not refused:
            if cfg.clip is not None:
                nn.utils.clip_grads_with_norm_(self.probe.parameters, cfg.clip, total)
            self.optimizer.step()
            if (
                self.scheduler is not None
                and cfg.schedule != "plateau"
                and self._schedule_left > 0
            ):
                self.scheduler.step()
                self._schedule_left -= 1
        self.step_count += 1  # a refused step counts: its row keeps the non-finite values

        # Record: the rows reach the history in batches (see the module docstring).
        self._row_meta.append((self.step_count, self.epoch_count, lr))
        if (
            refused
            or len(self._row_meta) == ROW_BUFFER
            or self._pause_requested
            or self._observers.get("step_completed")
            or time.perf_counter() - self._flushed_at > FLUSH_SECONDS
        ):
            self._flush()
        if refused:
            self._enter_diverged()
            self.diagnosis.check(self)  # the detectors see the non-finite row at once
        self._emit("step_completed")
        if self._pause_requested:
            with self._cond:
                self._cond.notify_all()  # step() is waiting for this step
        return not refused

    def _diverge(self, values: list[float]) -> bool:
        """Refuse a step whose loss or gradients are not finite, and pause the run.

        The optimizer does not step, so the weights (and, with batch norm, the running
        statistics) stay those of the last finite step. The step still counts and its row
        is recorded, non-finite values and all, so the plots show a gap there and the
        detectors see it. False if nothing had a gradient at all (a NaN total norm then
        means "no gradient").
        """
        loss, total = values[0], values[1]
        layer = self.probe.first_nonfinite()
        if math.isfinite(loss) and layer is None and math.isnan(total):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.batchnorm:
            torch._foreach_copy_(self._buffers, self._saved_buffers)
        if layer is not None:
            where = f"first non-finite gradient in {layer}"
        elif not math.isfinite(total):
            where = "gradient norm beyond float32's range"
        else:
            where = "gradients finite"
        message = (
            f"diverged at step {self.step_count + 1}: loss {loss:g}, {where}; the step was not "
            "applied. Lower the learning rate or switch clipping on, then resume or run again."
        )
        self._divergence = (message, {"loss": loss, "grad_norm": total, "layer": layer})
        return True

    def _enter_diverged(self) -> None:
        """Pause as "diverged", once the refused step is counted and recorded."""
        message, detail = self._divergence
        label = f"diverged at step {self.step_count}"
        with self._cond:
            self._pause_requested = True
            self._single_steps = 0
            self.state, self.error, self.exception = "diverged", message, None
            self.history.add_event(
                Event(self.step_count, self.epoch_count + 1, "diverged", label, detail)
            )
            self._cond.notify_all()
        log.warning("%s", message)

    def _flush(self) -> None:
        """Move the buffered rows into the history: one host transfer for all of them.

        Note: a check that must see every step's loss (a divergence guard) belongs here,
        on the whole block at once, rather than in the step, where it would cost a host
        sync per step on a GPU; it then acts at most one batch of steps late.
        """
        self._flushed_at = time.perf_counter()
        if not self._row_meta:
            return
        block = self._rows[: len(self._row_meta)].cpu()
        stats = self.probe.combine(block[:, 1:])
        steps, epochs, lrs = zip(*self._row_meta, strict=True)
        self._row_meta = []
        values = np.column_stack([block[:, 0].numpy(), lrs, stats.numpy()])
        self.history.record_rows("step", steps, epochs, self._step_columns, values)

    def _evaluate(self) -> None:
        self._flush()
        metrics = {}
        for split, x, y in (
            ("train", self.data.x_train, self.data.y_train),
            ("val", self.data.x_val, self.data.y_val),
        ):
            loss, acc = evaluate(self.model, x, y, self.loss_fn, self.config.eval_batch_size)
            metrics[f"{split}_loss"] = loss
            metrics[f"{split}_acc"] = acc
        self.history.record("eval", self.step_count, self.epoch_count, metrics)
        cfg = self.config
        watched = metrics[cfg.monitor]
        if self.scheduler is not None and cfg.schedule == "plateau" and self.step_count > 0:
            self.scheduler.step(watched)
        if cfg.patience is not None:
            mode = "max" if cfg.monitor == "val_acc" else "min"
            stopper = self.early_stopping
            improved = stopper.update(
                watched, self.step_count, self.model, mode=mode, min_delta=cfg.min_delta
            )
            if not improved and stopper.should_stop(cfg.patience):
                self._early_stop_hit = True
                label = (
                    f"early stop: no {cfg.monitor} improvement in {stopper.wait} "
                    f"evaluations (best at step {stopper.best_step})"
                )
                self._event(
                    "early_stopped", label, {"best_step": stopper.best_step, "best": stopper.best}
                )
        self.diagnosis.check(self)
        self._emit("evaluated", metrics)

    # Internals

    @property
    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        return self.model.named_layers()

    def request_internals(self) -> None:
        """Ask for a fresh `exp.internals` snapshot: now when idle or paused, else at the
        next step boundary (so it never reads a model halfway through an update)."""
        with self._cond:
            if not self._loop_active or self.state == "paused":
                self._capture_internals()
            else:
                self._internals_wanted = True

    def _capture_internals(self) -> None:
        self._internals_wanted = False
        probe_x = self.data.x_train[:256]
        self.internals = measure_internals(
            self.model, self.probe_layers, self.model.activations(), probe_x, self.step_count
        )

    # Runs, forks and checkpoints (nbtrain.runs, nbtrain.checkpoint)

    @property
    def run_id(self) -> int:
        """The id of the current run in `runs`."""
        return self.current_run.id

    def at_boundary(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Call `fn()` between two steps and return what it returns.

        While a run is going, the training thread calls it at its next step boundary (a
        paused run is waiting at one) and this thread waits; otherwise it is called now.
        From inside an observer, that is from the training thread mid-step, it is refused:
        the state there is half-way through a step.
        """
        with self._cond:
            if self._loop_active and threading.current_thread() is self._loop_thread:
                raise RuntimeError(
                    "fork(), save() and at_boundary() cannot run inside an observer, mid-step; "
                    "call them from another thread or between runs"
                )
            if not self._loop_active:
                return fn()
            box: dict[str, Any] = {}

            def call() -> None:
                try:
                    box["value"] = fn()
                except BaseException as exc:  # handed to the caller, never to the run
                    box["error"] = exc

            self._boundary_calls.append(call)
            self._cond.notify_all()
            self._cond.wait_for(lambda: bool(box) or not self._loop_active, timeout)
            if not box:
                if call in self._boundary_calls:
                    self._boundary_calls.remove(call)
                if self._loop_active:
                    raise TimeoutError(f"no step boundary came within {timeout} s")
                return fn()  # the run ended first: now is between steps
        if "error" in box:
            raise box["error"]
        return box["value"]

    def fork(self, **changes: Any) -> Experiment:
        """A new experiment that continues this one from its current step, with `changes`.

        It copies the model, optimizer, data order, RNG and history at the next step
        boundary, then applies `changes` (the live settings, ``epochs``, ``eval_every``)
        as change events at the first step it runs. It joins this experiment's `runs` with
        a ``parent`` link; it does not start by itself. This experiment is not touched.
        """
        from . import checkpoint

        return checkpoint.fork(self, changes)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint that `Experiment.load` resumes exactly (see nbtrain.checkpoint).

        The file reads with ``torch.load(path, weights_only=True)``; it is written to a
        temporary file beside `path` and moved into place, so it is never half-written.
        """
        from . import checkpoint

        checkpoint.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Experiment:
        """The experiment saved at `path`, ready to resume: its step count continues.

        Files that would need arbitrary unpickling are refused with a ValueError.
        """
        from . import checkpoint

        return checkpoint.load(path)

    # Presentation

    def summary(self) -> dict[str, Any]:
        """Where the run stands, in plain numbers."""
        return {
            "state": self.state,
            "step": self.step_count,
            "epoch": self.epoch_count,
            "train_loss": self.history.last("train_loss", "eval"),
            "train_acc": self.history.last("train_acc"),
            "val_loss": self.history.last("val_loss"),
            "val_acc": self.history.last("val_acc"),
        }

    def __repr__(self) -> str:
        hidden = "-".join(map(str, self.config.hidden))
        model = f"mlp {hidden} {self.config.activation}" if hidden else "linear"
        return (
            f"Experiment({self.data.name}, {model}, "
            f"{self.config.optimizer} lr={self.config.lr:g}, batch {self.config.batch_size})"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, batch_size: int
) -> tuple[float, float]:
    """Loss and accuracy over a whole set in eval mode, weighted by samples, not by batches.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            out = model(xb)
            total_loss += loss_fn(out, yb).float() * len(yb)  # a mean-reduced loss, re-weighted
            correct += (out.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return total_loss.item() / n, correct.item() / n
