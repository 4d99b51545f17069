"""The training engine: an experiment that trains in a worker thread and takes changes live.

Pure PyTorch: nothing here imports ipywidgets or bqplot, so the engine runs in scripts, tests
and CI as it does under the panel.

Counting: ``step`` is the number of optimizer steps completed and ``epoch`` the number of
epochs completed, both starting at 0; history rows for step N are recorded after the N-th step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from .challenges import preset_config
from .config import LIVE_KEYS, Config, check_changes, make_config
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

State = Literal["idle", "running", "paused", "finished", "stopped", "failed"]

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
        self._check_fits(self.config, {"skip": self.config.skip, "augment": self.config.augment})
        self._internals_wanted = False
        self.internals: Internals | None = None
        self._cond = threading.Condition(threading.RLock())
        self._observers: dict[str, list[Callback]] = defaultdict(list)
        self._worker: threading.Thread | None = None
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
        self.on("step_completed", _diagnose_every)
        self.on("evaluated", lambda exp, _: exp.diagnosis.check(exp))

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
        self._step_columns = ["train_loss", "lr", *self.probe.columns]
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
        for callback in self._observers.get(name, ()):
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
        """Queue live changes (``dropout``, ``batchnorm``, ``clip``, ``lr``).

        They are applied together at the next step boundary, never inside a step, and each
        becomes a "change" event whose step is the first step that runs with it. When no
        run is going, that boundary is now.
        """
        checked = check_changes(changes)
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
            self._begin(epochs)
            self._worker = threading.Thread(
                target=self._loop, name="nbtrain-training", daemon=True
            )
            self._worker.start()

    def run(self, epochs: int | None = None) -> History:
        """Train `epochs` more epochs in this thread and return the history when done.

        For scripts and notebooks checked by nbval. Ctrl-C (KeyboardInterrupt) stops the run
        cleanly, keeping the history and the model, and is then raised again.
        """
        epochs = self._check_epochs(epochs)
        with self._cond:
            if self._loop_active:
                raise RuntimeError(
                    "a run is already going in the background; use wait() or stop() first"
                )
            self._begin(epochs)
        self._loop()
        return self.history

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
            if wait and threading.current_thread() is not self._worker:
                self._cond.wait_for(
                    lambda: self.state == "paused" or not self._loop_active, timeout
                )

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._single_steps = 0
            self._cond.notify_all()

    def step(self, timeout: float = 30.0) -> None:
        """Run exactly one step and stay paused (starting a paused run if none is going)."""
        with self._cond:
            if self._loop_active and not self._pause_requested:
                raise RuntimeError("step() works on a paused run; pause() first")
            target = self.step_count + 1
            if self._loop_active:
                self._single_steps += 1
                self._cond.notify_all()
            else:
                self._pause_requested = True
                self._single_steps = 1
                self._begin(self.config.epochs)
                self._worker = threading.Thread(
                    target=self._loop, name="nbtrain-training", daemon=True
                )
                self._worker.start()
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
        return not self._loop_active

    def reset(self) -> None:
        """Stop any run and start over: same seed, current settings, empty history."""
        self.stop()
        with self._cond:
            self._pause_requested = False
            self._single_steps = 0
            self._build()

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
                self._train_step()
                if self._pos >= len(self._bounds):
                    self.epoch_count += 1
                    self._evaluate()
                    self._emit("epoch_completed")
                elif self.config.eval_every and self.step_count % self.config.eval_every == 0:
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
            self._rng_state = torch.get_rng_state()
            self._run_ended_at = time.perf_counter()
            self._restore_best()
            with self._cond:
                self._loop_active = False
                self._pause_requested = False
                self._single_steps = 0
                self.state = outcome
                self._apply_pending()  # a change that arrived as the run ended: now is a boundary
                self._cond.notify_all()
            label = outcome if not self.error else f"failed: {self.exception!r:.60}"
            self._event(outcome, label)
            self._emit("run_ended", outcome)
        if interrupted:
            raise KeyboardInterrupt

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
        """At a step boundary: honour stop and pause; False means end the run."""
        if self._boundary_calls:
            self._run_boundary_calls()
        if not (self._pause_requested or self._stop_requested) and self.state == "running":
            return True  # the common case, without the lock
        with self._cond:
            while True:
                if self._boundary_calls:
                    self._run_boundary_calls()
                if self._stop_requested:
                    return False
                if not self._pause_requested:
                    if self.state == "paused":
                        self.state = "running"
                        self._event("resumed", "resume")
                    return True
                if self.state != "paused":
                    self.state = "paused"
                    self._event("paused", "pause")
                    self._cond.notify_all()
                if self._single_steps > 0:
                    self._single_steps -= 1
                    return True
                self._cond.wait()

    def _run_boundary_calls(self) -> None:
        with self._cond:
            calls, self._boundary_calls = self._boundary_calls, []
            for call in calls:
                call()  # never raises: at_boundary() hands its outcome to the caller
            self._cond.notify_all()

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

    def _train_step(self) -> None:
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

        # Forward and backward; the L1 penalty joins the objective, not the recorded loss.
        self.model.train()
        loss = self.loss_fn(self.model(x), y)
        objective = loss
        if cfg.l1 > 0:
            objective = loss + cfg.l1 * l1_penalty(m.weight for _, m in self.probe_layers)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()

        # Measure before clipping: the plots show what the network produced.
        stats = self.probe.measure()
        if cfg.clip is not None:
            nn.utils.clip_grads_with_norm_(self.probe.parameters, cfg.clip, stats[0])
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.optimizer.step()
        if self.scheduler is not None and cfg.schedule != "plateau" and self._schedule_left > 0:
            self.scheduler.step()
            self._schedule_left -= 1
        self.step_count += 1

        # Record: one host transfer for the loss and every gradient statistic.
        values = torch.cat([loss.detach().reshape(1).float(), stats]).tolist()
        values.insert(1, lr)
        self.history.record_row(
            "step", self.step_count, self.epoch_count, self._step_columns, values
        )
        self._emit("step_completed")
        if self._pause_requested:
            with self._cond:
                self._cond.notify_all()  # step() is waiting for this step

    def _evaluate(self) -> None:
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


def _diagnose_every(experiment: Experiment, _: Any) -> None:
    if experiment.step_count % CHECK_EVERY == 0:
        experiment.diagnosis.check(experiment)
