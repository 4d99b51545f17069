"""Your own training loop, watched: `watch(model)` and `Watcher.log(step=..., **metrics)`.

A `Watcher` is an "external run": it offers what the panel reads from an `Experiment`
(history, state, the probe's layer names, the settings in force, events), so
``nbtrain.Dashboard(watcher)`` is the same panel with the same plots. Your loop drives the
training; the panel's Start, Step and Reset are disabled for that reason.

Gradients are collected with hooks: a post-accumulate-grad hook on each parameter keeps a
reference to its gradient (no arithmetic, no copy), so the gradient is still there when you
call `log()` even if your loop has already called ``optimizer.zero_grad()``. At `log()`
nbtrain reduces the kept gradients with the same probe as the engine (per-tensor norms,
on the device) and leaves the result there with your tensor metrics; reading `history`
(the panel does, at each refresh, in its own thread) reads everything logged since in one
host transfer. So
your loop never waits for the device on nbtrain's account: one sync per panel update.
Note: a kept reference holds one extra set of gradients in memory until the next `log()`.

Pause and Stop are requests your loop honours: Pause holds your loop inside `log()` until
Resume (only when the loop runs in another thread than the panel's clicks; see the README),
and Stop sets `should_stop`, which your loop checks to break out.

Divergence: the engine refuses a non-finite step before its optimizer; here your optimizer
has taken it by the time nbtrain sees the values (they are read in `flush()`, not at
`log()`, so that your loop never waits). So the first non-finite train loss (or gradient
norm, once the weights show the step was applied) is reported, not refused: `error` holds
the message, a "diverged" event marks that step on the plots, a warning is logged,
`diverged_at` names the step for your loop to check, and the run ends as "diverged". Your
loop is not stopped for it: `should_stop` stays the panel's Stop.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import LIVE_KEYS, Config, check_changes
from .engine import _format
from .foreign import ModelReport, Switches, probe_layers
from .gradients import GradientProbe
from .history import Event, History

log = logging.getLogger(__name__)

# Where a logged metric goes: "loss" is the per-step train_loss; validation metrics and
# train_acc are evaluations (points on the plots); anything else is a per-step column.
ALIASES = {"loss": "train_loss", "acc": "train_acc", "accuracy": "train_acc"}
EVAL_PREFIXES = ("val_", "test_")
EVAL_NAMES = ("train_acc",)
LIVE = ("dropout", "batchnorm", "lr")  # what set() can change on your loop
ENDED = ("finished", "stopped", "failed", "diverged")


def _table_of(name: str) -> str:
    return "eval" if name.startswith(EVAL_PREFIXES) or name in EVAL_NAMES else "step"


def _is_accuracy(name: str) -> bool:
    """An accuracy (a fraction in [0, 1]: the accuracy plot's axis), by its logged name."""
    return name.endswith(("_acc", "accuracy"))


def _bad_accuracy(name: str, value: float, step: int) -> str:
    return (
        f"metric {name!r} must be an accuracy in [0, 1], got {value!r} at step {step} "
        "(a percentage? divide it by 100)"
    )


class Watcher:
    """Watch a model trained by your own loop; see the module docstring.

    Parameters:
        model: the module your loop trains.
        optimizer: its optimizer, if the panel's learning-rate slider should act on it.
        task: ``"classification"`` (the accuracy plot shows ``train_acc``/``val_acc``) or
            ``"regression"`` (loss only).
        total_steps: the steps your loop will run, for the progress bar (optional).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        task: str = "classification",
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                "optimizer must be None or a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(
                f"total_steps must be None or a positive integer, got {total_steps!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.task = task
        self.total_steps = total_steps
        self._layers = probe_layers(model)
        self.probe = GradientProbe(model, self._layers)
        self.switches = Switches(model)
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else Config.lr
        self.config = Config(
            dropout=self.switches.dropout_rate,
            batchnorm=bool(self.switches.batchnorms),
            lr=float(lr),
            epochs=1,
        )
        self._history = History()
        self._unread: list[tuple] = []  # what log() left on the device, read by flush()
        self._unread_lock = threading.Lock()  # log() holds it only to append
        self._flushing = threading.RLock()  # one flush at a time, so rows stay in order
        self.state = "idle"
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.internals = None
        self.step_count = 0
        self.epoch_count = 0
        self.should_stop = False
        # The first step read as non-finite (see the module docstring), or None.
        self.diverged_at: int | None = None
        self._last_row_step = 0  # the last step with a per-step row (loss, gradients)
        self._bad_input: str | None = None  # a tensor metric found bad in flush(), raised next
        self._cond = threading.Condition(threading.RLock())
        self._pending: dict[str, Any] = {}
        self._pause_requested = False
        self._pause_thread: int | None = None
        self._observers: dict[str, list[Callable]] = defaultdict(list)
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._dashboard: Any = None

        # Gradient hooks: keep a reference to each gradient once it is accumulated.
        self._grads: dict[int, torch.Tensor] = {}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._keep) for p in self.probe.parameters
        ]

    def _keep(self, param: torch.Tensor) -> None:
        self._grads[id(param)] = param.grad

    # What the panel reads

    @property
    def history(self) -> History:
        """Everything logged so far (reading it reads what is still on the device)."""
        self.flush()
        return self._history

    def flush(self) -> None:
        """Read every metric and gradient statistic logged since the last read, in one host
        transfer, into the history. The panel does this at each refresh (at most 10 times a
        second, in its own thread), so your loop itself never waits for the device."""
        with self._flushing:
            with self._unread_lock:
                records, self._unread = self._unread, []
            if not records:
                return
            packed = [record[-1] for record in records if record[-1] is not None]
            # The one host transfer, then per-layer statistics on the CPU (`combine`).
            flat = torch.cat([p.to(packed[0].device) for p in packed]).cpu() if packed else None
            at = 0
            bad_loss = bad_grads = None  # this block's first non-finite step of each kind
            for step, epoch, names, values, tensor_at, measured, lr, _ in records:
                values = list(values)
                for index in tensor_at:
                    values[index], at = float(flat[at]), at + 1
                if any(_is_accuracy(names[i]) and not 0 <= values[i] <= 1 for i in tensor_at):
                    names, values = self._refuse_read(names, values, tensor_at, step)
                stats: list[float] = []
                if measured:
                    width = self.probe.raw_width
                    stats = self.probe.combine(flat[at : at + width])[0].tolist()
                    at += width
                self._record(step, epoch, names, values, stats, lr)
                if self.diverged_at is None and bad_loss is None:
                    loss = values[names.index("train_loss")] if "train_loss" in names else None
                    norm = stats[0] if stats else None
                    if loss is not None and not math.isfinite(loss):
                        bad_loss = (step, epoch, loss, norm)
                    elif bad_grads is None and norm is not None and not math.isfinite(norm):
                        bad_grads = (step, epoch, loss, norm)
            if self.diverged_at is None and (bad_loss or bad_grads):
                self._check_divergence(bad_loss, bad_grads)

    def _refuse_read(
        self, names: list[str], values: list[float], tensor_at: list[int], step: int
    ) -> tuple[list[str], list[float]]:
        """Leave out the tensor accuracies outside [0, 1] (read only now); the next `log()`
        or the end of the run raises the first in your loop's thread."""
        bad = {i for i in tensor_at if _is_accuracy(names[i]) and not 0 <= values[i] <= 1}
        for i in sorted(bad):
            message = _bad_accuracy(names[i], values[i], step)
            log.warning("%s; it is left out of the history", message)
            if self._bad_input is None:
                self._bad_input = message
        kept = [i for i in range(len(names)) if i not in bad]
        return [names[i] for i in kept], [values[i] for i in kept]

    def _check_divergence(self, bad_loss: tuple | None, bad_grads: tuple | None) -> None:
        """Report the block's first non-finite step (see the module docstring).

        A non-finite gradient norm under a finite loss is a divergence only if the weights
        are no longer finite: a loop with ``torch.amp.GradScaler`` produces such gradients
        on purpose and skips the step, which must not read as a diverged run. The weights are
        read for this only here, in the rare block that has such a step.
        """
        if bad_grads is not None and (bad_loss is None or bad_grads[0] < bad_loss[0]):
            if self._weights_finite():
                log.info(
                    "step %d: gradient norm %g, but the weights are finite (a skipped step, "
                    "as torch.amp.GradScaler does): not a divergence",
                    bad_grads[0],
                    bad_grads[3],
                )
            else:
                bad_loss = bad_grads
        if bad_loss is None:
            return
        step, epoch, loss, norm = bad_loss
        read = ", ".join(
            f"{name} {value:g}"
            for name, value in (("loss", loss), ("gradient norm", norm))
            if value is not None
        )
        message = (
            f"diverged at step {step}: {read}. Your loop's optimizer took that step (nbtrain "
            "cannot refuse a step in your loop), so the weights are unlikely to recover: stop "
            "the loop, lower the learning rate or clip the gradients, and run again."
        )
        detail = {"loss": loss, "grad_norm": norm}
        self.diverged_at, self.error, self.exception = step, message, None
        self._history.add_event(
            Event(step, epoch + 1, "diverged", f"diverged at step {step}", detail)
        )
        log.warning("%s", message)

    def _weights_finite(self) -> bool:
        params = self.probe.parameters
        if not params:
            return True
        device = self.probe.device
        checks = [torch.isfinite(p.detach()).all().to(device) for p in params]
        return bool(torch.stack(checks).all())

    def _record(
        self,
        step: int,
        epoch: int,
        names: list[str],
        values: list[float],
        stats: list[float],
        lr: float | None,
    ) -> None:
        step_names = [n for n in names if _table_of(n) == "step"]
        step_values = [v for n, v in zip(names, values) if _table_of(n) == "step"]
        if lr is not None and (step_names or stats):
            step_names.append("lr")
            step_values.append(lr)
        if stats:
            step_names += self.probe.columns
            step_values += stats
        if step_names:
            self._history.record_row("step", step, epoch, step_names, step_values)
        evals = {n: v for n, v in zip(names, values) if _table_of(n) == "eval"}
        if evals:
            self._history.record("eval", step, epoch, evals)

    @property
    def probe_layers(self) -> list[tuple[str, nn.Module]]:
        return self._layers

    @property
    def running(self) -> bool:
        return self.state in ("running", "paused")

    @property
    def ended(self) -> bool:
        """The run ended (finished, stopped, failed or diverged); `with watcher:` goes on."""
        return self.state in ENDED

    @property
    def findings(self) -> list:
        """No detectors watch your loop (nbtrain.diagnosis reads an Experiment's run)."""
        return []

    @property
    def pause_requested(self) -> bool:
        return self._pause_requested

    @property
    def in_force(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in LIVE_KEYS}

    @property
    def pending(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._pending)

    @property
    def steps_per_second(self) -> float | None:
        if self._started_at is None or not self.step_count:
            return None
        elapsed = (self._ended_at or time.perf_counter()) - self._started_at
        return self.step_count / elapsed if elapsed > 0 else None

    @property
    def progress(self) -> float:
        if self.state == "finished":
            return 1.0
        if not self.total_steps:
            return 0.0
        return min(1.0, self.step_count / self.total_steps)

    @property
    def target_epoch(self) -> int:
        return 0

    def report(self) -> ModelReport:
        """The watched layers: frozen ones are known now, unused ones after the first log."""
        from .foreign import LayerStatus

        seen = self.history.names("step")
        layers = []
        for (name, module), frozen in zip(self._layers, self.probe.frozen):
            params = list(module.parameters())
            status = "frozen" if frozen else "ok"
            if not frozen and f"grad_norm/{name}" in seen and len(self.history):
                last = self.history.last(f"grad_norm/{name}")
                if last is None or math.isnan(last):
                    status = "no gradient"
            layers.append(
                LayerStatus(
                    name,
                    type(module).__name__,
                    sum(p.numel() for p in params),
                    sum(p.numel() for p in params if p.requires_grad),
                    status,
                )
            )
        device = str(self.probe.device)
        return ModelReport(
            f"your loop over {type(self.model).__name__}", self.task, device, layers
        )

    def unavailable(self) -> dict[str, str]:
        """The panel's controls that cannot act on your loop, with the reason for each."""
        loop = "your loop drives the training; run it and call log() each step"
        reasons = {"start": loop, "step": loop, "reset": loop}
        reasons["clip"] = "your loop clips (or not) itself: call nn.utils.clip_grad_norm_"
        for name in ("dropout", "batchnorm", "activation", "skip"):
            reason = self.switches.unavailable(name) or (
                "works on nbtrain's built-in MLP only" if name in ("activation", "skip") else None
            )
            if reason:
                reasons[name] = reason
        if self.optimizer is None:
            reasons["lr"] = "pass optimizer= to watch() to change the learning rate"
        reasons["more"] = "your loop sets the optimizer, schedule, batches and the rest"
        if self.task == "regression":
            reasons["accuracy"] = "a regression has no accuracy: the panel shows the loss only"
        return reasons

    # Observers (the panel listens for "run_ended")

    def on(self, name: str, callback: Callable) -> Callable:
        self._observers[name].append(callback)
        return callback

    def off(self, name: str, callback: Callable) -> None:
        self._observers[name].remove(callback)

    def _emit(self, name: str, payload: Any = None) -> None:
        for callback in list(self._observers.get(name, ())):
            callback(self, payload)

    def _event(self, kind: str, label: str, detail: dict[str, Any] | None = None) -> Event:
        event = Event(self.step_count + 1, self.epoch_count + 1, kind, label, detail or {})
        self.history.add_event(event)
        return event

    # Controls (the panel's thread)

    def _checked_live(self, changes: dict[str, Any], owner: str, where: str) -> dict[str, Any]:
        """`changes` validated, and refused unless they are ``LIVE`` and can act here."""
        checked = check_changes(changes)
        reasons = self.unavailable()
        for name, value in checked.items():
            if name not in LIVE:
                raise ValueError(
                    f"{name!r} is {owner} to set; {where} set() can change {', '.join(LIVE)}"
                )
            if name in reasons:
                raise ValueError(f"{name}={value!r} cannot act here: {reasons[name]}")
        return checked

    def set(self, **changes: Any) -> None:
        """Queue ``dropout``, ``batchnorm`` or ``lr`` changes for your loop's next `log()`."""
        checked = self._checked_live(changes, "your loop's", "on a watched loop")
        with self._cond:
            self._pending.update(checked)
            if not self.running:
                self._apply_pending()

    def pause(self) -> None:
        """Hold your loop inside its next `log()` until `resume()` or `stop()`."""
        with self._cond:
            self._pause_requested = True
            self._pause_thread = threading.get_ident()

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask your loop to stop: `should_stop` becomes True (and a paused loop goes on)."""
        with self._cond:
            self.should_stop = True
            self._pause_requested = False
            self._cond.notify_all()

    # Your loop's thread

    def log(self, step: int | None = None, epoch: int | None = None, **metrics: Any) -> None:
        """Record metrics for `step` (default: the previous step + 1) and the gradients
        your loop produced since the last call. Values may be numbers or 0-d tensors.

        ``loss``/``train_loss`` go to the loss plot; ``val_loss`` is the validation line;
        ``val_acc`` and ``train_acc`` go to the accuracy plot. Changes queued from the
        panel take effect here, between your steps.

        Steps count from 1 and go up across epochs; only evaluations (``val_*``,
        ``train_acc``) may repeat the last step, as a validation after it does. Accuracies
        must be in [0, 1] (a tensor one is checked when read, and raised at the next call).
        After the run ended, log() raises: a new ``with watcher:`` goes on with it.
        """
        if self.ended:
            raise RuntimeError(
                f"log() after the run ended ({self.state} at step {self.step_count}); to go "
                "on with the same history, log inside a new `with watcher:` block (steps "
                f"then go on from {self.step_count + 1})"
            )
        if self._bad_input is not None:
            message, self._bad_input = self._bad_input, None
            raise ValueError(message)
        if step is None:
            step = self.step_count + 1
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 1:
            raise ValueError(f"step must be an integer >= 1 (steps count from 1), got {step!r}")
        step = int(step)
        if epoch is not None and (
            not isinstance(epoch, numbers.Integral) or isinstance(epoch, bool) or epoch < 0
        ):
            raise ValueError(f"epoch must be None or an integer >= 0, got {epoch!r}")

        # Numbers are kept as they are; tensors and gradient statistics stay on the device,
        # packed into one tensor that the next flush() reads (no sync here).
        names = [ALIASES.get(name, name) for name in metrics]
        values = list(metrics.values())
        tensor_at = []
        for index, (name, value) in enumerate(zip(metrics, values)):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                tensor_at.append(index)
            elif isinstance(value, (int, float)):
                values[index] = float(value)
            else:
                raise ValueError(
                    f"metric {name!r} must be a number or a one-element tensor, got {value!r:.60}"
                )
            if index not in tensor_at and _is_accuracy(names[index]):
                if not 0 <= values[index] <= 1:
                    raise ValueError(_bad_accuracy(name, value, step))
        # Steps only go up: a step repeats only to add evaluations (val_*, train_acc) to it.
        per_step = bool(self._grads) or any(_table_of(n) == "step" for n in names)
        if step < self.step_count or (per_step and step <= self._last_row_step):
            last = max(self.step_count, self._last_row_step)
            raise ValueError(
                f"step must be greater than the last logged step {last}, got {step} (only "
                "evaluations such as val_loss, val_acc may repeat a step); count steps across "
                "epochs, e.g. a counter that goes on from one epoch to the next, or leave "
                "step out to count from the last one"
            )
        if self.state == "idle":
            self._begin()
        if epoch is not None:
            self.epoch_count = int(epoch)
        grads, self._grads = self._grads, {}
        device = self.probe.device
        parts = [
            values[i].detach().float().reshape(1).to(device, non_blocking=True) for i in tensor_at
        ]
        if grads:
            parts.append(self.probe.measure_raw(grads_by_id=grads).float().to(device))
        packed = torch.cat(parts) if parts else None
        lr = None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])
        record = (step, self.epoch_count, names, values, tensor_at, bool(grads), lr, packed)
        with self._unread_lock:
            self._unread.append(record)
        self.step_count = step
        if per_step:
            self._last_row_step = step
        if len(self._unread) >= 1000:  # nobody reads (no panel): bound what waits
            self.flush()

        # A boundary: queued changes land, and a pause holds the loop here.
        if self._pending:
            self._apply_pending()
        self._hold_if_paused()

    def _begin(self) -> None:
        self.state = "running"
        self.should_stop = False
        self.error = self.exception = self.diverged_at = None
        self._started_at, self._ended_at = time.perf_counter(), None
        self._event("started", "start")
        self._emit("run_started")

    def _hold_if_paused(self) -> None:
        if not self._pause_requested:
            return
        with self._cond:
            if self._pause_thread == threading.get_ident():
                return  # paused from this very thread: waiting would wait forever
            self.state = "paused"
            self._event("paused", "pause")
            self._cond.wait_for(lambda: not self._pause_requested or self.should_stop)
            self.state = "running"
            self._event("resumed", "resume")

    def _apply_pending(self) -> None:
        with self._cond:
            changes, self._pending = self._pending, {}
        for name, value in changes.items():
            old = getattr(self.config, name)
            if old == value:
                continue
            self.config = self.config.replace(**{name: value})
            if name == "dropout":
                self.switches.set_dropout(value)
            elif name == "batchnorm":
                self.switches.set_batchnorm(value)
            elif name == "lr" and self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = value
            label = f"{name} {_format(old)}→{_format(value)}"
            self._event("change", label, {"name": name, "old": old, "new": value})

    def finish(self, error: BaseException | None = None) -> None:
        """End the run: "failed" with an error, "diverged" if a non-finite step was read,
        "stopped" if Stop was asked, else "finished".

        The event at the end says how your loop ended (finished, stopped or failed); the
        state says how the run went. A bad tensor metric read only now is raised here
        (after the run has ended), unless your loop is failing with an error of its own.
        """
        self._end(error, raise_bad_input=error is None)

    def _end(self, error: BaseException | None, raise_bad_input: bool) -> None:
        if not self.running:
            return
        self.flush()
        ended = "failed" if error else "stopped" if self.should_stop else "finished"
        outcome = "diverged" if ended != "failed" and self.diverged_at is not None else ended
        self._ended_at = time.perf_counter()
        if error is not None:
            self.exception = error
            self.error = "".join(traceback.format_exception(error))
        self.state = outcome
        self._event(ended, ended if not error else f"failed: {error!r:.60}")
        self._emit("run_ended", outcome)
        if self._bad_input is not None and raise_bad_input:
            message, self._bad_input = self._bad_input, None
            raise ValueError(message)

    def close(self) -> None:
        """Remove the gradient hooks (the model trains on, unwatched)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Watcher:
        """Start the run, or go on with an ended one: a new segment of the same history
        (its steps go on from the last one)."""
        if not self.running:
            self._begin()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        # A KeyboardInterrupt ends the run as it would have, and is not masked by a
        # bad-input error.
        self._end(error if isinstance(error, Exception) else None, raise_bad_input=kind is None)

    # Display

    @property
    def dashboard(self) -> Any:
        """The panel for this loop, made on first use."""
        if self._dashboard is None:
            from .panel import Dashboard

            self._dashboard = Dashboard(self)
        return self._dashboard

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.dashboard)

    def __repr__(self) -> str:
        return f"nbtrain.Watcher({type(self.model).__name__})"


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    task: str = "classification",
    total_steps: int | None = None,
) -> Watcher:
    """Watch your own training loop: returns a `Watcher`; display it for the panel.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> watcher = watch(model)
    >>> loss = model(torch.randn(4, 3)).square().mean()
    >>> loss.backward()
    >>> watcher.log(step=1, loss=loss)
    >>> watcher.history.last("train_loss") == loss.item()
    True
    """
    return Watcher(model, optimizer, task=task, total_steps=total_steps)
