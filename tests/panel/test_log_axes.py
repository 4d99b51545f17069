import numpy as np

from nbtrain import Experiment
from nbtrain.history import History
from nbtrain.panel.plots import GradientFigures, View


def test_gradient_bars_sit_on_a_decade_axis_that_holds_them_and_carry_no_nan():
    # bqplot draws no grouped bars on a log scale without explicit bounds, and one NaN
    # bar blanks the view for good: the browser tests see that; this pins the numbers.
    exp = Experiment(epochs=1)
    exp.run()
    figures = GradientFigures(exp.probe.layer_names)
    figures.update(View(exp.history, exp.probe.layer_names, max_points=2000))
    bars = np.asarray(figures.bars.y)
    assert bars.shape == (2, len(exp.probe.layer_names)) and np.isfinite(bars).all()
    low, high = figures.bar_scale.min, figures.bar_scale.max
    assert figures.bars.base == low <= bars.min() and bars.max() <= high
    ticks = np.log10(figures.bar_axis.tick_values)
    assert np.allclose(ticks, np.round(ticks)) and len(ticks) <= 7
    norms = np.asarray(figures.norms.y)
    assert (
        figures.norm_scale.min <= np.nanmin(norms) and np.nanmax(norms) <= figures.norm_scale.max
    )


def test_a_layer_without_a_finite_gradient_gets_a_flat_bar_not_a_nan():
    layers = ["hidden1", "output"]
    history = History()
    columns = ["train_loss", *(f"grad_{s}/{n}" for s in ("norm", "mean", "max") for n in layers)]
    for step in range(1, 31):
        values = [1.0, 0.5, 0.5, float("nan"), 0.02, 0.3, 0.4]  # hidden1's mean |g| is NaN
        history.record_row("step", step, 0, columns, values)
    figures = GradientFigures(layers)
    figures.update(View(history, layers, max_points=2000))
    assert figures.bars.y[0][0] == figures.bars.base == figures.bar_scale.min
    assert figures.bars.y[0][1] == np.float32(0.02)
