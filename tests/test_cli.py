from nbtrain.__main__ import main


def test_cli_trains_and_prints_a_table(capsys, tmp_path):
    path = tmp_path / "h.csv"
    code = main(["--epochs", "2", "--hidden", "32", "--no-progress", "--csv", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "step"])
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["1", "2"]
    assert "finished after" in out and "val_acc=" in out
    assert path.read_text().startswith("table,step,epoch,name,value")


def test_cli_reports_a_bad_value_and_exits_2(capsys):
    assert main(["--lr", "-1", "--no-progress"]) == 2
    assert "lr must be a positive finite number, got -1.0" in capsys.readouterr().err


def test_cli_runs_a_preset_and_prints_its_finding(capsys):
    code = main(["--preset", "vanishing", "--epochs", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "finding: Vanishing gradients: the first layer's gradient norm is" in out
