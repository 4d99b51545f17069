import csv
import json
import math

import numpy as np
import pytest

from nbtrain import Experiment
from nbtrain.runs import LONG_COLUMNS, RunRegistry


@pytest.fixture
def registry(monkeypatch):
    """A registry of this test's own, so runs of other tests do not show up."""
    fresh = RunRegistry()
    monkeypatch.setattr("nbtrain.engine.session_runs", lambda: fresh)
    return fresh


def test_every_reset_keeps_the_finished_run_and_begins_a_new_one(registry):
    exp = Experiment(epochs=1)
    first = exp.current_run
    assert registry.ids == [1] and first.state == "idle"
    exp.run()
    history = exp.history
    exp.reset()  # a finished run stays, with its history and its end state
    exp.set(dropout=0.3)
    exp.reset()  # the second run never trained: dropped, its id reused
    assert registry.ids == [1, 2] and exp.run_id == 2
    assert first.history is history and len(first.history) == exp.steps_per_epoch
    assert first.state == "finished" and first.experiment is None
    second = registry[2]
    assert second.config.dropout == 0.3 and first.config.dropout == 0.0
    assert second.diff(first) == {"dropout": (0.0, 0.3)}
    assert second.diff_text(first) == "dropout 0→0.3" and first.diff_text(first) == "baseline"
    with pytest.raises(ValueError, match="run_id must be one of \\[1, 2\\], got 7"):
        registry[7]


def test_best_final_and_states(registry):
    exp = Experiment(epochs=3, lr=0.02)
    exp.run()
    run = exp.current_run
    steps, acc = exp.history.series("val_acc")
    i = int(np.argmax(acc))
    assert run.best() == (int(steps[i]), float(acc[i]))
    assert run.final() == float(acc[-1]) and run.final("nope") is None
    failing = Experiment(epochs=1)
    failing.on("step_completed", lambda e, _: 1 / 0)
    failing.run()
    assert failing.current_run.state == "failed"


def test_a_run_whose_loss_went_nan_is_diverged(registry):
    exp = Experiment(epochs=2, optimizer="sgd", lr=1e6, init="default")
    exp.run()
    _, loss = exp.history.series("train_loss")
    assert len(loss) < len(exp.history) or not np.isfinite(loss).all()  # NaN or inf losses
    assert exp.current_run.state == "diverged"
    healthy = Experiment(epochs=1)
    healthy.run()
    assert healthy.current_run.state == "finished"


def test_rename_is_checked(registry):
    exp = Experiment()
    registry.rename(exp.run_id, "  sigmoid, no BN ")
    assert exp.current_run.name == "sigmoid, no BN"
    with pytest.raises(ValueError, match="name must be a non-empty string, got ' '"):
        registry.rename(exp.run_id, " ")


def test_csv_json_and_dataframe_of_all_runs_hold_the_same_numbers(registry, tmp_path):
    exp = Experiment(epochs=1, eval_every=10)
    exp.set(clip=1.0)
    exp.run()
    child = exp.fork(lr=0.01)
    child.run(epochs=1)
    registry.to_csv(tmp_path / "all.csv")
    with open(tmp_path / "all.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == LONG_COLUMNS
    loss = [r for r in rows if r[0] == "2" and r[2] == "step" and r[5] == "train_loss"]
    steps, values = child.history.series("train_loss")
    assert [int(r[3]) for r in loss] == steps.tolist()
    assert [float(r[6]) for r in loss] == values.tolist()  # repr round-trips exactly
    evals = [r for r in rows if r[0] == "1" and r[2] == "eval" and r[5] == "val_acc"]
    assert [(int(r[3]), int(r[4])) for r in evals] == [(0, 0), (10, 0), (20, 0), (23, 1)]
    events = [r[5:] for r in rows if r[0] == "2" and r[2] == "event"]
    assert ["change", "lr 0.001→0.01"] in events and ["change", "clip off→1"] in events

    # The history's own CSV and this one agree on every metric row of run 1.
    exp.history.to_csv(tmp_path / "one.csv")
    with open(tmp_path / "one.csv", newline="") as handle:
        own = [r for r in csv.reader(handle)][1:]
    mine = [r[2:] for r in rows if r[0] == "1"]

    def key(row):  # History writes float32 values in their shortest form, runs in full
        if row[0] == "event":
            return tuple(row)
        return (*row[:4], float(np.float32(float(row[4]))))

    assert [key(r) for r in mine] == [key(r) for r in own]

    data = registry.to_json(tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text()) == data
    second = data[1]
    assert second["parent"] == 1 and second["fork_step"] == exp.step_count + 1
    assert second["step"]["metrics"]["train_loss"] == values.tolist()
    assert second["config"]["hidden"] == [128, 64, 32] and second["final_config"]["lr"] == 0.01
    assert [e["kind"] for e in second["events"]].count("change") == 2

    frame = registry.to_dataframe()
    sub = frame[(frame.run_id == 2) & (frame.table == "step") & (frame.name == "train_loss")]
    assert sub.value.tolist() == values.tolist() and sub.step.tolist() == steps.tolist()
    assert set(frame[frame.table == "event"].label) >= {"lr 0.001→0.01", "start", "finished"}
    assert math.isnan(frame[frame.table == "event"].value.iloc[0])


def test_summary_markdown_is_a_table_with_the_runs_numbers(registry):
    exp = Experiment(epochs=2)
    exp.set(dropout=0.2)
    exp.run()
    exp.current_run.name = "dropout | 0.2"
    text = exp.current_run.summary_markdown()
    lines = text.splitlines()
    assert lines[:2] == ["| | |", "| --- | --- |"]
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    best_step, best = exp.current_run.best()
    assert f"| best val acc | {best:.4f} (step {best_step}) |" in lines
    assert f"| final val acc | {exp.history.last('val_acc'):.4f} |" in lines
    assert "| run | 1: dropout \\| 0.2 |" in lines
    assert "| changes | dropout off→0.2 @1 |" in lines
