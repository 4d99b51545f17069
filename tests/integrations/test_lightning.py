"""Issue 6: the Lightning callback, in one process and under DDP with two CPU processes."""

import math
import threading
import time

import pytest
import torch
from torch import nn

pl = pytest.importorskip(
    "lightning.pytorch", reason="lightning is not installed (pip install 'nbtrain[lightning]')"
)

from nbtrain.integrations.lightning import NbtrainCallback  # noqa: E402


class Classifier(pl.LightningModule):
    """A small classifier with dropout and batch norm, logging val_loss, val_acc and the
    dropout rate each rank trains with (mean over ranks: it shows every rank's switch)."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y), sync_dist=True)
        self.log("val_acc", (out.argmax(1) == y).float().mean(), sync_dist=True)
        self.log("val_dropout_p", float(self.body[3].p), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loaders():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = torch.randn(96, 8, generator=g) + 2.0 * nn.functional.one_hot(y, 8).float()
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    val = torch.utils.data.DataLoader(data, batch_size=48)
    return train, val


def _trainer(callback, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=[callback], **options)


def test_one_process_streams_loss_gradient_flow_and_validation_from_the_first_step():
    torch.manual_seed(0)
    module = Classifier()
    callback = NbtrainCallback(module)
    _trainer(callback, max_epochs=2).fit(module, *_loaders())
    run = callback.run
    assert run.wait(10) and run.state == "finished"
    steps, loss = run.history.series("train_loss")
    assert steps.tolist() == list(range(1, 13))  # 6 batches x 2 epochs, each step once
    assert all(math.isfinite(v) for v in loss)
    names = run.probe.layer_names
    assert names == ["body.0", "head"]  # the module's own names; batch norm in the total
    for name in names:
        s, g = run.history.series(f"grad_norm/{name}")
        assert s[0] == 1 and (g > 0).all()
    eval_steps, acc = run.history.series("val_acc")
    assert eval_steps.tolist() == [6, 12] and 0 <= acc[-1] <= 1
    assert [e.kind for e in run.history.events] == ["started", "finished"]


def test_pause_holds_the_trainer_and_stop_ends_it_and_switches_act_on_the_module():
    torch.manual_seed(0)
    module = Classifier()
    callback = NbtrainCallback(module)
    run = callback.run
    trainer = _trainer(callback, max_epochs=1000)
    worker = threading.Thread(target=trainer.fit, args=(module, *_loaders()), daemon=True)
    run.set(dropout=0.0, batchnorm=False, lr=0.01)
    worker.start()
    deadline = time.monotonic() + 60
    while run.step_count < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    run.pause()
    while run.state != "paused" and time.monotonic() < deadline:
        time.sleep(0.02)
    held = run.step_count
    time.sleep(0.3)
    assert run.state == "paused" and run.step_count == held
    run.resume()
    while run.step_count <= held + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    run.stop()
    worker.join(60)
    assert not worker.is_alive() and run.wait(10) and run.state == "stopped"
    assert trainer.global_step < 1000 * 6
    assert module.body[3].p == 0.0 and trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    # Batch norm bypassed: its scale got no gradient, and its running mean did not move.
    assert module.body[1].weight.grad is None or module.body[1].weight.grad.abs().sum() == 0
    assert torch.equal(module.body[1].running_mean, torch.zeros(16))
    kinds = [e.kind for e in run.history.events]
    assert kinds[:4] == ["started", "change", "change", "change"]  # taken at the first batch
    assert kinds[4:] == ["paused", "resumed", "stopped"]
    assert run.in_force["dropout"] == 0.0 and run.pending == {}


@pytest.mark.slow
def test_ddp_with_two_processes_streams_rank_zero_only_and_every_rank_takes_the_switches():
    torch.manual_seed(0)
    module = Classifier(dropout=0.5)
    callback = NbtrainCallback(module)
    run = callback.run
    run.set(dropout=0.0)  # taken by rank 0 at the first batch, broadcast to rank 1
    trainer = _trainer(callback, devices=2, strategy="ddp_spawn", max_epochs=2)
    trainer.fit(module, *_loaders())
    assert run.wait(30) and run.state == "finished"
    steps, _ = run.history.series("train_loss")
    # 96 samples over 2 ranks in batches of 16: 3 steps an epoch; each step once (rank 0).
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]
    _, grad = run.history.series("grad_norm/body.0")
    assert len(grad) == 6 and (grad > 0).all()
    # The dropout rate, averaged over both ranks by Lightning: 0 only if both switched.
    _, p = run.history.series("val_dropout_p")
    assert p.tolist() == [0.0, 0.0]
    assert [e.label for e in run.history.changes()] == ["dropout 0.5→off"]
