import json

import numpy as np
import pytest

from nbtrain import Dashboard, Experiment
from nbtrain.panel import decimate, smooth
from nbtrain.runs import RunRegistry


@pytest.fixture
def registry(monkeypatch):
    fresh = RunRegistry()
    monkeypatch.setattr("nbtrain.engine.session_runs", lambda: fresh)
    return fresh


@pytest.fixture
def two_runs(registry):
    """Run 1 without dropout, run 2 (current) with it; both trained for one epoch."""
    exp = Experiment(epochs=1)
    exp.run()
    exp.reset()
    exp.set(dropout=0.3)
    exp.run()
    dash = Dashboard(exp)
    yield exp, dash
    dash.experiment.stop()
    exp.stop()
    dash.close()


def test_the_table_has_a_row_per_run_with_its_numbers(two_runs, registry):
    exp, dash = two_runs
    dash.refresh()
    table = dash.runs_panel
    assert list(table.rows) == [1, 2] and table.baseline.value == 1
    first, second = registry[1], registry[2]
    row = table.rows[2]
    best_step, best = second.best()
    assert row.cells["best"].value == f"{best:.3f}" and row.cells["step"].value == str(best_step)
    assert row.cells["final"].value == f"{second.final():.3f}"
    assert row.cells["diff"].value == "dropout 0→0.3"
    assert table.rows[1].cells["diff"].value == "baseline"
    assert "finished" in row.cells["state"].value and "◀" in row.cells["state"].value
    assert first.best() != second.best()  # the two rows do show different runs

    table.rows[1].name.value = "no dropout"  # edited in the panel
    assert registry[1].name == "no dropout"
    registry.rename(2, "dropout 0.3")  # renamed in code
    exp.runs[1].name = "without"  # or simply assigned
    dash.refresh()
    assert table.rows[2].name.value == "dropout 0.3" and table.rows[1].name.value == "without"
    assert ("1: without", 1) in table.baseline.options and table.baseline.value == 1
    table.rows[1].name.value = "no dropout"
    dash.refresh()
    assert ("1: no dropout", 1) in table.baseline.options


def test_ticked_runs_are_overlaid_on_each_plot_in_their_own_colour(two_runs, registry):
    exp, dash = two_runs
    dash.runs_panel.rows[1].overlay.value = True
    dash.runs_panel.rows[2].overlay.value = True  # the current run is drawn already
    dash.refresh()
    other = registry[1].history
    steps, loss = other.series("train_loss")
    x, y = decimate(steps, smooth(loss), dash.max_points)
    overlay = dash.loss.overlay.mark
    assert list(overlay.labels) == ["run 1 (train)"]
    # Note: bqplot stores a one-line 2-D array as 1-D.
    assert np.array_equal(overlay.x, x)
    np.testing.assert_allclose(overlay.y, y, rtol=1e-6)
    acc = dash.accuracy.overlay.mark
    np.testing.assert_allclose(acc.y, other.series("val_acc")[1], rtol=1e-6)
    grad = dash.gradients.overlay.mark
    np.testing.assert_allclose(grad.y, other.series("grad_norm")[1], rtol=1e-6)
    assert overlay.display_legend and list(overlay.colors) == list(acc.colors)
    assert overlay.colors[0] not in ("#1f77b4", "#ff7f0e")  # not the current run's colours

    exp.reset()  # a third run: overlays of two others, with different colours
    exp.run()
    dash.refresh()
    dash.runs_panel.rows[2].overlay.value = True
    dash.refresh()
    assert list(dash.loss.overlay.mark.labels) == ["run 1 (train)", "run 2 (train)"]
    assert len(set(dash.loss.overlay.mark.colors)) == 2
    assert dash.loss.overlay.mark.y.shape[0] == 2


def test_fork_here_forks_with_the_form_and_drives_the_fork(two_runs, registry):
    exp, dash = two_runs
    form = dash.runs_panel
    assert form.form_changes() == {}
    form.fork_batchnorm.value = True
    form.fork_lr.value = 1e-2
    dash.runs_panel.fork_button.click()
    child = dash.experiment
    assert child is not exp and child.current_run.parent == exp.run_id
    assert child.config.batchnorm and child.config.lr == 1e-2
    assert not exp.config.batchnorm and exp.config.lr == 1e-3
    assert dash.batchnorm_toggle.value and dash.lr_slider.value == 1e-2
    assert child.pending == {} and len(child.history.changes()) == 3  # dropout, then the fork's
    dash.refresh()
    assert list(form.rows) == [1, 2, 3] and form.rows[2].overlay.value
    assert "batchnorm @" in form.rows[3].cells["diff"].value
    assert dash.loss.marker_texts()[-2:] == ["batchnorm off→on", "lr 0.001→0.01"]
    dash.start_button.click()  # the panel's buttons now drive the fork
    assert child.wait(60) and child.step_count == 2 * exp.step_count
    assert exp.step_count == len(exp.history)  # the parent did not move


def test_export_buttons_write_csv_json_markdown_and_ask_for_figures(two_runs, tmp_path):
    exp, dash = two_runs
    table = dash.runs_panel
    table.path.value = str(tmp_path / "lecture")
    table.buttons["CSV"].click()
    table.buttons["JSON"].click()
    rows = (tmp_path / "lecture.csv").read_text().splitlines()
    assert rows[0] == "run_id,run,table,step,epoch,name,value"
    assert {line.split(",")[0] for line in rows[1:]} == {"1", "2"}
    data = json.loads((tmp_path / "lecture.json").read_text())
    assert [run["id"] for run in data] == [1, 2]
    table.rows[1].overlay.value = True  # only the ticked run
    table.buttons["JSON"].click()
    assert [run["id"] for run in json.loads((tmp_path / "lecture.json").read_text())] == [1]
    table.buttons["Markdown"].click()
    assert table.markdown.value == exp.runs[1].summary_markdown()
    assert table.markdown.layout.display == "block"

    sent = []
    for figure in table.figures().values():
        figure.send = lambda content, buffers=None, f=figure: sent.append((f, content))
    table.buttons["PNG"].click()
    table.buttons["SVG"].click()
    assert [c for _, c in sent][:1] == [
        {"type": "save_png", "filename": "lecture-loss.png", "scale": None}
    ]
    assert [c["type"] for _, c in sent] == ["save_png"] * 4 + ["save_svg"] * 4
    assert sent[4][1] == {"type": "save_svg", "filename": "lecture-loss.svg"}
    assert dash.error_area.layout.display == "none"


def test_checkpoint_buttons_save_and_load_into_the_panel(two_runs, tmp_path):
    exp, dash = two_runs
    dash.runs_panel.path.value = str(tmp_path / "ckpt")
    dash.runs_panel.buttons["Save checkpoint"].click()
    assert (tmp_path / "ckpt.pt").exists()
    dash.runs_panel.buttons["Load checkpoint"].click()
    loaded = dash.experiment
    assert loaded is not exp and loaded.step_count == exp.step_count
    assert loaded.config.dropout == 0.3 and dash.dropout_toggle.value
    dash.refresh()
    assert f"step {exp.step_count}" in dash.status.value
    assert len(dash.runs_panel.rows) == 3
    dash.runs_panel.path.value = str(tmp_path / "missing")
    dash.runs_panel.buttons["Load checkpoint"].click()
    assert "FileNotFoundError" in dash.error_area.value


def test_fork_here_on_a_running_experiment_trains_both(registry):
    exp = Experiment(epochs=500)
    dash = Dashboard(exp)
    try:
        dash.start_button.click()
        while exp.step_count < 3:
            pass
        dash.runs_panel.fork_dropout.value = 0.2
        dash.runs_panel.fork_button.click()
        child = dash.experiment
        assert child is not exp and child.running and exp.running
        start = child.current_run.fork_step
        while child.step_count < start + 3:
            pass
        dash.stop_button.click()  # stops the fork, which the panel drives now
        assert child.state == "stopped" and exp.running
        assert [c.label for c in child.history.changes()] == ["dropout off→0.2"]
        assert exp.history.changes() == []
    finally:
        exp.stop()
        dash.experiment.stop()
        dash.close()


def test_a_learning_rate_outside_the_sliders_range_is_shown_and_forked_unclamped(registry):
    exp = Experiment(lr=3.0, clip=250.0, epochs=1)
    dash = Dashboard(exp)
    try:
        assert dash.lr_slider.value == pytest.approx(3.0)
        assert dash.runs_panel.form_changes() == {}  # not a "change" to the clamped 1.0
        exp.set(lr=20.0, clip=800.0)
        exp.step()
        dash._show_settings(exp.in_force)
        assert dash.lr_slider.value == pytest.approx(20.0)
        assert dash.clip_norm.value == pytest.approx(800.0)
        dash.runs_panel.reset_form()
        assert dash.runs_panel.form_changes() == {}
    finally:
        exp.stop()  # step() left a paused worker
        dash.close()


def test_the_load_button_brings_back_a_checkpoint_of_your_own_model(registry, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(120, 8, generator=g) + torch.nn.functional.one_hot(y, 8).float()
    exp = Experiment(model=model, data=(x, y), epochs=1)
    exp.run()
    dash = Dashboard(exp)
    try:
        dash.runs_panel.path.value = str(tmp_path / "own")
        dash.runs_panel.buttons["Save checkpoint"].click()
        dash.runs_panel.buttons["Load checkpoint"].click()
        loaded = dash.experiment
        assert dash.error_area.layout.display == "none", dash.error_area.value
        assert loaded is not exp and loaded.step_count == exp.step_count
        assert loaded.model is not exp.model  # a copy: training one leaves the other alone
        for a, b in zip(loaded.model.parameters(), exp.model.parameters()):
            assert torch.equal(a, b)
    finally:
        dash.close()
