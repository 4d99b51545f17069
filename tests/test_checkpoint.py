import pickle
import time

import numpy as np
import pytest
import torch
from mapdata import Pairs

from nbtrain import Experiment
from nbtrain.checkpoint import atomic_write


def _same_history(a, b):
    """Every metric of both tables equal bit for bit, and the same change events."""
    for table in ("step", "eval"):
        assert a.names(table) == b.names(table)
        for name in a.names(table):
            sa, va = a.series(name, table)
            sb, vb = b.series(name, table)
            assert np.array_equal(sa, sb) and np.array_equal(va, vb), (table, name)
    key = lambda e: (e.step, e.kind, e.label)  # noqa: E731
    assert [key(e) for e in a.changes()] == [key(e) for e in b.changes()]


def _same_parameters(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _stop_at(step):
    def hook(e, _):
        if e.step_count == step:
            e.stop()

    return hook


# Fork


def test_fork_leaves_the_original_as_if_never_forked_and_continues_it_exactly():
    # Dropout and a mid-epoch fork exercise the RNG, the permutation and the position.
    untouched = Experiment(epochs=3, dropout=0.2, seed=1)
    never = untouched.run()
    exp = Experiment(epochs=3, dropout=0.2, seed=1)
    exp.on("step_completed", _stop_at(30))
    exp.run()
    assert exp.step_count == 30 and exp.epoch_count == 1
    child = exp.fork()
    exp.run(epochs=2)
    _same_history(exp.history, never)
    _same_parameters(exp, untouched)
    # The unchanged fork trained on is the same run too: nothing was lost in the copy.
    assert child.step_count == 30 and len(child.history) == 30
    child.run(epochs=2)
    _same_history(child.history, never)
    _same_parameters(child, exp)


def test_a_fork_with_a_change_shares_the_prefix_then_differs():
    exp = Experiment(epochs=2, seed=2)
    exp.run(epochs=1)
    prefix = exp.history.series("train_loss")[1].copy()
    child = exp.fork(batchnorm=True, lr=0.01)
    assert (child.config.batchnorm, child.config.lr) == (True, 0.01)
    assert (exp.config.batchnorm, exp.config.lr) == (False, 1e-3)
    assert child.model.blocks[0].use_norm and not exp.model.blocks[0].use_norm
    child.run(epochs=1)
    exp.run(epochs=1)
    n = len(prefix)
    a, b = exp.history.series("train_loss")[1], child.history.series("train_loss")[1]
    assert np.array_equal(a[:n], prefix) and np.array_equal(b[:n], prefix)
    assert not np.array_equal(a[n:], b[n:])
    assert [(c.step, c.label) for c in child.history.changes()] == [
        (n + 1, "batchnorm off→on"),
        (n + 1, "lr 0.001→0.01"),
    ]
    run = child.current_run
    assert run.parent == exp.run_id and run.fork_step == n + 1
    assert run.diff(exp.current_run) == {
        f"batchnorm @{n + 1}": (False, True),
        f"lr @{n + 1}": (1e-3, 0.01),
    }


def test_fork_of_a_background_run_happens_between_two_steps():
    never = Experiment(epochs=3, dropout=0.1).run()
    exp = Experiment(epochs=3, dropout=0.1)
    exp.on("step_completed", lambda e, _: time.sleep(0.002))  # keep it going while we fork
    exp.start()
    while exp.step_count < 5:
        time.sleep(0.001)
    child = exp.fork()
    assert exp.wait(60) and exp.state == "finished"
    _same_history(exp.history, never)
    at = child.step_count
    assert 5 <= at < exp.step_count and len(child.history) == at
    assert np.array_equal(
        child.history.series("train_loss")[1], never.series("train_loss")[1][:at]
    )
    child.run(epochs=3 - child.epoch_count)
    _same_history(child.history, never)


def test_fork_of_a_paused_run_and_its_refusals():
    exp = Experiment(epochs=50)
    exp.start()
    exp.pause()
    try:
        child = exp.fork(epochs=7)
        assert child.step_count == exp.step_count and exp.state == "paused"
        assert child.config.epochs == 7 and exp.config.epochs == 50
        with pytest.raises(ValueError, match="'hidden' is fixed for a run; fork\\(\\) can change"):
            exp.fork(hidden=(8,))
        with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
            exp.fork(lr=-1)
        seen = []

        def inside(e, _):
            try:
                e.fork()
            except RuntimeError as exc:
                seen.append(str(exc))
            e.stop()

        exp.on("step_completed", inside)
        exp.resume()
        exp.wait(30)
        assert seen and "cannot run inside an observer" in seen[0]
    finally:
        exp.stop()


# Checkpoints


def test_save_load_resumes_bit_for_bit_and_the_step_count_continues(tmp_path):
    never = Experiment(epochs=3, dropout=0.2, clip=0.5, seed=4)
    never.run()
    exp = Experiment(epochs=3, dropout=0.2, clip=0.5, seed=4)
    exp.on("step_completed", _stop_at(40))
    exp.run()
    exp.current_run.name = "mid-epoch"
    path = tmp_path / "run.pt"
    exp.save(path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["counters"]["step"] == 40 and "x_train" not in raw["data"]

    loaded = Experiment.load(path)
    assert (loaded.step_count, loaded.epoch_count, loaded.state) == (40, 1, "stopped")
    assert loaded.current_run.name == "mid-epoch" and loaded.run_id != exp.run_id
    _same_parameters(loaded, exp)
    assert loaded.optimizer.state_dict()["state"][0]["step"] == 40
    loaded.run(epochs=2)
    assert loaded.step_count == never.step_count
    _same_history(loaded.history, never.history)
    _same_parameters(loaded, never)
    kinds = [e.kind for e in loaded.history.events]
    assert kinds == ["started", "stopped", "started", "finished"]


def test_user_arrays_travel_in_the_checkpoint(tmp_path, small_data):
    exp = Experiment(data=small_data, hidden=(16,), epochs=2, batch_size=32)
    exp.run(epochs=1)
    exp.save(tmp_path / "user.pt")
    loaded = Experiment.load(tmp_path / "user.pt")
    assert loaded.data.name == "user data"
    assert torch.equal(loaded.data.x_train, exp.data.x_train)
    assert torch.equal(loaded.data.y_val, exp.data.y_val)
    assert list(loaded.data.classes) == [0, 1, 2]
    exp.run(epochs=1)
    loaded.run(epochs=1)
    _same_history(loaded.history, exp.history)


def test_pending_changes_and_live_settings_survive_a_checkpoint(tmp_path):
    exp = Experiment(epochs=1)
    exp.run()
    exp.set(dropout=0.3)
    exp.save(tmp_path / "c.pt")
    loaded = Experiment.load(tmp_path / "c.pt")
    assert loaded.config.dropout == 0.3 and loaded.model.blocks[0].drop.p == 0.3
    assert [c.label for c in loaded.history.changes()] == ["dropout off→0.3"]


class Arbitrary:
    """Any class: rebuilding it means importing and calling code named by the file."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_a_file_that_needs_unpickling_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nbtrain-checkpoint", "thing": Arbitrary()}, path)
    with pytest.raises(ValueError, match=r"refusing to load '.*evil\.pt': it holds objects"):
        Experiment.load(path)
    assert "unpickling ran code" not in capsys.readouterr().out
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"weights\.pt' is not an nbtrain checkpoint"):
        Experiment.load(other)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"old")

    def broken(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    atomic_write(path, lambda h: pickle.dump(1, h))
    assert pickle.loads(path.read_bytes()) == 1


def test_save_during_a_background_run_is_taken_between_two_steps(tmp_path):
    never = Experiment(epochs=2, dropout=0.1, seed=5)
    never.run()
    exp = Experiment(epochs=2, dropout=0.1, seed=5)
    exp.on("step_completed", lambda e, _: time.sleep(0.002))
    exp.start()
    while exp.step_count < 5:
        time.sleep(0.001)
    exp.save(tmp_path / "live.pt")
    assert exp.wait(60) and exp.state == "finished"
    loaded = Experiment.load(tmp_path / "live.pt")
    assert 5 <= loaded.step_count < exp.step_count and loaded.state == "stopped"
    loaded.run(epochs=2 - loaded.epoch_count)
    _same_history(loaded.history, never.history)
    _same_parameters(loaded, never)


def test_digits_that_differ_from_the_saved_ones_are_refused(tmp_path, monkeypatch):
    exp = Experiment(epochs=1)
    exp.save(tmp_path / "d.pt")
    import nbtrain.data

    real = nbtrain.data.load_digits

    def mirrored():  # the same pixels, each image flipped left to right
        x, y = real()
        return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64).copy(), y

    monkeypatch.setattr(nbtrain.data, "load_digits", mirrored)
    with pytest.raises(ValueError, match="digits data re-created for this checkpoint differs"):
        Experiment.load(tmp_path / "d.pt")


def test_augmentation_early_stopping_and_a_small_noisy_split_resume_exactly(tmp_path):
    # Note: restore_best would put the best weights back when the first part stops, and the
    # resumed run would then differ from one never stopped, by design.
    settings = dict(
        epochs=4,
        augment=True,
        patience=50,
        restore_best=False,
        train_size=300,
        label_noise=0.2,
        seed=2,
    )
    never = Experiment(**settings)
    never.run()
    exp = Experiment(**settings)
    exp.on("step_completed", _stop_at(12))  # 5 steps an epoch: mid-way through the third
    exp.run()
    exp.save(tmp_path / "run.pt")
    loaded = Experiment.load(tmp_path / "run.pt")
    assert loaded.early_stopping.best_step == exp.early_stopping.best_step
    loaded.run(epochs=4 - loaded.epoch_count)
    assert loaded.step_count == never.step_count
    _same_history(loaded.history, never.history)
    assert loaded.early_stopping.best == never.early_stopping.best


# Checkpoints of your own model, data, loss and optimizer


def _net():
    torch.manual_seed(3)  # the same initial weights each time, as "built the same way"
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )


def _momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def test_your_own_model_and_optimizer_resume_bit_for_bit(tmp_path, small_data):
    exp = Experiment(
        model=_net(), train_data=small_data, optimizer=_momentum, epochs=3, batch_size=32
    )
    exp.on("step_completed", _stop_at(12))  # mid-epoch: 8 steps an epoch
    exp.run()
    exp.save(tmp_path / "own.pt")
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    assert raw["yours"] == {"model": "Sequential", "optimizer": "SGD"}
    assert "x_train" in raw["data"]  # your tensors travel in the file

    loaded = Experiment.load(tmp_path / "own.pt", model=_net(), optimizer=_momentum)
    assert (loaded.step_count, loaded.epoch_count) == (12, 1)
    _same_parameters(loaded, exp)
    assert torch.equal(
        loaded.optimizer.state_dict()["state"][0]["momentum_buffer"],
        exp.optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    exp.run(epochs=2)
    loaded.run(epochs=2)
    assert loaded.step_count == exp.step_count == 24
    _same_history(loaded.history, exp.history)
    _same_parameters(loaded, exp)
    # reset() starts both over from the weights the model had when the experiment was made.
    exp.reset()
    loaded.reset()
    _same_parameters(loaded, exp)


def test_load_without_your_model_names_what_to_pass(tmp_path, small_data):
    exp = Experiment(model=_net(), train_data=small_data, epochs=1)
    exp.save(tmp_path / "own.pt")
    with pytest.raises(
        ValueError,
        match=r"saved from your own model \(Sequential\); pass it: "
        r"Experiment\.load\(path, model=\.\.\.\)",
    ):
        Experiment.load(tmp_path / "own.pt")
    both = Experiment(
        model=_net(), train_data=small_data, loss_fn=torch.nn.CrossEntropyLoss(), epochs=1
    )
    both.save(tmp_path / "both.pt")
    with pytest.raises(
        ValueError,
        match=r"your own model \(Sequential\) and loss function \(CrossEntropyLoss\); pass "
        r"them: Experiment\.load\(path, model=\.\.\., loss_fn=\.\.\.\)",
    ):
        Experiment.load(tmp_path / "both.pt")
    Experiment(epochs=1).save(tmp_path / "builtin.pt")
    with pytest.raises(ValueError, match=r"model= is not needed: .*built-in model \(mlp\)"):
        Experiment.load(tmp_path / "builtin.pt", model=_net())


def test_a_model_that_does_not_match_the_saved_weights_is_refused_by_name(tmp_path, small_data):
    exp = Experiment(model=_net(), train_data=small_data, epochs=1)
    exp.save(tmp_path / "own.pt")
    wider = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    with pytest.raises(
        ValueError,
        match=r"model=Sequential does not match the weights saved from Sequential: the given "
        r"model has no 3\.weight, 3\.bias; the checkpoint has no 2\.weight, 2\.bias; "
        r"0\.weight is \(32, 8\), saved \(16, 8\)",
    ):
        Experiment.load(tmp_path / "own.pt", model=wider)


def _loaders(x, y):
    shuffled = torch.Generator().manual_seed(5)
    train = torch.utils.data.DataLoader(
        Pairs(x[:240], y[:240]), batch_size=48, shuffle=True, generator=shuffled
    )
    return train, torch.utils.data.DataLoader(Pairs(x[240:], y[240:]), batch_size=60)


def test_your_dataloaders_are_passed_again_and_resume_at_an_epoch_boundary(tmp_path, small_data):
    exp = Experiment(model=_net(), train_data=Pairs(*small_data), epochs=3, batch_size=32)
    exp.run(epochs=1)
    exp.save(tmp_path / "ds.pt")
    with pytest.raises(
        ValueError, match=r"your own model \(Sequential\) and train_data \(Pairs\)"
    ):
        Experiment.load(tmp_path / "ds.pt")
    loaded = Experiment.load(tmp_path / "ds.pt", model=_net(), train_data=Pairs(*small_data))
    exp.run(epochs=2)
    loaded.run(epochs=2)
    _same_history(loaded.history, exp.history)

    # Your DataLoaders: their shuffling generator's state is in the file.
    exp = Experiment(
        model=_net(),
        train_data=_loaders(*small_data)[0],
        epochs=3,
        val_data=_loaders(*small_data)[1],
    )
    exp.run(epochs=1)
    exp.save(tmp_path / "dl.pt")
    train, val = _loaders(*small_data)
    loaded = Experiment.load(tmp_path / "dl.pt", model=_net(), train_data=train, val_data=val)
    exp.run(epochs=2)
    loaded.run(epochs=2)
    _same_history(loaded.history, exp.history)
    _same_parameters(loaded, exp)

    # Mid-epoch, a DataLoader's position is in its iterator, which no file holds.
    exp.on("step_completed", _stop_at(exp.step_count + 2))
    exp.run(epochs=1)
    with pytest.raises(ValueError, match=r"cannot hold a DataLoader's position inside an epoch"):
        exp.save(tmp_path / "mid.pt")


def test_a_fork_of_your_own_model_trains_its_own_copy(small_data):
    net = _net()
    exp = Experiment(model=net, train_data=small_data, optimizer=_momentum, epochs=2)
    exp.run(epochs=1)
    child = exp.fork()
    assert child.model is not net and type(child.model) is type(net)
    exp.run(epochs=1)
    child.run(epochs=1)
    _same_history(child.history, exp.history)
    _same_parameters(child, exp)
