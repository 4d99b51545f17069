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


def _million_step_history(recent=10_000, max_buckets=2048):
    """A synthetic run of 1,000,000 steps with a spike at step 10 and a dip at 500,000."""
    h = History(recent=recent, max_buckets=max_buckets)
    steps = np.arange(1, 1_000_001)
    loss = 1.0 + 0.001 * np.sin(steps / 100.0)
    loss[9] = 80.0  # step 10
    loss[499_999] = -5.0  # step 500,000
    lr = np.where(steps <= 300_000, 1e-3, 1e-4)
    for start in range(0, len(steps), 50_000):
        chunk = slice(start, start + 50_000)
        values = np.stack([loss[chunk], lr[chunk]], axis=1)
        h.record_rows("step", steps[chunk], steps[chunk] // 1000, ["train_loss", "lr"], values)
    return h, steps, loss


def test_a_million_steps_keep_their_start_their_spikes_and_their_recent_steps_exactly():
    h, steps, loss = _million_step_history()
    assert len(h) == 1_000_000
    s, v = h.series("train_loss")
    assert np.all(np.diff(s) > 0)  # in step order

    # The spike at step 10 and the dip at step 500,000 are there, at their own steps.
    assert v[s == 10].tolist() == [np.float32(80.0)]
    assert v[s == 500_000].tolist() == [-5.0]

    # The last 10,000 steps are exact (float32 of the recorded values).
    recent_steps, recent = h.exact("train_loss")
    assert len(recent_steps) >= 10_000 and recent_steps[-1] == 1_000_000
    np.testing.assert_array_equal(recent, loss[recent_steps - 1].astype(np.float32))
    assert np.array_equal(s[-len(recent_steps) :], recent_steps)

    # Older steps are coarse: every bucket's mean is the mean of the steps it covers.
    b = h.buckets("train_loss")
    assert 1024 < len(b.first) <= 2048 and b.first[0] == 1  # from the very first step
    assert s[0] <= b.last[0]
    assert np.array_equal(b.first[1:], b.last[:-1] + 1) and b.last[-1] + 1 == recent_steps[0]
    assert np.array_equal(b.count, b.last - b.first + 1)
    expected = [loss[f - 1 : la].mean() for f, la in zip(b.first, b.last, strict=True)]
    np.testing.assert_allclose(b.mean, expected, rtol=1e-5)
    assert b.max[0] == 80.0 and b.min.min() == -5.0

    # lr stays float64 exact, and the change at step 300,000 is still a sharp step.
    ls, lv = h.series("lr")
    assert set(lv[ls <= 300_000]) == {1e-3} and set(lv[ls > 300_000]) == {1e-4}


def test_history_memory_is_bounded_whatever_the_length():
    shorter = History(recent=10_000, max_buckets=2048)
    steps = np.arange(1, 50_001)
    shorter.record_rows("step", steps, steps // 1000, ["train_loss", "lr"], np.ones((50_000, 2)))
    big, _, _ = _million_step_history()
    assert big.nbytes == shorter.nbytes  # no byte more after 50,000 steps than after 1,000,000
    assert big.nbytes < 1_000_000  # two columns; float64 arrays of a million would be 16 MB


def test_folding_keeps_columns_that_start_late_and_gaps():
    h = History(recent=100, max_buckets=8)
    for step in range(1, 2001):
        metrics = {"a": float(step)}
        if step > 1500:
            metrics["b"] = -float(step)
        h.record("step", step, 0, metrics)
    steps, a = h.series("a")
    assert steps[0] == 1 and a[0] == 1.0 and steps[-1] == 2000 and np.array_equal(steps, a)
    steps, b = h.series("b")
    assert steps[0] == 1501 and b[-1] == -2000
    assert h.last("b") == -2000 and h.buckets("b").count[0] == 0


def test_bad_tier_sizes_are_refused():
    with pytest.raises(ValueError, match="max_buckets must be an integer of at least 2, got 1"):
        History(max_buckets=1)


def test_csv_writes_float32_values_in_their_shortest_form_and_folded_buckets(tmp_path):
    h = History(recent=4, max_buckets=4)
    for step in range(1, 11):
        h.record("step", step, 0, {"train_loss": 0.1 * step, "lr": 1e-3})
    path = tmp_path / "history.csv"
    h.to_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert ["step", "10", "0", "train_loss", "1.0"] in rows
    assert ["step", "10", "0", "lr", "0.001"] in rows
    buckets = [row for row in rows if row[0] == "step_bucket"]
    assert ["step_bucket", "2", "0", "train_loss.max", "0.2"] in buckets
    assert int(buckets[-1][1]) + 1 == int(next(r for r in rows if r[0] == "step")[1])
