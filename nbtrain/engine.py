"""The training engine: an experiment that trains in a worker thread and takes changes live.

Pure PyTorch: nothing here imports ipywidgets or bqplot, so the engine runs in scripts, tests
and CI as it does under the panel.

Counting: ``step`` is the number of training steps completed and ``epoch`` the number of
epochs completed, both starting at 0; history rows for step N are recorded after the N-th step.

Cost: a step's row (loss and gradient statistics) stays on the device in a small buffer
(`nbtrain.steprows`) and reaches the history in batches: when the buffer is full, every
100 ms at the latest, every 50 steps for the detectors, and at every boundary a reader can
observe (an evaluation, a pause, a single step, the end of the run). So the history may trail
`step_count` by up to 100 ms while a run goes, and a GPU run pays one host transfer per batch
of rows, besides the two numbers a step that decide whether the step is applied.
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

import torch
from torch import nn

from .challenges import preset_config
from .config import LIVE_KEYS, Config, check_changes, check_value, make_config
from .data import Split
from .diagnosis import CHECK_EVERY, Diagnosis, Finding
from .foreign import ModelReport, Switches, check_layers, probe_layers
from .gradients import GradientProbe
from .history import Event, History
from .internals import Internals, measure_internals
from .model import initialize
from .optim import OWNS_LR, WEIGHT_DECAY_STYLE, make_optimizer, make_scheduler
from .regularization import EarlyStopping, l1_penalty, shift_and_noise
from .runs import Run, RunRegistry, session_runs
from .sources import (
    Loaders,
    ModelSource,
    OptimizerSource,
    check_loss,
    default_loss,
    make_data,
    resolve_device,
    split_batch,
    weight_decay_style,
)
from .steprows import StepRows

log = logging.getLogger(__name__)

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


def _to_device(value: Any, device: torch.device) -> Any:
    """A batch's tensors on `device` (tensors, or tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class Experiment:
    """A network, its data and optimizer, and the controls to train it live.

    With no arguments: the built-in funnel MLP on the digits. Bring your own with
    ``model=`` (an ``nn.Module``, or ``"cnn"`` for `nbtrain.model.SmallCNN` on the digits),
    ``train_data=``/``val_data=`` (tensors, numpy arrays, a Dataset or a DataLoader; see
    `nbtrain.sources`), ``loss_fn=``, ``task=`` and ``optimizer=`` (a name, a factory
    ``f(params) -> Optimizer`` or an Optimizer instance over your model).

    >>> exp = Experiment(epochs=1)
    >>> exp.run().last("val_acc") > 0.5
    True
    """

    def __init__(
        self,
        data: Any = None,
        *,
        preset: str | None = None,
        model: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        loss_fn: Any = None,
        task: str | None = None,
        **config: Any,
    ) -> None:
        if preset is not None:
            config = {**preset_config(preset), **config}
        self.preset = preset
        # Your model, data, loss and optimizer become a model source, data and a loss here.
        self._optimizer_source: OptimizerSource | None = None
        if "optimizer" in config and not isinstance(config["optimizer"], str):
            module = model if isinstance(model, nn.Module) else None
            self._optimizer_source = OptimizerSource(config.pop("optimizer"), module)
        self._given = set(config)  # what the user chose, rather than the defaults
        self.config: Config = make_config(config)
        if self._optimizer_source is not None:
            self.config = self.config.replace(optimizer="custom")
        self.device = resolve_device(self.config.device)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        check_loss(loss_fn)
        self._model_source = ModelSource(model)
        self._data_args = (data, train_data, val_data, task, loss_fn)
        self.data: Split | Loaders = self._make_data(self.config)
        self.task: str = self.data.task
        self.loss_fn = loss_fn if loss_fn is not None else default_loss(self.task)
        if self._model_source.module is not None:
            self._adopt_model_settings(self._model_source.module)
        self._switches: Switches | None = None
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
        self.runs: RunRegistry = session_runs()  # every run of the session (nbtrain.runs)
        self.current_run: Run | None = None
        self._build()
        chosen = {k: getattr(self.config, k) for k in self._given if hasattr(self.config, k)}
        self._check_fits(self.config, chosen)

    def _make_data(self, cfg: Config) -> Split | Loaders:
        data, train_data, val_data, task, loss_fn = self._data_args
        made = make_data(
            data,
            train_data,
            val_data,
            task=task,
            loss_fn=loss_fn,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            train_size=cfg.train_size,
            label_noise=cfg.label_noise,
            batch_size=cfg.batch_size,
            eval_batch_size=cfg.eval_batch_size,
        )
        return made.to(self.device) if isinstance(made, Split) else made

    def _adopt_model_settings(self, model: nn.Module) -> None:
        """Your model's own dropout rate and batch norm are the settings in force unless
        you chose others, so the panel's switches start where your model is."""
        switches = Switches(model)
        adopted = {}
        if "dropout" not in self._given and switches.dropouts:
            adopted["dropout"] = switches.dropout_rate
        if "batchnorm" not in self._given:
            adopted["batchnorm"] = bool(switches.batchnorms)
        self.config = self.config.replace(**adopted)

    @property
    def builtin_model(self) -> str | None:
        """ "mlp" or "cnn" when nbtrain built the model, None for yours."""
        return self._model_source.builtin

    def _build(self) -> None:
        """A fresh model, optimizer and history from the seed and the current config.

        A model you brought is not rebuilt: its weights go back to what they were when the
        experiment was made, and the live settings in force are applied to it.
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model: nn.Module = self._model_source.make(cfg, self.data).to(self.device)
        if self.builtin_model or "init" in self._given:  # your model keeps your init
            initialize(self.model, cfg.init, cfg.activation, cfg.init_std)
        if self._switches is None or self._switches.model is not self.model:
            self._switches = Switches(self.model)
        switches = self._switches
        if self.builtin_model == "mlp":
            switches.set_dropout(cfg.dropout)
            switches.set_batchnorm(cfg.batchnorm)
            switches.set_skip(cfg.skip)
        else:
            if switches.dropouts and cfg.dropout != switches.dropout_rate:
                switches.set_dropout(cfg.dropout)
            if switches.batchnorms and cfg.batchnorm != switches.batchnorm_on:
                switches.set_batchnorm(cfg.batchnorm)
        if isinstance(self.data, Loaders) and self.data.own_batching:
            self.data.rebatch(cfg.batch_size)  # the same shuffled order as the first run
        self._batches: Any = None
        self._report: ModelReport | None = None
        self.optimizer = self._make_optimizer()
        self.scheduler: Any = None  # made when a run begins; see _schedule()
        self._schedule_left = 0
        self.early_stopping = EarlyStopping()
        self._early_stop_hit = False
        self._augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self._augment_bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._layers = probe_layers(self.model)
        self.probe = GradientProbe(self.model, self._layers)
        self._l1_weights = [
            m.weight
            for _, m in self._layers
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.requires_grad
        ]
        # Batch norm's running statistics, saved before each step while batch norm is on, so
        # a step refused as non-finite leaves no trace in them either.
        self._buffers = [b for b in self.model.buffers()]
        self._saved_buffers = [b.clone() for b in self._buffers]
        self._steps = StepRows(self.probe)
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
        if cfg.optimizer == "custom":
            return self._make_custom_optimizer(lr)
        return make_optimizer(
            cfg.optimizer,
            self.model.parameters(),
            lr=cfg.lr if lr is None else lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )

    def _make_custom_optimizer(self, lr: float | None) -> torch.optim.Optimizer:
        """Your optimizer, afresh. Its learning rate and weight decay are the settings in
        force unless you chose others (by Experiment(lr=...) or set(lr=...))."""
        assert self._optimizer_source is not None
        optimizer = self._optimizer_source.make(self.model)
        group = optimizer.param_groups[0]
        adopted = {}
        for name in ("lr", "weight_decay"):
            if name == "lr" and lr is not None:
                value = lr
            elif name in self._given or name not in group:
                value = getattr(self.config, name)
            else:
                adopted[name] = float(group[name])
                continue
            for each in optimizer.param_groups:
                each[name] = value
        if adopted:
            self.config = self.config.replace(**adopted)
        return optimizer

    def _schedule(self) -> None:
        """(Re)make the learning-rate schedule over what is left of the current run.

        Each schedule starts from the base rate `config.lr`, so switching one on mid-run, or
        starting a new run, begins at the rate the user chose.
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr
            group.pop("initial_lr", None)  # a fresh scheduler on a used optimizer starts over
        # At an epoch's end its batches are used up: the next step begins the next epoch.
        into_epoch = self._pos if self._pos < len(self._bounds) else 0
        left = max(self._target_epoch - self.epoch_count, 1) * self.steps_per_epoch - into_epoch
        self._schedule_left = max(left, 1)
        self.scheduler = make_scheduler(
            cfg.schedule, self.optimizer, total_steps=self._schedule_left, monitor=cfg.monitor
        )

    @property
    def weight_decay_style(self) -> str:
        """How weight_decay (L2) is applied by the optimizer in force."""
        if self.config.optimizer == "custom":
            return weight_decay_style(self.optimizer)
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
        checked = self._check_changes(changes)
        with self._cond:
            after = {**dataclasses.asdict(self.config), **self._pending, **checked}
            self._check_fits(after, checked)
            # A new schedule may come with its rate: the lr is then the one it starts from.
            schedule_too = "schedule" in checked or "schedule" in self._pending
            if "lr" in checked and after["schedule"] in OWNS_LR and not schedule_too:
                raise ValueError(
                    f"lr is set by the {after['schedule']!r} schedule at every step; "
                    f"set(schedule='none') or 'plateau' first to change it by hand"
                )
            self._pending.update(checked)
            self._given.update(checked)
            if not self._loop_active:
                self._apply_pending()

    def _check_changes(self, changes: dict[str, Any]) -> dict[str, Any]:
        """`check_changes`, plus optimizer="custom": back to the optimizer you passed."""
        if changes.get("optimizer") != "custom":
            return check_changes(changes, self.config)
        if self._optimizer_source is None:
            raise ValueError(
                "optimizer='custom' means the optimizer you passed as Experiment(optimizer=...)"
                ", and this experiment has none; use one of sgd, momentum, adam, adamw, rmsprop"
            )
        rest = {k: v for k, v in changes.items() if k != "optimizer"}
        return {**(check_changes(rest, self.config) if rest else {}), "optimizer": "custom"}

    def unavailable(self) -> dict[str, str]:
        """The controls that cannot act on this experiment, each with the reason why.

        The panel disables them and shows the reason; `set()` refuses them with it.
        """
        reasons = {}
        for name in ("dropout", "batchnorm", "activation", "skip"):
            reason = self.switches.unavailable(name)
            if reason:
                reasons[name] = reason
        if "skip" not in reasons and self.switches.residual_blocks == 0:
            reasons["skip"] = "no hidden block has equal input and output width here"
        if isinstance(self.data, Loaders) and not self.data.own_batching:
            reasons["batch_size"] = (
                f"the batch size is your DataLoader's ({self.data.train.batch_size}); pass a "
                "Dataset instead to let nbtrain batch it"
            )
        if self.data.image_shape is None:
            reasons["augment"] = "augmentation shifts image pixels; this data has no image shape"
        if self.builtin_model != "mlp":
            reasons["hidden"] = "hidden widths belong to nbtrain's built-in MLP, not to this model"
            reasons["init_inspector"] = "the init inspector compares fresh built-in MLPs"
        if self.task == "regression":
            reasons["accuracy"] = "a regression has no accuracy: the panel shows the loss only"
        return reasons

    @property
    def switches(self) -> Switches:
        assert self._switches is not None
        return self._switches

    @property
    def n_train(self) -> int | None:
        """Training samples (None for a DataLoader over a dataset without a length)."""
        if isinstance(self.data, Loaders):
            return self.data.n_train
        return len(self.data.y_train)

    def _check_fits(self, after: Any, changed: dict[str, Any]) -> None:
        """Refuse settings that are valid alone but not for this model, data or schedule."""
        get = after.get if isinstance(after, dict) else lambda k: getattr(after, k)
        reasons = self.unavailable()
        for name in ("dropout", "batchnorm", "activation", "skip", "batch_size", "hidden"):
            if name in changed and name in reasons and name != "skip":
                raise ValueError(f"{name}={changed[name]!r} cannot act here: {reasons[name]}")
        if "skip" in changed and self.switches.unavailable("skip"):
            raise ValueError(f"skip={changed['skip']!r} cannot act here: {reasons['skip']}")
        if get("monitor") == "val_acc" and self.task == "regression":
            raise ValueError(
                "monitor='val_acc' needs an accuracy, and a regression records none; "
                "use monitor='val_loss'"
            )
        if changed.get("skip") and not self._residual_blocks(get("hidden")):
            raise ValueError(
                f"skip=True needs hidden blocks of equal input and output width, and "
                f"hidden={get('hidden')} has none; use e.g. hidden=(64, 64, 64)"
            )
        n_train = self.n_train
        if changed.get("batchnorm") and n_train is not None and n_train < 2:
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
        if "lr" in changes and "schedule" in changes:  # the schedule starts from the new lr
            changes = {"lr": changes.pop("lr"), **changes}
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
            self.switches.set_dropout(value)
        elif name == "batchnorm":
            self.switches.set_batchnorm(value)
        elif name == "activation":
            self.switches.set_activation(value)
        elif name == "skip":
            self.switches.set_skip(value)
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
            if self.state == "diverged" and not self._loop_active:
                raise RuntimeError(
                    "the run that diverged has returned (run() blocks until it ends); "
                    "call run() again to train on, or start() to train in the background"
                )
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
        """Block until the background run ends or diverges; True if it is not training.

        A diverged run waits for you (set() then resume(), or stop()), so waiting for its
        end would never return.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if threading.current_thread() is not self._loop_thread:
            with self._cond:
                # Note: after resume() the state reads "diverged" until the worker wakes;
                # the pause request, cleared by resume(), tells the two apart.
                held = lambda: self.state == "diverged" and self._pause_requested  # noqa: E731
                self._cond.wait_for(lambda: not self._loop_active or held(), timeout)
                if self._loop_active and held():
                    return True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._join(left)

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
        custom = {"optimizer": "custom"} if before.optimizer == "custom" else {}
        kept = {k: v for k, v in dataclasses.asdict(before).items() if k not in custom}
        new = {k: v for k, v in changes.items() if not (k == "optimizer" and v == "custom")}
        if changes.get("optimizer") == "custom":
            self._check_changes({"optimizer": "custom"})
            custom = {"optimizer": "custom"}
        elif "optimizer" in changes:
            custom = {}
        config = make_config({**kept, **new}).replace(**custom)
        self.stop()
        with self._cond:
            split_keys = ("seed", "val_fraction", "train_size", "label_noise")
            if any(getattr(config, k) != getattr(before, k) for k in split_keys):
                self.data = self._make_data(config)
            self._check_fits(config, changes)
            self._given.update(changes)
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
                self._warn_about_layers()
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
                    self._diagnose()
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

    def _warn_about_layers(self) -> None:
        """Before the first step: say which layers will show no gradient, and why."""
        problems = self.report().problems
        if problems:
            names = ", ".join(f"{layer.name} ({layer.status})" for layer in problems)
            log.warning("these layers will get no gradient: %s", names)

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
        if isinstance(self.data, Loaders):
            # A loader's epoch: its batches by number (the loader holds the samples).
            return [(i, i + 1) for i in range(len(self.data.train))]
        n, size = len(self.data.y_train), self.config.batch_size
        starts = list(range(0, n, size))
        if n % size == 1 and len(starts) > 1:
            starts.pop()  # fold a last batch of one sample into the one before (batch norm)
        ends = [*starts[1:], n]
        return list(zip(starts, ends))

    def _next_batch(self) -> tuple[Any, torch.Tensor]:
        if isinstance(self.data, Loaders):
            return self._next_loader_batch(self.data)
        if self._pos >= len(self._bounds):
            order = torch.randperm(len(self.data.y_train), generator=self._order)
            self._perm = order.to(self.device)  # drawn on the CPU: the same order everywhere
            self._bounds = self._batch_bounds()
            self._pos = 0
        start, end = self._bounds[self._pos]
        self._pos += 1
        index = self._perm[start:end]
        return self.data.x_train[index], self.data.y_train[index]

    def _next_loader_batch(self, data: Loaders) -> tuple[Any, torch.Tensor]:
        if self._pos >= len(self._bounds) or self._batches is None:
            if data.own_batching and data.train.batch_size != self.config.batch_size:
                data.rebatch(self.config.batch_size)
            self._bounds = self._batch_bounds()
            self._batches = iter(data.train)
            self._pos = 0
        self._pos += 1
        try:
            batch = next(self._batches)
        except StopIteration:
            raise RuntimeError(
                f"train_data ended after {self._pos - 1} batches, though its length is "
                f"{len(self._bounds)}"
            ) from None
        x, y = split_batch(batch, "train_data")
        return _to_device(x, self.device), _to_device(y, self.device)

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
            if self._augment_bounds is None:  # each pixel's range in the training set, once
                self._augment_bounds = self.data.x_train.amin(0), self.data.x_train.amax(0)
            x = shift_and_noise(
                x,
                self.data.mean,
                self.data.std,
                self.data.image_shape,
                self._augment_bounds,
                self._augment_rng,
            )
        if cfg.batchnorm:
            torch._foreach_copy_(self._saved_buffers, self._buffers)

        # Forward and backward; the L1 penalty joins the objective, not the recorded loss.
        # An evaluation puts the model back in training mode; so this costs a call (a walk
        # over every module) only when something else left it in eval mode.
        if not self.model.training:
            self.model.train()
        loss = self.loss_fn(self.model(x), y)
        objective = loss
        if cfg.l1 > 0 and self._l1_weights:
            objective = loss + cfg.l1 * l1_penalty(self._l1_weights)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()

        # Measure before clipping (the plots show what the network produced), on the device.
        # Decide the step: a NaN or inf anywhere shows in the loss or in the sum of the
        # gradient norms, and a non-finite step must be refused before the optimizer
        # applies it (see `nbtrain.steprows` for what reading those two numbers costs).
        loss_value, health, raw = self._steps.measure(loss)
        refused = not (math.isfinite(loss_value) and math.isfinite(health)) and self._diverge(
            [loss_value, float(self.probe.total_norm(raw))]
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if not refused:
            if cfg.clip is not None:
                total = self.probe.total_norm(raw)
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
        due = self._steps.keep(self.step_count, self.epoch_count, lr)
        if due or refused or self._pause_requested or self._observers.get("step_completed"):
            self._flush()
        if refused:
            self._enter_diverged()
            self._diagnose()  # the detectors see the non-finite row at once
        if self._observers.get("step_completed"):
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
        self._steps.flush(self.history)

    def _eval_batches(self, split: str) -> Any:
        if isinstance(self.data, Loaders):
            for batch in self.data.eval_batches(split):
                x, y = split_batch(batch, f"{split}_data")
                yield _to_device(x, self.device), _to_device(y, self.device)
            return
        x = self.data.x_train if split == "train" else self.data.x_val
        y = self.data.y_train if split == "train" else self.data.y_val
        size = self.config.eval_batch_size
        for start in range(0, len(y), size):
            yield x[start : start + size], y[start : start + size]

    def _evaluate(self) -> None:
        self._flush()
        metrics = {}
        for split in ("train", "val"):
            loss, acc = evaluate_batches(
                self.model, self._eval_batches(split), self.loss_fn, self.task
            )
            metrics[f"{split}_loss"] = loss
            if acc is not None:
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
        self._diagnose()
        self._emit("evaluated", metrics)

    def _diagnose(self) -> None:
        # Note: the detectors read accuracies; a regression has none, so they sit it out.
        if self.task != "regression":
            self.diagnosis.check(self)

    # Internals

    @property
    def _step_columns(self) -> list[str]:
        """The history's per-step columns: loss, lr, then the probe's statistics."""
        return self._steps.columns

    @property
    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        """The layers the gradient flow shows, by name (`nbtrain.foreign.probe_layers`)."""
        return self._layers

    def _probe_batch(self, size: int = 256) -> tuple[Any, torch.Tensor]:
        if isinstance(self.data, Loaders):
            x, y = self.data.probe_batch(size)
            return _to_device(x, self.device), _to_device(y, self.device)
        return self.data.x_train[:size], self.data.y_train[:size]

    def report(self) -> ModelReport:
        """The watched layers before training: which are frozen or get no gradient.

        One forward and backward pass on a fixed batch that changes nothing (see
        `nbtrain.foreign.check_layers`); made once per build and kept. Such layers read
        NaN in the history and show as "frozen" or "no gradient" in the panel, never as 0.
        """
        if self._report is None:
            kind = self.builtin_model or type(self.model).__name__
            layers = check_layers(self.model, self._layers, self._probe_batch(64), self.loss_fn)
            self._report = ModelReport(kind, self.task, str(self.device), layers)
        return self._report

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
        probe_x, _ = self._probe_batch()
        activations = self.model.activations() if self.builtin_model == "mlp" else []
        self.internals = measure_internals(
            self.model, self.probe_layers, activations, probe_x, self.step_count
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
        It holds weights and state, never code: your own model, Dataset or DataLoader, loss
        and optimizer are listed in it, and `load` asks for them again. An experiment
        reading a Dataset or DataLoader is saved at an epoch boundary (a running one is
        waited for; a paused or stopped one mid-epoch is refused).
        """
        from . import checkpoint

        checkpoint.save(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        train_data: Any = None,
        val_data: Any = None,
        loss_fn: Any = None,
        optimizer: Any = None,
    ) -> Experiment:
        """The experiment saved at `path`, ready to resume: its step count continues.

        A checkpoint of your own model, Dataset or DataLoader, loss or optimizer needs them
        again, given as `Experiment` takes them: a model built the same way (its weights
        are replaced by the saved ones), the same data, loss and optimizer (factory or a
        fresh instance over `model`). A missing one, one not needed, or a model whose
        parameters differ from the saved ones is refused with a ValueError that names it.
        Your arrays and tensors are in the file and need not be passed. Files that would
        need arbitrary unpickling are refused with a ValueError.
        """
        from . import checkpoint

        objects = dict(
            model=model,
            train_data=train_data,
            val_data=val_data,
            loss_fn=loss_fn,
            optimizer=optimizer,
        )
        return checkpoint.load(path, objects)

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
        cfg = self.config
        if self.builtin_model == "mlp":
            hidden = "-".join(map(str, cfg.hidden))
            model = f"mlp {hidden} {cfg.activation}" if hidden else "linear"
        else:
            model = self.builtin_model or type(self.model).__name__
        optimizer = type(self.optimizer).__name__ if cfg.optimizer == "custom" else cfg.optimizer
        batch = cfg.batch_size
        if isinstance(self.data, Loaders) and not self.data.own_batching:
            batch = self.data.train.batch_size
        task = ", regression" if self.task == "regression" else ""
        return (
            f"Experiment({self.data.name}, {model}, {optimizer} lr={cfg.lr:g}, "
            f"batch {batch}{task})"
        )


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    batch_size: int,
    task: str = "classification",
) -> tuple[float, float | None]:
    """Loss and accuracy over a whole set in eval mode, weighted by samples, not by batches.

    The model's train/eval mode is restored afterwards. For a regression the accuracy is None.
    """
    starts = range(0, len(y), batch_size)
    batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in starts)
    return evaluate_batches(model, batches, loss_fn, task)


def _correct(out: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> torch.Tensor:
    """Correct predictions: the arg-max class, or for one output a threshold (BCE losses)."""
    binary = isinstance(loss_fn, (nn.BCELoss, nn.BCEWithLogitsLoss))
    if not y.is_floating_point() and out.ndim >= 2 and (out.shape[1] > 1 or not binary):
        return (out.argmax(dim=1) == y).sum()  # one logit and cross-entropy: one class
    threshold = 0.5 if isinstance(loss_fn, nn.BCELoss) else 0.0  # probabilities or logits
    return ((out.reshape(y.shape) > threshold) == (y > 0.5)).sum()


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches: Any, loss_fn: Any, task: str = "classification"
) -> tuple[float, float | None]:
    """`evaluate` over any iterable of (inputs, targets) batches already on the device.

    The loss is assumed mean-reduced over a batch (PyTorch's default) and re-weighted by
    the batch's length; the accuracy counts target elements (one per sample, usually).
    """
    was_training = model.training
    model.eval()
    total_loss = correct = None
    n = counted = 0
    try:
        for xb, yb in batches:
            out = model(xb)
            batch_loss = loss_fn(out, yb).float() * len(yb)
            total_loss = batch_loss if total_loss is None else total_loss + batch_loss
            n += len(yb)
            if task != "regression":
                hits = _correct(out, yb, loss_fn)
                correct = hits if correct is None else correct + hits
                counted += yb.numel()
    finally:
        model.train(was_training)
    if total_loss is None:
        return math.nan, None if task == "regression" else math.nan
    loss = total_loss.item() / n
    if task == "regression":
        return loss, None
    return loss, correct.item() / max(counted, 1)
