import csv

import numpy as np
import pytest

from nbtrain import Event, History


def test_series_last_and_the_two_tables():
    h = History()
    h.record("step", 1, 0, {"train_loss": 2.0, "lr": 0.1})
    h.record("step", 2, 0, {"train_loss": 1.5, "lr": 0.1})
    h.record("eval", 2, 1, {"train_loss": 1.4, "val_acc": 0.5})
    steps, values = h.series("train_loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 1.5]
    assert h.series("train_loss", "eval")[1].tolist() == [1.4]
    assert h.last("val_acc") == 0.5 and h.last("missing") is None
    assert len(h) == 2 and h.n_evals == 1
    with pytest.raises(KeyError, match="no metric 'nope' recorded"):
        h.series("nope")


def test_growing_past_capacity_and_new_columns_keep_every_value():
    h = History()
    for step in range(1, 201):
        metrics = {"a": float(step)}
        if step > 100:
            metrics["b"] = -float(step)
        h.record("step", step, 0, metrics)
    assert np.array_equal(h.series("a")[1], np.arange(1, 201))
    steps, b = h.series("b")
    assert steps[0] == 101 and b[-1] == -200


def test_to_csv_writes_long_form_with_events(tmp_path):
    h = History()
    h.record("step", 1, 0, {"train_loss": 2.0})
    h.record("eval", 1, 1, {"val_acc": 0.25})
    h.add_event(Event(2, 1, "change", "dropout off→0.3"))
    path = tmp_path / "history.csv"
    h.to_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["table", "step", "epoch", "name", "value"],
        ["step", "1", "0", "train_loss", "2.0"],
        ["eval", "1", "1", "val_acc", "0.25"],
        ["event", "2", "1", "change", "dropout off→0.3"],
    ]


def test_nan_and_inf_are_recorded_values_not_gaps_in_the_record():
    h = History()
    h.record("step", 1, 0, {"train_loss": 2.0})
    h.record("step", 2, 0, {"train_loss": float("nan")})
    h.record("step", 3, 0, {"train_loss": float("inf")})
    h.record("step", 4, 0, {"other": 1.0})  # a row that did not record train_loss
    steps, values = h.series("train_loss")
    assert steps.tolist() == [1, 2, 3]
    assert values[0] == 2.0 and np.isnan(values[1]) and np.isinf(values[2])
    assert h.tail("train_loss", 3)[0].tolist() == [2, 3]  # the last 3 rows: one lacks it
    assert h.head("train_loss", 1)[1].tolist() == [2.0]
