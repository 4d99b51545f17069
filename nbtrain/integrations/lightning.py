"""PyTorch Lightning: a callback that streams a Trainer's run into an nbtrain panel.

    from nbtrain.integrations.lightning import NbtrainCallback

    callback = NbtrainCallback(module)         # module: your LightningModule
    callback.dashboard                         # the panel (display it)
    Trainer(callbacks=[callback], ...).fit(module, train_loader, val_loader)

What streams: per optimizer step the loss your ``training_step`` returns, the learning rate
and the gradient flow of the module's own layers (measured in ``on_before_optimizer_step``,
after accumulation and before clipping, on the device; read with the loss in one host
transfer per step); per validation, the metrics you ``self.log`` whose names start with
``val_`` (``val_loss``, ``val_acc``) and ``train_acc``.

What the panel controls: Pause holds the training between two steps, Stop ends it (the
Trainer's ``should_stop``), and the dropout, batch-norm and learning-rate switches act on
the LightningModule's own modules and on the Trainer's optimizers.

Several processes (DDP): only rank 0 measures and streams; the other ranks measure nothing
and record nothing. To stay in step, every rank takes the panel's decisions (changes, stop)
from rank 0 through one small ``strategy.broadcast`` at the start of each training batch;
while paused, rank 0 waits for Resume and the others wait in that broadcast. When rank 0
is a child process (``ddp_spawn``, ``ddp_notebook``), its records reach the panel through a
multiprocessing queue and the panel's requests go back through another.

Lightning is an optional extra: ``pip install nbtrain[lightning]``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbtrain.integrations.lightning needs Lightning: pip install 'nbtrain[lightning]' "
        "(or pip install lightning)"
    ) from exc

from ..engine import _format
from ..external import Watcher, _table_of
from ..foreign import Switches, probe_layers
from ..gradients import GradientProbe

log = logging.getLogger(__name__)

__all__ = ["LightningRun", "NbtrainCallback"]


class LightningRun(Watcher):
    """The panel's view of a Lightning run: a `Watcher` whose records come from rank 0 and
    whose controls (set, pause, resume, stop) are sent to it."""

    def __init__(self, module: torch.nn.Module, callback: NbtrainCallback, task: str) -> None:
        super().__init__(module, None, task=task)
        self.close()  # no hooks here: rank 0 measures the gradients itself
        self._callback = callback
        self._ended = threading.Event()

    def unavailable(self) -> dict[str, str]:
        reasons = super().unavailable()
        fit = "the Trainer drives the training: call trainer.fit(...)"
        reasons.update(start=fit, step=fit, reset=fit)
        reasons["clip"] = "clipping is the Trainer's: Trainer(gradient_clip_val=...)"
        reasons.pop("lr", None)  # the Trainer's optimizers are reachable
        reasons["more"] = "the LightningModule and the Trainer set everything else"
        return reasons

    def set(self, **changes: Any) -> None:
        """Queue ``dropout``, ``batchnorm`` or ``lr`` for every rank's next training batch."""
        checked = self._checked_live(changes, "the Trainer's", "from the panel")
        with self._cond:
            self._pending.update(checked)
        self._callback._send(("set", checked))

    def pause(self) -> None:
        self._pause_requested = True
        self._callback._send(("pause",))

    def resume(self) -> None:
        self._pause_requested = False
        self._callback._send(("resume",))

    def stop(self) -> None:
        self.should_stop = True
        self._pause_requested = False
        self._callback._send(("stop",))

    def log(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a Lightning run records itself; log() is for your own loop")

    def wait(self, timeout: float | None = None) -> bool:
        """Until rank 0's last record has arrived (the run ended); True if it has."""
        return self._ended.wait(timeout)

    def _apply(self, record: tuple) -> None:
        """One record from rank 0, in the order rank 0 made them."""
        kind = record[0]
        if kind == "row":
            _, table, step, epoch, names, values = record
            self.history.record_row(table, step, epoch, names, values)
            if table == "step":
                self.step_count = max(self.step_count, step)
            self.epoch_count = epoch
        elif kind == "state":
            _, state, event, error = record
            if event == "started":
                self._started_at, self._ended_at = time.perf_counter(), None
                self._ended.clear()
                self.should_stop = False
            self.state = state
            if error:
                self.error = error
            labels = {"started": "start", "paused": "pause", "resumed": "resume"}
            label = labels.get(event, event)
            if event == "failed" and error:
                label = f"failed: {error.strip().splitlines()[-1]:.60}"
            self._event(event, label)
            if state in ("finished", "stopped", "failed"):
                self._ended_at = time.perf_counter()
                self._ended.set()
                self._emit("run_ended", state)
        elif kind == "applied":
            _, name, old, new = record
            with self._cond:
                self._pending.pop(name, None)
            self.config = self.config.replace(**{name: new})
            label = f"{name} {_format(old)}→{_format(new)}"
            self._event("change", label, {"name": name, "old": old, "new": new})


class NbtrainCallback(pl.Callback):
    """Stream a Lightning Trainer's metrics and gradient flow into an nbtrain panel.

    Parameters:
        module: the LightningModule you will fit (its layers name the gradient plots).
        task: ``"classification"`` (accuracy plot) or ``"regression"`` (loss only).
    """

    def __init__(self, module: pl.LightningModule, task: str = "classification") -> None:
        super().__init__()
        self.run = LightningRun(module, self, task)
        self._main_pid = os.getpid()
        # Spawn-context queues: they can be handed to spawned and to forked ranks alike.
        context = multiprocessing.get_context("spawn")
        self._records: Any = context.Queue()
        self._controls: Any = context.Queue()
        self._drain = threading.Thread(
            target=self._drain_records, name="nbtrain-lightning", daemon=True
        )
        self._drain.start()
        self._dashboard: Any = None
        self._reset_rank_state()

    def _reset_rank_state(self) -> None:
        self._probe: GradientProbe | None = None
        self._switches: Switches | None = None
        self._stats: torch.Tensor | None = None
        self._paused = False
        self._stop = False
        self._changes: dict[str, Any] = {}
        self._last_step = -1

    @property
    def dashboard(self) -> Any:
        """The panel for this run, made on first use (in the notebook's process)."""
        if self._dashboard is None:
            from ..panel import Dashboard

            self._dashboard = Dashboard(self.run)
        return self._dashboard

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.dashboard)

    # Pickling for spawned ranks: only the queues and the settings travel.

    def __getstate__(self) -> dict[str, Any]:
        keep = ("_main_pid", "_records", "_controls")
        state = {key: self.__dict__[key] for key in keep}
        state["_task"] = self.run.task
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        task = state.pop("_task")
        self.__dict__.update(state)
        self.run = None  # type: ignore[assignment]  # the panel lives in the main process
        self._task = task
        self._dashboard = None
        self._reset_rank_state()

    # Between the processes

    @property
    def _in_main(self) -> bool:
        return os.getpid() == self._main_pid and self.run is not None

    def _record(self, record: tuple) -> None:
        """Rank 0's record: straight into the panel's run, or onto the queue to it."""
        if self._in_main:
            self.run._apply(record)
        else:
            self._records.put(record)

    def _drain_records(self) -> None:
        while True:
            record = self._records.get()
            try:
                self.run._apply(record)
            except Exception:
                log.exception("could not record %r", record[:2])

    def _send(self, control: tuple) -> None:
        self._controls.put(control)

    def _take_controls(self, block: bool) -> None:
        """Rank 0: apply the panel's requests; with `block`, wait for the next one."""
        while True:
            try:
                control = self._controls.get(timeout=0.5) if block else self._controls.get_nowait()
            except queue.Empty:
                return
            block = False
            kind = control[0]
            if kind == "set":
                self._changes.update(control[1])
            elif kind == "pause":
                self._paused = True
            elif kind == "resume":
                self._paused = False
            elif kind == "stop":
                self._stop, self._paused = True, False

    # Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reset_rank_state()
        self._switches = Switches(pl_module)
        if trainer.is_global_zero:
            self._probe = GradientProbe(pl_module, probe_layers(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._record(("state", "running", "started", None))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Rank 0 decides (waiting here while paused); every rank applies the same decision.
        decision = None
        if trainer.is_global_zero:
            self._take_controls(block=False)
            if self._paused:
                self._record(("state", "paused", "paused", None))
                while self._paused and not self._stop:
                    self._take_controls(block=True)
                self._record(("state", "running", "resumed", None))
            decision = {"changes": self._changes, "stop": self._stop}
            self._changes = {}
        decision = trainer.strategy.broadcast(decision, src=0)
        for name, value in decision["changes"].items():
            old = self._apply_change(trainer, name, value)
            if trainer.is_global_zero:
                self._record(("applied", name, old, value))
        if decision["stop"]:
            trainer.should_stop = True

    def _apply_change(self, trainer: pl.Trainer, name: str, value: Any) -> Any:
        switches = self._switches
        assert switches is not None
        if name == "dropout":
            old = switches.dropout_rate
            switches.set_dropout(value)
        elif name == "batchnorm":
            old = switches.batchnorm_on
            switches.set_batchnorm(value)
        else:
            old = trainer.optimizers[0].param_groups[0]["lr"]
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = value
        return old

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._probe is not None:
            self._stats = self._probe.measure_raw()  # per-tensor norms, on the device: no sync

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._probe is None or self._stats is None or trainer.global_step == self._last_step:
            return  # not rank 0, or no optimizer step yet (gradient accumulation)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        raw, self._stats = self._stats, None
        parts = [raw.float()]
        if isinstance(loss, torch.Tensor):
            parts.insert(0, loss.detach().float().reshape(1).to(raw.device))
        block = torch.cat(parts).cpu()  # the step's one host transfer
        values = self._probe.combine(block[-self._probe.raw_width :])[0].tolist()
        names = list(self._probe.columns)
        if isinstance(loss, torch.Tensor):
            names.insert(0, "train_loss")
            values.insert(0, float(block[0]))
        names.append("lr")
        values.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        self._last_step = trainer.global_step
        self._record(("row", "step", trainer.global_step, trainer.current_epoch, names, values))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if _table_of(name) == "eval" and isinstance(value, torch.Tensor) and value.numel() == 1
        }
        if metrics:
            values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
            row = ("row", "eval", trainer.global_step, trainer.current_epoch)
            self._record((*row, list(metrics), values.tolist()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            outcome = "stopped" if self._stop else "finished"
            self._record(("state", outcome, outcome, None))

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            text = "".join(traceback.format_exception(exception))
            self._record(("state", "failed", "failed", text))
