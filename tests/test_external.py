"""Issue 6: your own loop, watched with nbtrain.watch(model)."""

import threading
import time

import pytest
import torch
from torch import nn

import nbtrain


def _setup(small_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), small_data


def _one_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    norms = [p.grad.norm().item() for p in model.parameters()]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # before log(): the hooks kept the gradients
    return loss, norms


def test_your_loop_gets_the_same_plots_with_gradients_from_the_first_step(small_data):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    dash = watcher.dashboard
    try:
        for step in range(1, 6):
            loss, norms = _one_step(model, optimizer, x, y)
            dash.log(step=step, loss=loss)
            first_layer = (norms[0] ** 2 + norms[1] ** 2) ** 0.5
            assert watcher.history.last("grad_norm/0") == pytest.approx(first_layer, rel=1e-5)
        watcher.log(step=5, val_loss=0.5, val_acc=0.8)
        watcher.finish()
        dash.refresh()
        steps, losses = watcher.history.series("train_loss")
        assert steps.tolist() == [1, 2, 3, 4, 5] and losses[-1] < losses[0]
        assert watcher.probe.layer_names == ["0", "3"]
        assert list(dash.loss.raw.x) == [1, 2, 3, 4, 5] and list(dash.accuracy.val.y) == [0.8]
        assert dash.gradients.norms.y.shape == (2, 5)
        assert dash.start_button.disabled and "your loop drives" in dash.start_button.tooltip
        assert dash.step_button.disabled and dash.reset_button.disabled
        assert watcher.state == "finished" and "finished" in dash.status.value
    finally:
        dash.close()


def test_panel_changes_land_at_your_next_log_and_others_are_refused(small_data):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    watcher.log(step=1, loss=1.0)
    watcher.set(dropout=0.5, lr=0.01)
    assert model[2].p == 0.1 and watcher.pending == {"dropout": 0.5, "lr": 0.01}
    watcher.log(step=2, loss=0.9)
    assert model[2].p == 0.5 and optimizer.param_groups[0]["lr"] == 0.01
    assert [e.label for e in watcher.history.changes()] == ["dropout 0.1→0.5", "lr 0.1→0.01"]
    with pytest.raises(ValueError, match="'clip' is your loop's to set"):
        watcher.set(clip=1.0)
    with pytest.raises(ValueError, match="batchnorm=True cannot act here: .*no nn.BatchNorm"):
        watcher.set(batchnorm=True)
    with pytest.raises(ValueError, match="'optimizer' is your loop's to set"):
        watcher.set(optimizer="adam")
    with pytest.raises(ValueError, match="metric 'note' must be a number"):
        watcher.log(step=3, note="hello")


def test_pause_holds_your_loop_in_log_and_stop_sets_should_stop(small_data):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)

    def loop():
        with watcher:
            for step in range(1, 100_000):
                loss, _ = _one_step(model, optimizer, x, y)
                watcher.log(step=step, loss=loss)
                if watcher.should_stop:
                    break

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    while watcher.step_count < 3:
        time.sleep(0.01)
    watcher.pause()
    deadline = time.monotonic() + 10
    while watcher.state != "paused" and time.monotonic() < deadline:
        time.sleep(0.01)
    held = watcher.step_count
    time.sleep(0.2)
    assert watcher.state == "paused" and watcher.step_count == held
    watcher.resume()
    while watcher.step_count <= held + 2:
        time.sleep(0.01)
    watcher.stop()
    worker.join(10)
    assert not worker.is_alive() and watcher.state == "stopped"
    assert [e.kind for e in watcher.history.events] == ["started", "paused", "resumed", "stopped"]


def test_an_exception_in_your_loop_fails_the_run_visibly(small_data):
    model, optimizer, _ = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    with pytest.raises(RuntimeError, match="boom"):
        with watcher:
            watcher.log(step=1, loss=1.0)
            raise RuntimeError("boom")
    assert watcher.state == "failed" and "RuntimeError: boom" in watcher.error
    assert watcher.history.last("train_loss") == 1.0


def test_frozen_and_unused_layers_of_a_watched_model_are_labelled(small_data):
    x, y = small_data
    model = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 3), "c": nn.Linear(8, 3)})
    model["c"].requires_grad_(False)
    watcher = nbtrain.watch(model)
    assert watcher.report().status == {"a": "ok", "b": "ok", "c": "frozen"}
    loss = nn.functional.cross_entropy(model["a"](x) + model["c"](x), y)
    loss.backward()
    watcher.log(step=1, loss=loss)
    assert watcher.report().status == {"a": "ok", "b": "no gradient", "c": "frozen"}
    dash = watcher.dashboard
    try:
        dash.refresh()
        assert list(dash.gradients.bars.x) == ["a", "b (no gradient)", "c (frozen)"]
    finally:
        dash.close()


class _CountReads:
    """Counts device-to-host reads (tolist, item) while active: the syncs on a GPU."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_host_reads_one_per_panel_update_for_your_loop_none_per_engine_step(
    small_data, monkeypatch
):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    # SGD: Adam reads its step counter with item(), from a CPU tensor (not a device sync).
    exp = nbtrain.Experiment(model=nn.Linear(8, 3), train_data=small_data, optimizer="sgd")
    exp.step()  # the first step includes the pre-training layer check and an evaluation
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    reads = _CountReads(monkeypatch)
    for step in (1, 2, 3):  # your loop: log() leaves everything on the device
        watcher.log(step=step, loss=loss, val_acc=torch.tensor(0.5))
    assert reads.count == 0
    assert len(watcher.history) == 3 and reads.count == 1  # the panel's read: all at once
    try:
        # The engine buffers its rows on the device too, flushed in blocks; one read a step
        # remains, of two numbers: the step is refused before the optimizer if they are not
        # finite (issue 9), which a check at the next flush would be too late for.
        exp._train_step()
        assert reads.count == 2
    finally:
        exp.stop()  # step() left a paused worker


def _nan_from(model, optimizer, x, y, watcher, bad_from, steps, check=None):
    """Your loop, whose loss turns NaN at step `bad_from` (its optimizer steps on)."""
    with watcher:
        for step in range(1, steps + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            if step >= bad_from:
                loss = loss * float("nan")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.log(step=step, loss=loss)
            if check is not None:
                check(step)


def test_a_nan_loss_in_your_loop_is_reported_at_its_step_in_the_panel(small_data, caplog):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer, total_steps=40)
    dash = watcher.dashboard
    seen = {}

    def check(step):
        if step == 25:  # the panel's read finds it; your loop is still running
            dash.refresh()
            seen.update(state=watcher.state, at=watcher.diverged_at, status=dash.status.value)
            seen.update(error=dash.error_area.value, style=dash.progress.bar_style)

    try:
        with caplog.at_level("WARNING", logger="nbtrain.external"):
            _nan_from(model, optimizer, x, y, watcher, bad_from=20, steps=40, check=check)
        assert seen["state"] == "running" and seen["at"] == 20
        assert "diverged at step 20" in seen["status"] and seen["style"] == "warning"
        assert "Your loop diverged" in seen["error"] and "loss nan" in seen["error"]
        assert watcher.state == "diverged" and watcher.diverged_at == 20
        assert watcher.error.startswith("diverged at step 20: loss nan, gradient norm nan.")
        assert "cannot refuse a step in your loop" in watcher.error
        diverged = [e for e in watcher.history.events if e.kind == "diverged"]
        assert [(e.step, e.label) for e in diverged] == [(20, "diverged at step 20")]
        assert diverged[0] in watcher.history.markers()  # the plots mark it
        assert [e.kind for e in watcher.history.events] == ["started", "diverged", "finished"]
        assert sum("diverged at step 20" in r.getMessage() for r in caplog.records) == 1
        steps, losses = watcher.history.series("train_loss")
        assert len(steps) == 40 and torch.isnan(torch.as_tensor(losses[19:])).all()
        assert not watcher.should_stop  # reported, not stopped: should_stop is the Stop button
        dash.refresh()
        assert "<b>diverged</b>" in dash.status.value and "Your loop diverged" in (
            dash.error_area.value
        )
    finally:
        dash.close()


@pytest.mark.parametrize("applied", [True, False])
def test_a_non_finite_gradient_diverges_only_if_your_optimizer_applied_it(small_data, applied):
    # False: what torch.amp.GradScaler does with an overflowing step (skips it).
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    with watcher:
        for step in range(1, 6):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if step == 3:
                model[0].weight.grad.fill_(float("inf"))  # the loss is finite
            grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
            if applied or grads_finite:
                optimizer.step()
            watcher.log(step=step, loss=loss)
    steps, losses = watcher.history.series("train_loss")
    if applied:
        assert watcher.state == "diverged" and watcher.diverged_at == 3
        assert watcher.error.startswith("diverged at step 3: loss ")
        assert "gradient norm inf" in watcher.error
    else:
        assert watcher.state == "finished" and watcher.diverged_at is None
        assert watcher.error is None and torch.isfinite(torch.as_tensor(losses)).all()
    assert watcher.history.series("grad_norm")[1][2] == float("inf")


def test_steps_must_count_up_from_one_across_epochs(small_data):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    with pytest.raises(
        ValueError, match=r"step must be an integer >= 1 \(steps count from 1\), got 0"
    ):
        watcher.log(step=0, loss=1.0)
    with pytest.raises(ValueError, match="step must be an integer >= 1 .*got 2.5"):
        watcher.log(step=2.5, loss=1.0)
    with pytest.raises(ValueError, match="epoch must be None or an integer >= 0, got -1"):
        watcher.log(step=1, epoch=-1, loss=1.0)
    # enumerate(loader, 1) inside an epoch loop: the second epoch starts at 1 again.
    for step in range(1, 4):
        _one_step(model, optimizer, x, y)
        watcher.log(step=step, epoch=0, loss=1.0)
    watcher.log(step=3, val_loss=0.9, val_acc=0.5)  # an evaluation may share its step
    with pytest.raises(
        ValueError,
        match=r"step must be greater than the last logged step 3, got 1 \(only evaluations "
        r"such as val_loss, val_acc may repeat a step\); count steps across epochs",
    ):
        watcher.log(step=1, epoch=1, loss=1.0)
    with pytest.raises(ValueError, match="greater than the last logged step 3, got 3"):
        watcher.log(step=3, loss=1.0)  # a second loss for step 3
    _one_step(model, optimizer, x, y)
    with pytest.raises(ValueError, match="greater than the last logged step 3, got 3"):
        watcher.log(step=3, val_acc=0.5)  # new gradients make a per-step row
    with pytest.raises(ValueError, match="greater than the last logged step 3, got 2"):
        watcher.log(step=2, val_acc=0.5)
    watcher.log(loss=1.0)  # leaving step out counts on (and takes the waiting gradients)
    assert watcher.history.series("train_loss")[0].tolist() == [1, 2, 3, 4]
    assert watcher.history.series("val_acc")[0].tolist() == [3]


def test_accuracies_must_be_fractions(small_data):
    model, optimizer, _ = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    with pytest.raises(
        ValueError,
        match=r"metric 'val_acc' must be an accuracy in \[0, 1\], got 2.0 at step 1 "
        r"\(a percentage\? divide it by 100\)",
    ):
        watcher.log(step=1, val_acc=2.0)
    with pytest.raises(
        ValueError, match=r"metric 'acc' must be an accuracy in \[0, 1\], got -0.1"
    ):
        watcher.log(step=1, acc=-0.1)
    # A tensor is read only at the next flush: left out, then raised at the next log().
    watcher.log(step=1, loss=1.0, val_acc=torch.tensor(76.0), val_loss=torch.tensor(0.5))
    assert watcher.history.names("eval") == ["val_loss"]
    with pytest.raises(ValueError, match=r"'val_acc' must be an accuracy .*got 76.0 at step 1"):
        watcher.log(step=2, loss=0.9)
    watcher.log(step=2, loss=0.9)  # raised once; your loop may go on
    # ... or at the end of the run, once it has ended.
    with pytest.raises(ValueError, match=r"'train_acc' must be an accuracy .*got 1.5 at step 3"):
        with watcher:
            watcher.log(step=3, loss=0.8, train_acc=torch.tensor(1.5))
    assert watcher.state == "finished" and watcher.history.last("train_loss") == pytest.approx(0.8)


def test_log_after_the_run_ended_is_refused_and_a_new_with_block_goes_on(small_data):
    model, optimizer, (x, y) = _setup(small_data)
    watcher = nbtrain.watch(model, optimizer)
    with watcher:
        for step in (1, 2):
            loss, _ = _one_step(model, optimizer, x, y)
            watcher.log(step=step, loss=loss)
    with pytest.raises(
        RuntimeError,
        match=r"log\(\) after the run ended \(finished at step 2\); to go on with the same "
        r"history, log inside a new `with watcher:` block \(steps then go on from 3\)",
    ):
        watcher.log(step=3, loss=1.0)
    assert watcher.state == "finished"
    with watcher:  # the restart path: the same history, steps going on
        assert watcher.state == "running"
        loss, _ = _one_step(model, optimizer, x, y)
        watcher.log(loss=loss)
    assert watcher.state == "finished" and watcher.history.series("train_loss")[0].tolist() == [
        1,
        2,
        3,
    ]
    kinds = [e.kind for e in watcher.history.events]
    assert kinds == ["started", "finished", "started", "finished"]
