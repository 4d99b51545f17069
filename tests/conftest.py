import threading
import time

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: results are then exact from run to run (see the README)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_training_left_behind():
    """A test that leaves a training thread alive (a paused worker, a run never stopped)
    fails itself, rather than the later tests that count the threads."""
    yield
    deadline = time.monotonic() + 5  # a run that is ending gets a moment to end
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.name == "nbtrain-training"]
        if not left:
            return
        time.sleep(0.02)
    pytest.fail(f"{len(left)} training thread(s) still alive after the test: stop() them")


@pytest.fixture
def small_data():
    """300 samples, 8 features, 3 classes, separable enough to learn in a few epochs."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8).float()
    return x, y


# A lecturer's notebook, run by tests/test_lecture_recipe.py with the README's own command.
collect_ignore = ["fixtures"]
