"""An exception in the user's model, loss or data fails the run visibly and loses nothing."""

import _thread
import signal
import threading
import time

import numpy as np
import pytest
import torch

from nbtrain import Dashboard, Experiment


def training_threads():
    return [t for t in threading.enumerate() if t.name == "nbtrain-training"]


class Boom(Exception):
    pass


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise Boom("backward of the user's layer broke")


def break_forward(exp, at_step):
    original = exp.model.forward

    def forward(x):
        if exp.model.training and exp.step_count + 1 == at_step:
            raise Boom("the user's model broke in forward")
        return original(x)

    exp.model.forward = forward


def break_backward(exp, at_step):
    def hook(mod, inputs, output):
        if mod.training and exp.step_count + 1 == at_step:
            return FailingBackward.apply(output)
        return None

    exp.model.blocks[0].register_forward_hook(hook)


def break_loss(exp, at_step):
    original = exp.loss_fn

    def loss(out, y):
        if exp.step_count + 1 == at_step:
            raise Boom("the user's loss broke")
        return original(out, y)

    exp.loss_fn = loss


def break_data(exp, at_step):
    original = exp._next_batch

    def next_batch():
        x, y = original()
        if exp.step_count + 1 == at_step:
            return x[:, :3], y  # a pipeline that hands over the wrong shape
        return x, y

    exp._next_batch = next_batch


def break_evaluation(exp, at_step):
    original = exp.model.forward

    def forward(x):
        if not exp.model.training and exp.step_count >= at_step:
            raise Boom("the user's model broke in eval mode")
        return original(x)

    exp.model.forward = forward


FAULTS = {
    "forward": (break_forward, "Boom: the user's model broke in forward"),
    "backward": (break_backward, "Boom: backward of the user's layer broke"),
    "loss": (break_loss, "Boom: the user's loss broke"),
    "data": (break_data, "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    "evaluation": (break_evaluation, "Boom: the user's model broke in eval mode"),
}


@pytest.mark.parametrize("where", list(FAULTS))
@pytest.mark.parametrize("mode", ["start", "run"])
def test_a_fault_in_user_code_fails_the_run_and_keeps_everything(small_data, where, mode):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2, batch_size=32, eval_every=4)
    inject, message = FAULTS[where]
    before_threads = len(training_threads())
    inject(exp, at_step=5)
    if mode == "start":
        exp.start()
        assert exp.wait(30)
    else:
        exp.run()  # does not raise: the failure is the run's outcome, shown, not a crash

    assert exp.state == "failed" and not exp.running
    assert message in exp.error and "Traceback" in exp.error
    assert isinstance(exp.exception, Exception)
    # Step 5 fails; an evaluation fails at the first one after step 5 (eval_every=4).
    expected_steps = 4 if where != "evaluation" else 8
    assert exp.step_count == len(exp.history) == expected_steps
    assert exp.history.events[-1].kind == "failed"
    assert all(torch.isfinite(p).all() for p in exp.model.parameters())
    assert len(training_threads()) == before_threads  # no worker left behind

    # Reset works and so does a new run on the reset experiment.
    exp.reset()
    assert exp.state == "idle" and exp.error is None and len(exp.history) == 0


def test_after_a_failure_start_trains_on_from_where_it_failed(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2, batch_size=32)
    fired = []
    original = exp.loss_fn

    def flaky(out, y):
        if exp.step_count == 3 and not fired:
            fired.append(True)
            raise Boom("once")
        return original(out, y)

    exp.loss_fn = flaky
    exp.start()
    exp.wait(30)
    assert exp.state == "failed" and exp.step_count == 3
    exp.start()
    assert exp.wait(30) and exp.state == "finished" and exp.error is None
    steps = exp.history.series("train_loss")[0]
    assert np.all(np.diff(steps) == 1)


def test_a_failing_run_ended_observer_is_shown_not_lost(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=1)

    def broken(e, outcome):
        raise Boom("the user's end-of-run hook broke")

    exp.on("run_ended", broken)
    exp.start()
    assert exp.wait(30)
    assert exp.state == "failed" and "the user's end-of-run hook broke" in exp.error
    assert exp.history.events[-1].kind == "finished"  # the run itself finished
    exp.off("run_ended", broken)
    exp.run(epochs=1)
    assert exp.state == "finished"


def test_the_panel_shows_a_model_failure_and_reset_clears_it(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2)
    dash = Dashboard(exp)
    try:
        break_backward(exp, at_step=2)
        dash.start_button.click()
        assert exp.wait(30)
        dash.refresh()
        assert "The run failed." in dash.error_area.value
        assert "backward of the user&#x27;s layer broke" in dash.error_area.value
        dash.reset_button.click()
        dash.refresh()
        assert dash.error_area.layout.display == "none" and exp.state == "idle"
    finally:
        dash.close()


def test_reset_from_inside_the_training_thread_is_refused_and_the_run_fails_visibly(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2)
    exp.on("step_completed", lambda e, _: e.reset() if e.step_count == 2 else None)
    exp.start()
    assert exp.wait(30)
    assert exp.state == "failed" and "reset() cannot run inside the training thread" in exp.error
    assert len(exp.history) == 2


# KeyboardInterrupt during a blocking run()


def test_ctrl_c_during_a_blocking_run_stops_at_a_step_boundary(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=50, batch_size=8)
    handler = signal.getsignal(signal.SIGINT)

    def interrupt(e, _):
        if e.step_count == 10:
            _thread.interrupt_main()  # what Ctrl-C (or Jupyter's interrupt) delivers

    exp.on("step_completed", interrupt)
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert exp.state == "stopped" and not exp.running
    assert exp.step_count == len(exp.history) == 10  # the step in flight completed, no more
    assert exp.history.events[-1].kind == "stopped"
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    exp.off("step_completed", interrupt)
    exp.run(epochs=1)
    assert exp.state == "finished" and np.all(np.diff(exp.history.series("lr")[0]) == 1)


def test_a_second_ctrl_c_interrupts_at_once(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=50, batch_size=8)
    seen = []

    def interrupt_twice(e, _):
        if e.step_count == 5:
            _thread.interrupt_main()
            seen.append("first")
            _thread.interrupt_main()  # the second raises here, inside the step's observer

    exp.on("step_completed", interrupt_twice)
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert exp.state == "stopped" and not exp.running and exp.step_count == 5


@pytest.mark.parametrize("event", ["step_completed", "evaluated", "change_applied"])
def test_keyboard_interrupt_raised_in_user_code_stops_cleanly(small_data, event):
    exp = Experiment(data=small_data, hidden=(16,), epochs=3, eval_every=3)
    calls = []

    def interrupt(e, _):
        calls.append(e.step_count)
        if len(calls) == 3:
            raise KeyboardInterrupt

    exp.on(event, interrupt)
    if event == "change_applied":
        exp.on("step_completed", lambda e, _: e.set(lr=1e-3 * (1 + e.step_count)))
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert exp.state == "stopped" and not exp.running
    assert exp.history.events[-1].kind == "stopped"
    assert len(exp.history) == exp.step_count
    exp.run(epochs=1)  # and it trains on
    assert exp.state == "finished"


def test_controls_called_from_an_observer_never_stall_the_run(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2)
    seen = []

    def observer(e, _):
        if e.step_count == 2:
            e.pause()  # from the training thread: requests, does not wait for itself
            seen.append(e.state)
            e.resume()
        if e.step_count == 3:
            e.step()

    exp.on("step_completed", observer)
    started = time.monotonic()
    exp.run()
    assert time.monotonic() - started < 5  # no 5 s pause timeout, no 30 s step timeout
    assert exp.state == "failed" and "step() cannot run inside the training thread" in exp.error
    assert exp.step_count == 3


def test_stop_and_reset_from_another_thread_end_a_blocking_run(small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=10_000, batch_size=8)
    done = []
    runner = threading.Thread(target=lambda: done.append(exp.run()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while exp.step_count < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    exp.pause()
    assert exp.state == "paused"
    exp.reset()  # waits for the blocking run to stop, then starts over
    runner.join(10)
    assert not runner.is_alive() and done and done[0].events[-1].kind == "stopped"
    assert exp.state == "idle" and exp.step_count == 0
