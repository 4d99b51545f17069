import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from nbtrain import Experiment, evaluate


def test_default_experiment_is_the_course_starting_point():
    exp = Experiment()
    cfg = exp.config
    assert (
        cfg.hidden,
        cfg.activation,
        cfg.init,
        cfg.optimizer,
        cfg.lr,
        cfg.batch_size,
        cfg.seed,
    ) == ((128, 64, 32), "relu", "he", "adam", 1e-3, 64, 0)
    assert [name for name, _ in exp.model.named_layers()] == [
        "hidden1",
        "hidden2",
        "hidden3",
        "output",
    ]
    assert isinstance(exp.optimizer, torch.optim.Adam)


class _FixedLogits(nn.Module):
    """Predicts class 0 for the samples marked True, class 1 otherwise."""

    def __init__(self, predict_zero):
        super().__init__()
        self.predict_zero = predict_zero
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        index = x[:, 0].long()
        logits = torch.zeros(len(x), 2)
        logits[self.predict_zero[index], 0] = 5.0
        logits[~self.predict_zero[index], 1] = 5.0
        return logits + self.dummy


def test_accuracy_is_weighted_by_samples_not_a_mean_of_batch_means():
    # Five samples in batches of 4: 2 of the first 4 right, the last 1 right -> 3/5.
    x = torch.arange(5.0).reshape(5, 1)
    y = torch.tensor([0, 0, 0, 0, 0])
    model = _FixedLogits(torch.tensor([True, True, False, False, True]))
    loss, acc = evaluate(model, x, y, nn.CrossEntropyLoss(), batch_size=4)
    assert acc == pytest.approx(0.60)  # a mean of batch means would say 0.75
    expected = nn.CrossEntropyLoss(reduction="sum")(model(x), y).item() / 5
    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluation_restores_train_mode_and_changes_no_weights():
    exp = Experiment(epochs=1)
    before = [p.clone() for p in exp.model.parameters()]
    exp.model.train()
    evaluate(exp.model, exp.data.x_val, exp.data.y_val, exp.loss_fn, 64)
    assert exp.model.training
    assert all(torch.equal(a, b) for a, b in zip(before, exp.model.parameters()))


def test_recorded_gradient_norms_match_the_grads_the_optimizer_saw():
    exp = Experiment(epochs=1)
    seen = []

    def capture(optimizer, args, kwargs):
        layers = exp.model.named_layers()
        seen.append(
            [
                torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()
                for _, m in layers
            ]
        )

    exp.optimizer.register_step_pre_hook(capture)
    exp.run(epochs=1)
    names = [name for name, _ in exp.model.named_layers()]
    recorded = np.stack([exp.history.series(f"grad_norm/{n}")[1] for n in names], axis=1)
    np.testing.assert_allclose(recorded, np.array(seen), rtol=1e-5)


def test_clipping_bounds_the_norm_the_optimizer_step_sees():
    def norms_seen(clip):
        exp = Experiment(epochs=1, clip=clip, lr=0.01)
        seen = []
        exp.optimizer.register_step_pre_hook(
            lambda opt, a, k: seen.append(
                torch.cat([p.grad.flatten() for p in exp.model.parameters() if p.grad is not None])
                .norm()
                .item()
            )
        )
        exp.run()
        return np.array(seen), exp.history.series("grad_norm")[1]

    unclipped, _ = norms_seen(None)
    assert unclipped.max() > 0.5  # otherwise this test would prove nothing
    clipped, recorded = norms_seen(0.1)
    assert clipped.max() <= 0.1 * (1 + 1e-4)
    assert recorded.max() > 0.1  # the history keeps the norm before clipping


def test_set_during_a_run_lands_at_exactly_one_step_boundary_once():
    exp = Experiment(epochs=2)

    def change_at_five(e, _):
        if e.step_count == 5:
            e.set(lr=0.01, dropout=0.25)

    exp.on("step_completed", change_at_five)
    exp.run()
    changes = exp.history.changes()
    assert [(c.step, c.detail["name"]) for c in changes] == [(6, "lr"), (6, "dropout")]
    steps, lr = exp.history.series("lr")
    assert set(lr[steps <= 5]) == {1e-3} and set(lr[steps >= 6]) == {0.01}
    assert exp.config.dropout == 0.25 and exp.model.blocks[0].drop.p == 0.25


def test_set_from_another_thread_is_applied_once_between_steps():
    exp = Experiment(epochs=200)
    exp.start()
    while exp.step_count < 10:
        time.sleep(0.001)
    exp.set(lr=0.005)
    while exp.pending:
        time.sleep(0.001)
    exp.stop()
    changes = exp.history.changes()
    assert len(changes) == 1 and changes[0].detail == {"name": "lr", "old": 1e-3, "new": 0.005}
    steps, lr = exp.history.series("lr")
    switch = changes[0].step
    assert set(lr[steps < switch]) == {1e-3} and set(lr[steps >= switch]) == {0.005}


def test_set_when_idle_applies_now_and_is_in_force():
    exp = Experiment()
    exp.set(batchnorm=True, clip=1.0)
    assert exp.in_force["batchnorm"] is True and exp.in_force["clip"] == 1.0
    assert exp.model.blocks[0].use_norm
    assert [c.step for c in exp.history.changes()] == [1, 1]
    exp.set(clip=1.0)  # no change, no event
    assert len(exp.history.changes()) == 2


def test_same_seed_and_threads_give_the_same_history():
    a = Experiment(epochs=2, dropout=0.2, seed=3).run()
    b = Experiment(epochs=2, dropout=0.2, seed=3).run()
    c = Experiment(epochs=2, dropout=0.2, seed=4).run()
    assert np.array_equal(a.series("train_loss")[1], b.series("train_loss")[1])
    assert np.array_equal(a.series("val_acc")[1], b.series("val_acc")[1])
    assert not np.array_equal(a.series("train_loss")[1], c.series("train_loss")[1])


def test_stopping_and_starting_again_continues_the_same_run():
    whole = Experiment(epochs=3, dropout=0.2).run()
    split = Experiment(epochs=3, dropout=0.2)
    split.run(epochs=1)
    split.run(epochs=2)
    assert np.array_equal(whole.series("train_loss")[1], split.history.series("train_loss")[1])


def test_default_run_reaches_095_validation_accuracy():
    exp = Experiment()
    history = exp.run()
    assert exp.state == "finished"
    assert history.last("val_acc") >= 0.95
    steps, _ = history.series("val_acc")
    assert (
        steps[0] == 0 and len(steps) == exp.config.epochs + 1
    )  # before training, then each epoch
    assert len(history) == exp.step_count == exp.config.epochs * exp.steps_per_epoch


def test_eval_every_adds_evaluations_between_epochs():
    exp = Experiment(epochs=1, eval_every=5)
    exp.run()
    steps, _ = exp.history.series("val_loss")
    assert list(steps[:4]) == [0, 5, 10, 15] and steps[-1] == exp.step_count


def test_background_run_keeps_the_caller_free_and_pause_step_resume_stop_work():
    exp = Experiment(epochs=500)
    exp.start()
    time.sleep(0.05)
    assert exp.running  # start() returned while training goes on
    workers_before = threading.active_count()
    exp.start()  # a second start starts no second worker
    assert threading.active_count() == workers_before

    exp.pause()
    assert exp.state == "paused"
    frozen = exp.step_count
    time.sleep(0.05)
    assert exp.step_count == frozen
    exp.step()
    assert exp.step_count == frozen + 1 and exp.state == "paused"
    exp.resume()
    deadline = time.monotonic() + 10  # on a loaded machine the worker may take a while
    while exp.step_count <= frozen + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exp.step_count > frozen + 1
    exp.stop()
    assert exp.state == "stopped" and not exp.running
    assert not any(t.name == "nbtrain-training" for t in threading.enumerate())
    kinds = [e.kind for e in exp.history.events]
    assert kinds == ["started", "paused", "resumed", "stopped"]


def test_step_on_a_fresh_experiment_runs_one_step_and_stays_paused():
    exp = Experiment()
    exp.step()
    assert exp.step_count == 1 and exp.state == "paused"
    exp.stop()
    assert exp.state == "stopped"


def test_reset_starts_over_with_the_same_seed():
    exp = Experiment(epochs=1)
    first = exp.run().series("train_loss")[1]
    exp.reset()
    assert exp.step_count == 0 and len(exp.history) == 0 and exp.state == "idle"
    assert np.array_equal(exp.run().series("train_loss")[1], first)


def test_an_exception_in_user_code_fails_the_run_and_keeps_everything():
    exp = Experiment(epochs=5)
    exp.run(epochs=1)
    steps_before = len(exp.history)

    def broken(e, _):
        if e.step_count == steps_before + 3:
            raise RuntimeError("user hook broke")

    exp.on("step_completed", broken)
    exp.start()
    exp.wait(10)
    assert exp.state == "failed"
    assert "RuntimeError: user hook broke" in exp.error
    assert isinstance(exp.exception, RuntimeError)
    assert len(exp.history) == steps_before + 3
    assert exp.history.events[-1].kind == "failed"
    assert not exp.running
    exp.off("step_completed", broken)
    exp.run(epochs=1)  # the same experiment trains on
    assert exp.state == "finished"


def test_keyboard_interrupt_stops_a_blocking_run_cleanly():
    exp = Experiment(epochs=5)

    def interrupt(e, _):
        if e.step_count == 7:
            raise KeyboardInterrupt

    exp.on("step_completed", interrupt)
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert exp.state == "stopped" and len(exp.history) == 7 and not exp.running


def test_run_while_a_background_run_goes_is_refused():
    exp = Experiment(epochs=500)
    exp.start()
    try:
        with pytest.raises(RuntimeError, match="already going in the background"):
            exp.run()
    finally:
        exp.stop()


def test_the_engine_imports_and_trains_without_widget_libraries():
    code = (
        "import sys\n"
        "sys.modules['ipywidgets'] = None\nsys.modules['bqplot'] = None\n"
        "import nbtrain\n"
        "h = nbtrain.Experiment(epochs=2).run()\n"
        "assert h.last('val_acc') > 0.5\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_losses_are_finite_and_fall():
    history = Experiment(epochs=3).run()
    _, loss = history.series("train_loss", "eval")
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0] / 2


def test_a_resume_during_a_single_step_records_resumed_and_runs_on():
    exp = Experiment(epochs=500)
    exp.start()
    exp.pause()
    resumed_inside = []

    def resume_mid_step(e, _):
        if not resumed_inside:
            resumed_inside.append(e.step_count)
            e.resume()  # arrives while the single step is still going

    exp.on("step_completed", resume_mid_step)
    try:
        exp.step()
        deadline = time.time() + 10
        while exp.state != "running" and time.time() < deadline:
            time.sleep(0.001)
        assert exp.state == "running"
        assert [e.kind for e in exp.history.events][:3] == ["started", "paused", "resumed"]
    finally:
        exp.stop()


def test_a_speed_cap_slows_the_run_but_changes_nothing_it_computes(small_data):
    fast = Experiment(small_data, epochs=2, batch_size=50)
    fast.run()
    slow = Experiment(small_data, epochs=2, batch_size=50, speed=100.0)
    start = time.perf_counter()
    slow.run()
    elapsed = time.perf_counter() - start
    assert slow.step_count == fast.step_count == 10
    assert elapsed >= 0.09  # ten steps at 100 a second: at least nine gaps of 10 ms
    for name in fast.history.names("step"):
        np.testing.assert_array_equal(slow.history.series(name)[1], fast.history.series(name)[1])
    slow_acc, fast_acc = slow.history.series("val_acc")[1], fast.history.series("val_acc")[1]
    np.testing.assert_array_equal(slow_acc, fast_acc)


def test_speed_is_set_live_without_an_event_and_bad_values_are_refused(small_data):
    exp = Experiment(small_data, epochs=200, speed=20.0)
    exp.start()
    time.sleep(0.2)
    slow_steps = exp.step_count
    assert 1 <= slow_steps <= 8
    exp.set(speed=None)  # full speed, at once
    deadline = time.perf_counter() + 10
    while exp.step_count < slow_steps + 100 and time.perf_counter() < deadline:
        time.sleep(0.01)
    exp.stop()
    assert exp.step_count >= slow_steps + 100
    assert exp.config.speed is None and exp.history.changes() == []
    with pytest.raises(ValueError, match=r"speed must be None \(full speed\) or a positive"):
        exp.set(speed=0)
    with pytest.raises(ValueError, match=r"speed must be None \(full speed\) or a positive"):
        Experiment(small_data, speed="fast")
