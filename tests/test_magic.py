"""Issue 6: the IPython extension, driven through an in-process InteractiveShell."""

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbtrain import Dashboard


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbtrain")
    yield shell
    InteractiveShell.clear_instance()


def _open(shell, line):
    dash = shell.run_line_magic("nbtrain", line)
    assert isinstance(dash, Dashboard)
    dash.close()
    return dash.experiment


def test_help_prints_the_options(shell, capsys):
    assert shell.run_line_magic("nbtrain", "--help") is None
    out = capsys.readouterr().out
    assert out.startswith("usage: %nbtrain") and "--preset" in out and "variable" in out


def test_a_preset_opens_a_panel(shell):
    exp = _open(shell, "--preset vanishing --epochs 3")
    assert exp.preset == "vanishing" and exp.config.activation == "sigmoid"
    assert exp.config.epochs == 3  # an option overrides the preset


def test_notebook_variables_open_a_panel_for_your_model_and_data(shell):
    torch.manual_seed(0)
    x, y = torch.randn(60, 8), torch.arange(60) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    shell.user_ns.update(model=torch.nn.Linear(8, 3), train_loader=loader, val_loader=loader)
    exp = _open(shell, "model train_loader val_loader --optimizer sgd --lr 0.1")
    assert exp.model is shell.user_ns["model"] and exp.steps_per_epoch == 3
    assert exp.config.optimizer == "sgd" and exp.config.lr == 0.1
    shell.user_ns["exp"] = exp
    assert _open(shell, "exp") is exp


def test_mistakes_are_usage_errors_that_name_them(shell):
    with pytest.raises(UsageError, match="no variable 'missing' in this notebook"):
        shell.run_line_magic("nbtrain", "missing")
    with pytest.raises(UsageError, match="argument --preset: invalid choice: 'nope'"):
        shell.run_line_magic("nbtrain", "--preset nope")
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        shell.run_line_magic("nbtrain", "--bogus")
    shell.user_ns["numbers"] = [1, 2]
    with pytest.raises(UsageError, match="the first variable must be a model"):
        shell.run_line_magic("nbtrain", "numbers")
