"""Rough handling: random sequences of controls and clicks against a running experiment.

Each sequence runs in a helper thread joined with a timeout, so a deadlock fails the test
(with every thread's stack printed) instead of hanging CI.
"""

import faulthandler
import gc
import os
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.formatters import DisplayFormatter

from nbtrain import Dashboard, Experiment
from nbtrain.history import EVENT_KINDS

SEQUENCE_TIMEOUT = 60.0
# 40 random sequences keep CI near 10 s; NBTRAIN_ROUGH_EXAMPLES=400 makes a soak test.
ROUGH_EXAMPLES = int(os.environ.get("NBTRAIN_ROUGH_EXAMPLES", "40"))
TERMINAL = ("stopped", "finished", "failed")


def tiny_data():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = rng.normal(size=(120, 6)).astype(np.float32) + 2.0 * np.eye(6)[y]
    return x, y


def in_thread(fn, timeout=SEQUENCE_TIMEOUT):
    """Run `fn` in a thread; fail on its exception, or on a timeout (a deadlock)."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="rough-handling", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        faulthandler.dump_traceback(file=sys.stderr)
        pytest.fail(f"a control sequence did not finish within {timeout} s: deadlock")
    if "error" in box:
        raise box["error"]


def check_history(history, start_config):
    """Steps strictly increasing; each change applied once, in order, at a step boundary."""
    steps, lr = history.series("lr") if "lr" in history.names() else ([], [])
    assert np.all(np.diff(steps) > 0), "steps must strictly increase"
    if len(steps):
        assert steps[0] == 1 and np.all(np.diff(steps) == 1), "no step lost or repeated"
    events = history.events
    assert all(e.kind in EVENT_KINDS for e in events)
    assert all(b.step >= a.step for a, b in zip(events, events[1:], strict=False))

    # Each setting's changes chain: old of one is new of the one before, nothing twice.
    current = {
        name: getattr(start_config, name) for name in ("lr", "dropout", "clip", "batchnorm")
    }
    lr_from = [(1, current["lr"])]
    for e in history.changes():
        name = e.detail["name"]
        assert e.detail["old"] == current[name] != e.detail["new"]
        current[name] = e.detail["new"]
        if name == "lr":
            lr_from.append((e.step, e.detail["new"]))
    # The lr each step ran with is the one the latest change before it put in force.
    for step, value in zip(steps, lr, strict=True):
        expected = [v for first, v in lr_from if first <= step][-1]
        assert value == pytest.approx(expected), f"step {step} ran with lr {value}"

    # Runs nest: every "started" is closed by exactly one terminal event before the next.
    open_run = False
    for e in events:
        if e.kind == "started":
            assert not open_run, "a run started inside another"
            open_run = True
        elif e.kind in TERMINAL:
            assert open_run, f"{e.kind} without a run"
            open_run = False
    assert "failed" not in [e.kind for e in events]
    return current


LRS = [1e-3, 3e-3, 1e-2]
ACTIONS = st.one_of(
    st.sampled_from(
        [
            ("start",),
            ("start_short",),
            ("pause",),
            ("pause_nowait",),
            ("resume",),
            ("step",),
            ("stop",),
            ("reset",),
            ("wait",),
            ("click", "start_button"),
            ("click", "pause_button"),
            ("click", "step_button"),
            ("click", "stop_button"),
            ("click", "reset_button"),
            ("toggle", "dropout_toggle"),
            ("toggle", "batchnorm_toggle"),
            ("toggle", "clip_toggle"),
        ]
    ),
    st.tuples(st.just("lr"), st.sampled_from(LRS)),
    st.tuples(st.just("dropout"), st.sampled_from([0.0, 0.2, 0.5])),
    st.tuples(st.just("clip"), st.sampled_from([None, 0.5, 2.0])),
    st.tuples(st.just("slider"), st.sampled_from([1e-4, 1e-3, 1e-2])),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.002, 0.02])),
)


def apply(exp, dash, action, histories):
    kind = action[0]
    if kind == "start":
        exp.start()
    elif kind == "start_short":
        exp.start(epochs=1)
    elif kind == "pause":
        exp.pause()
        assert exp.state in ("paused", "diverged") or not exp.running
    elif kind == "pause_nowait":
        exp.pause(wait=False)
    elif kind == "resume":
        exp.resume()
        # A resumed run says so (and records it) within moments, unless it has ended.
        deadline = time.monotonic() + 10
        while exp.running and exp.state != "running" and time.monotonic() < deadline:
            time.sleep(0.001)
        assert exp.state == "running" or not exp.running, f"resumed but {exp.state}"
    elif kind == "step":
        before = exp.step_count
        try:
            exp.step()
        except RuntimeError as exc:  # the one refusal allowed: stepping an unpaused run
            assert "step() works on a paused run" in str(exc)
            return
        assert exp.step_count in (before, before + 1)
    elif kind == "stop":
        exp.stop()
        assert not exp.running
    elif kind == "reset":
        histories.append((exp.history, exp._start_config))
        exp.reset()
        exp._start_config = exp.config
        assert exp.step_count == 0 and exp.state == "idle"
    elif kind == "wait":
        exp.wait(0.05)
    elif kind == "click":
        if action[1] == "reset_button":
            histories.append((exp.history, exp._start_config))
            getattr(dash, action[1]).click()
            exp._start_config = exp.config
        else:
            getattr(dash, action[1]).click()
    elif kind == "toggle":
        toggle = getattr(dash, action[1])
        toggle.value = not toggle.value
    elif kind == "lr":
        exp.set(lr=action[1])
    elif kind == "dropout":
        exp.set(dropout=action[1])
    elif kind == "clip":
        exp.set(clip=action[1])
    elif kind == "slider":
        dash.lr_slider.value = action[1]
    elif kind == "sleep":
        time.sleep(action[1])


SEQUENCES_RUN = []


@settings(
    max_examples=ROUGH_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(ACTIONS, min_size=1, max_size=25))
def test_random_control_sequences_never_deadlock_lose_or_repeat_anything(actions):
    exp = Experiment(data=tiny_data(), hidden=(16,), epochs=100, batch_size=16)
    exp._start_config = exp.config
    dash = Dashboard(exp)
    histories = []
    errors = []
    dash.error_area.observe(lambda change: errors.append(change["new"]), names="value")

    def drive():
        exp.start()  # against a running experiment
        for action in actions:
            apply(exp, dash, action, histories)
        exp.stop()

    try:
        in_thread(drive)
        assert not exp.running and exp.state in ("stopped", "finished", "idle")
        assert exp.error is None and exp.pending == {}
        # A control's failure would show in the error area; the only one allowed is
        # the Step button pressed on a running run.
        assert all("step() works on a paused run" in text for text in errors)
        for history, start_config in [*histories, (exp.history, exp._start_config)]:
            final = check_history(history, start_config)
        assert final == {name: getattr(exp.config, name) for name in final}
        assert not any(t.name == "nbtrain-training" for t in threading.enumerate())
    finally:
        dash.close()
        exp.stop()
    SEQUENCES_RUN.append(len(actions))


def test_a_queued_change_racing_the_end_of_a_run_is_applied_once():
    for _ in range(20):
        exp = Experiment(data=tiny_data(), hidden=(8,), epochs=1, batch_size=16)
        exp.start()
        exp.set(lr=0.01)
        exp.wait(30)
        exp.set(dropout=0.1)
        names = [e.detail["name"] for e in exp.history.changes()]
        assert names == ["lr", "dropout"] and exp.config.lr == 0.01
        check_history(exp.history, Experiment(data=tiny_data(), hidden=(8,)).config)


def test_step_racing_the_end_of_a_run_returns_and_leaves_no_worker():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=1, batch_size=16)
    for _ in range(3 * exp.steps_per_epoch):
        in_thread(exp.step, timeout=30)
        assert exp.state in ("paused", "finished")
    assert exp.epoch_count >= 2
    exp.stop()
    assert not any(t.name == "nbtrain-training" for t in threading.enumerate())


def test_a_new_run_waits_for_the_last_runs_observers_and_its_end_event_comes_first():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=1, batch_size=16)
    ending = threading.Event()
    overlaps = []

    def slow_end(e, _):
        ending.set()
        time.sleep(0.05)
        ending.clear()

    exp.on("run_ended", slow_end)
    exp.on("step_completed", lambda e, _: overlaps.append(ending.is_set()))
    for _ in range(5):
        exp.start()
        deadline = time.monotonic() + 30
        while exp.running and time.monotonic() < deadline:
            time.sleep(0.001)
        exp.start(epochs=500)  # the last run's run_ended observer is still sleeping
        exp.stop()
    assert overlaps and not any(overlaps)
    kinds = [e.kind for e in exp.history.events]
    assert kinds == ["started", "finished", "started", "stopped"] * 5
    check_history(exp.history, Experiment(data=tiny_data(), hidden=(8,)).config)


def test_reset_while_paused_mid_step_sequence_builds_a_fresh_run():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=50, batch_size=16)
    for _ in range(10):
        exp.start()
        exp.pause()
        exp.step()
        in_thread(exp.reset, timeout=30)
        assert exp.state == "idle" and exp.step_count == 0 and len(exp.history) == 0
        assert not any(t.name == "nbtrain-training" for t in threading.enumerate())


def test_200_start_stop_cycles_leave_threads_and_memory_where_they_began():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=1000, batch_size=16)
    for _ in range(5):  # warm up: first-use allocations (torch, logging) are not leaks
        exp.start()
        exp.stop()
    exp.reset()
    gc.collect()
    threads_before = threading.active_count()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            exp.start()
            exp.stop()
        steps = exp.step_count
        trained = exp.run_id
        exp.reset()
        exp.runs.remove(trained)  # the session keeps a finished run's history on purpose
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert steps > 0 and threading.active_count() == threads_before
    assert grown < 256 * 1024, f"{grown} bytes still held after 200 cycles"


def test_a_panel_displayed_twice_or_for_a_finished_run_shows_the_same_live_widget():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=2, batch_size=16)
    exp.run()
    dash = Dashboard(exp)  # a panel for a finished experiment
    try:
        formatter = DisplayFormatter()
        first, _ = formatter.format(dash)
        second, _ = formatter.format(dash)
        view = "application/vnd.jupyter.widget-view+json"
        assert first[view]["model_id"] == second[view]["model_id"] == dash.model_id
        assert first["text/plain"] == second["text/plain"] == "nbtrain.Dashboard"
        assert len(dash.loss.raw.x) == len(exp.history) == exp.step_count
        assert "finished" in dash.status.value and dash.progress.value == 1.0
        second_panel = Dashboard(exp)  # two panels on one experiment, both live
        dash.start_button.click()
        assert exp.wait(30)
        second_panel.refresh()
        assert len(second_panel.loss.raw.x) == exp.step_count
        second_panel.close()
        dash.refresh()
        assert len(dash.loss.raw.x) == exp.step_count
    finally:
        dash.close()


def test_step_right_after_a_pause_that_did_not_wait_runs_exactly_one_step():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=500, batch_size=16)
    try:
        for _ in range(20):
            exp.start()
            exp.pause(wait=False)
            exp.step()
            after = exp.step_count
            time.sleep(0.01)
            assert exp.step_count == after and exp.state == "paused"
            exp.stop()
    finally:
        exp.stop()


def test_resume_right_after_a_single_step_is_recorded_and_the_state_follows():
    exp = Experiment(data=tiny_data(), hidden=(8,), epochs=500, batch_size=16)
    try:
        exp.start()
        for _ in range(20):
            exp.pause()
            exp.step()
            exp.resume()  # the single step may still be finishing
            deadline = time.monotonic() + 10
            while exp.state != "running" and time.monotonic() < deadline:
                time.sleep(0.001)
            assert exp.state == "running"
        kinds = [e.kind for e in exp.history.events]
        assert kinds == ["started"] + ["paused", "resumed"] * 20
    finally:
        exp.stop()
