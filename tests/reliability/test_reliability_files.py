"""Exports are written atomically: a failure mid-write leaves the previous file intact."""

import csv
import os
import stat

import pytest

from nbtrain import Experiment
from nbtrain._io import atomic_write


@pytest.fixture
def history(small_data):
    return Experiment(data=small_data, hidden=(8,), epochs=1).run()


class DiskFull(OSError):
    pass


def test_a_crash_mid_export_leaves_the_old_csv_and_no_temporary_file(
    history, tmp_path, monkeypatch
):
    path = tmp_path / "run.csv"
    path.write_text("the previous export\n")
    rows_written = []
    real_writer = csv.writer

    def failing_writer(handle):
        writer = real_writer(handle)

        class Failing:
            def writerow(self, row):
                rows_written.append(row)
                if len(rows_written) == 20:
                    raise DiskFull(28, "No space left on device")
                return writer.writerow(row)

        return Failing()

    monkeypatch.setattr(csv, "writer", failing_writer)
    with pytest.raises(DiskFull):
        history.to_csv(path)
    assert len(rows_written) == 20  # it really was interrupted mid-write
    assert path.read_text() == "the previous export\n"
    assert os.listdir(tmp_path) == ["run.csv"]


def test_keyboard_interrupt_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "wb") as handle:
            handle.write(b"half of the new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        with atomic_write(path) as handle:
            handle.write("new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_a_complete_export_replaces_the_file_and_keeps_its_permissions(history, tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("old")
    os.chmod(path, 0o640)
    history.to_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["table", "step", "epoch", "name", "value"]
    steps = {int(r[1]) for r in rows[1:] if r[0] == "step"}
    assert steps == set(range(1, len(history) + 1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.csv"
    history.to_csv(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_atomic_write_refuses_modes_that_are_not_a_fresh_write(tmp_path):
    with pytest.raises(ValueError, match=r"mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert os.listdir(tmp_path) == []
