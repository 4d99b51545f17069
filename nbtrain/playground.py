"""Playground mode: 2-D toy datasets, input features as switches, and the boundary they learn.

After TensorFlow Playground: a small 2-D classification problem (circles, XOR, two Gaussians,
spirals, moons), a choice of input features computed from the two coordinates (x1, x2, x1^2,
x2^2, x1*x2, sin(x1), sin(x2)), and the model's class probability over a grid that covers the
data. Pure numpy and PyTorch, like the engine; the views are in `nbtrain.panel.playground`.

The data change when the features do, so a feature change is a new `Experiment`, not a
`restart()`: `Playground` owns the dataset, the features and the experiment built from them.

`RegressionPlayground` is the 1-D counterpart for the underfitting and overfitting lessons:
a noisy sine (`make_sine`), an MLP trained on it by a regression `Experiment`, and the
fitted curve over a dense grid of x.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .engine import Experiment

DATASETS: tuple[str, ...] = ("circles", "xor", "gaussians", "spirals", "moons")

# Each feature is a function of the two raw coordinates, in the order the switches show.
FEATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "x1": lambda x1, x2: x1,
    "x2": lambda x1, x2: x2,
    "x1^2": lambda x1, x2: x1**2,
    "x2^2": lambda x1, x2: x2**2,
    "x1*x2": lambda x1, x2: x1 * x2,
    "sin(x1)": lambda x1, x2: np.sin(x1),
    "sin(x2)": lambda x1, x2: np.sin(x2),
}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    return int(value)


def _check_noise(noise: Any) -> float:
    ok = isinstance(noise, (int, float)) and not isinstance(noise, bool) and 0 <= noise <= 1
    if not ok:
        raise ValueError(f"noise must be a number in [0, 1], got {noise!r}")
    return float(noise)


def make_dataset(
    name: str, n_samples: int = 400, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n_samples` points in 2-D and their labels 0/1, the same for the same seed.

    `noise` is on the scale of the data (which spans about [-1, 1] on each axis, [-1, 2] for
    moons): the standard deviation of Gaussian jitter added to each coordinate, and for
    two Gaussians the spread of each cloud around its centre (at least 0.1, so noise=0
    still gives two clouds rather than two points). Classes are balanced (to within one)
    except for xor, whose points are uniform over the square.
    """
    from sklearn.datasets import make_blobs, make_circles, make_moons

    n = _check_int("n_samples", n_samples, 4)
    noise = _check_noise(noise)
    seed = _check_int("seed", seed, 0)
    if name == "circles":
        x, y = make_circles(n, noise=noise, factor=0.5, random_state=seed)
    elif name == "moons":
        x, y = make_moons(n, noise=noise, random_state=seed)
    elif name == "gaussians":
        centers = np.array([[-0.5, -0.5], [0.5, 0.5]])
        x, y = make_blobs(n, centers=centers, cluster_std=max(noise, 0.1), random_state=seed)
    elif name == "xor":
        x, y = _xor(n, noise, np.random.default_rng(seed))
    elif name == "spirals":
        x, y = _spirals(n, noise, np.random.default_rng(seed))
    else:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")
    return x.astype(np.float32), y.astype(np.int64)


def _xor(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform in the square [-1, 1]^2, class 1 where x1 and x2 have the same sign.

    Points closer than 0.05 to an axis are pushed out by 0.05 so the quadrants, before
    noise, are separated by a visible gap, as in the Playground.
    """
    x = rng.uniform(-1, 1, size=(n, 2))
    x += np.sign(x) * 0.05
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    return x + rng.normal(0, noise, size=x.shape), y


def _spirals(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved arms of 1.75 turns each; the second is the first turned by pi."""
    y = np.arange(n) % 2
    t = np.sqrt(rng.uniform(0, 1, size=n))  # more points outward, where the arm is longer
    angle = t * 1.75 * 2 * np.pi + np.pi * y
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
    return x + rng.normal(0, noise, size=x.shape), y


def make_sine(
    n_samples: int = 60, noise: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy sine for regression: x uniform in [-pi, pi] (shape (n, 1)), y = sin(x) + noise.

    Few points and some noise, so a wide network can chase the noise (overfitting) and a
    linear one cannot bend (underfitting).
    """
    n = _check_int("n_samples", n_samples, 2)
    noise = _check_noise(noise)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    x = np.sort(rng.uniform(-np.pi, np.pi, size=n)).reshape(n, 1)
    y = np.sin(x[:, 0]) + rng.normal(0, noise, size=n)
    return x.astype(np.float32), y.astype(np.float32)


def check_features(features: Iterable[str]) -> tuple[str, ...]:
    """The switched-on features in the switches' order; at least one, each known."""
    if isinstance(features, str):
        features = (features,)
    chosen = list(features)
    for name in chosen:
        if name not in FEATURES:
            raise ValueError(f"features: unknown feature {name!r}; allowed: {', '.join(FEATURES)}")
    if not chosen:
        raise ValueError(
            f"features must switch on at least one input, got none; allowed: {', '.join(FEATURES)}"
        )
    return tuple(name for name in FEATURES if name in chosen)


def transform(x: np.ndarray, features: Sequence[str]) -> np.ndarray:
    """The feature columns of raw points `x` (shape (n, 2)), in the order of `features`."""
    x = np.asarray(x, dtype=np.float32)
    x1, x2 = x[:, 0], x[:, 1]
    return np.stack([FEATURES[name](x1, x2) for name in features], axis=1).astype(np.float32)


def split_indices(
    y: np.ndarray, val_fraction: float, seed: int, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are training and which validation, as `nbtrain.data.prepare` splits them.

    The same call with the same arguments (scikit-learn's split depends only on the number
    of rows, the labels and the seed), so the raw points can be drawn where the engine put
    them; a test checks the two agree. A regression's split is not stratified.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train, val = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=y if stratify else None
    )
    return train, val


def _forward_at_boundary(
    experiment: Experiment, inputs: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[np.ndarray, int, float]:
    """`output(model(inputs))` as numpy, the step it is of, and the seconds it took.

    One batched forward pass at a step boundary (`Experiment.at_boundary`), in eval mode
    and without gradients: it never reads a model halfway through an update, and
    dropout or batch norm in train mode do not make the picture flicker.
    """

    def forward() -> tuple[np.ndarray, int, float]:
        started = time.perf_counter()
        model = experiment.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                values = output(model(inputs.to(experiment.device))).cpu().numpy()
        finally:
            model.train(was_training)
        return values, experiment.step_count, time.perf_counter() - started

    return experiment.at_boundary(forward)


@dataclasses.dataclass
class Grid:
    """The model's probability of class 1 on a grid over the data, in raw coordinates.

    `prob[i, j]` is at (x1[j], x2[i]): rows go along x2, as a heat map draws them.
    """

    x1: np.ndarray
    x2: np.ndarray
    prob: np.ndarray
    step: int
    seconds: float  # the forward pass and its transfer, for the cost per update


def grid_axes(x: np.ndarray, resolution: int, margin: float = 0.1) -> tuple[np.ndarray, ...]:
    """Two axes covering the points `x` with a margin of `margin` times their range."""
    low, high = x.min(axis=0), x.max(axis=0)
    pad = (high - low) * margin
    return tuple(
        np.linspace(low[k] - pad[k], high[k] + pad[k], resolution, dtype=np.float32)
        for k in range(2)
    )


class _Bench:
    """What both playgrounds share: data drawn from a few settings, and the experiment on it.

    A subclass names its data settings in `_DATA_KEYS` (attributes of the same names) and
    builds data and experiment from a config and them in `_build(config, **data)`, validating
    everything before it replaces anything.
    """

    _DATA_KEYS: tuple[str, ...] = ()
    _STRATIFY = True  # the engine stratifies a classification's split, not a regression's
    experiment: Experiment
    y: np.ndarray

    def __init__(self) -> None:
        self._rebuild_callbacks: list[Callable[[Experiment], None]] = []
        self._split: tuple[tuple[int, int, int, float], tuple[np.ndarray, np.ndarray]] | None = (
            None
        )

    @property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the data that are training and validation, as the engine split them.

        Follows the experiment: a restart with another seed or split from the dashboard
        re-splits the same points, and the panel redraws them where they went.
        """
        cfg = self.experiment.config
        key = (id(self.experiment), id(self.y), cfg.seed, cfg.val_fraction)
        if self._split is None or self._split[0] != key:
            indices = split_indices(self.y, cfg.val_fraction, cfg.seed, stratify=self._STRATIFY)
            self._split = (key, indices)
        return self._split[1]

    @property
    def train_index(self) -> np.ndarray:
        return self.split[0]

    @property
    def val_index(self) -> np.ndarray:
        return self.split[1]

    def restart(self, **changes: Any) -> Experiment:
        """A new experiment on new data, or with new settings; returns it.

        `changes` may name the data settings (see the class) and anything `Experiment`
        takes. The experiment trained so far is stopped and kept in the session's runs.
        """
        old = self.experiment
        args = {k: changes.pop(k, getattr(self, k)) for k in self._DATA_KEYS}
        config = {**dataclasses.asdict(old.config), **changes}
        config.pop("val_fraction")
        self._build(config=config, **args)  # a refused change raises here: the old run goes on
        old.stop()
        for callback in self._rebuild_callbacks:
            callback(self.experiment)
        return self.experiment

    def on_rebuild(self, callback: Callable[[Experiment], None]) -> None:
        """Call `callback(new_experiment)` after each `restart`."""
        self._rebuild_callbacks.append(callback)


class Playground(_Bench):
    """A 2-D dataset, the input features drawn from it, and the experiment trained on them.

    >>> pg = Playground("xor", features=("x1", "x2", "x1*x2"), hidden=(), epochs=1)
    >>> pg.experiment.data.n_features
    3

    Parameters:
        dataset: one of `DATASETS`.
        n_samples, noise: see `make_dataset`.
        val_fraction: the share of points held out for validation (stratified).
        features: the switched-on inputs (names from `FEATURES`).
        resolution: grid points per axis of the decision boundary.
        **config: anything `Experiment` takes (``hidden``, ``lr``, ``seed``...); the seed
            also draws the data.

    Changing the dataset, its size or noise, the split or the features (`restart`) builds a
    new experiment with the current experiment's settings; callbacks registered with
    `on_rebuild` (the panel's) then move to it.
    """

    _DATA_KEYS = ("dataset", "n_samples", "noise", "val_fraction", "features")

    def __init__(
        self,
        dataset: str = "circles",
        *,
        n_samples: int = 400,
        noise: float = 0.1,
        val_fraction: float = 0.3,
        features: Iterable[str] = ("x1", "x2"),
        resolution: int = 50,
        **config: Any,
    ) -> None:
        super().__init__()
        self.resolution = _check_int("resolution", resolution, 2)
        config = {"hidden": (8, 8), "lr": 0.01, "batch_size": 32, "epochs": 60, **config}
        self._build(config, dataset, n_samples, noise, val_fraction, features)

    def _build(
        self,
        config: dict[str, Any],
        dataset: str,
        n_samples: int,
        noise: float,
        val_fraction: float,
        features: Iterable[str],
    ) -> None:
        # Validate everything before replacing anything: a refused change keeps the old state.
        features = check_features(features)
        seed = config.get("seed", 0)
        x, y = make_dataset(dataset, n_samples, noise, seed)
        experiment = Experiment(
            data=(transform(x, features), y), val_fraction=val_fraction, **config
        )
        self.dataset, self.n_samples, self.noise = dataset, n_samples, noise
        self.val_fraction, self.features = val_fraction, features
        self.x, self.y = x, y
        self.axes = grid_axes(x, self.resolution)
        self.experiment = experiment

    def features_of(self, points: np.ndarray) -> torch.Tensor:
        """Raw 2-D points as the model sees them: features, then the training statistics."""
        data = self.experiment.data
        columns = torch.from_numpy(transform(points, self.features))
        return (columns - data.mean.cpu()) / data.std.cpu()

    def grid_points(self) -> np.ndarray:
        """Every grid point in raw coordinates, row by row along x2 (shape (r*r, 2))."""
        g1, g2 = np.meshgrid(*self.axes)
        return np.stack([g1.ravel(), g2.ravel()], axis=1)

    def _probabilities(self, inputs: torch.Tensor) -> tuple[np.ndarray, int, float]:
        """Class-1 probabilities of `inputs`, the step they are of, and the seconds taken."""
        return _forward_at_boundary(
            self.experiment, inputs, lambda logits: torch.softmax(logits, dim=1)[:, 1]
        )

    def grid(self) -> Grid:
        """The class-1 probability over the grid covering the data."""
        prob, step, seconds = self._probabilities(self.features_of(self.grid_points()))
        shape = (len(self.axes[1]), len(self.axes[0]))
        return Grid(self.axes[0], self.axes[1], prob.reshape(shape), step, seconds)

    def predict_proba(self, points: np.ndarray) -> np.ndarray:
        """The class-1 probability at raw 2-D points (shape (n, 2))."""
        return self._probabilities(self.features_of(points))[0]

    def __repr__(self) -> str:
        return (
            f"Playground({self.dataset}, {self.n_samples} points, noise {self.noise:g}, "
            f"features {', '.join(self.features)})"
        )


@dataclasses.dataclass
class Curve:
    """A regression model's prediction at increasing inputs `x`, in the targets' units."""

    x: np.ndarray
    y: np.ndarray
    step: int
    seconds: float  # the forward pass and its transfer, for the cost per update


class RegressionPlayground(_Bench):
    """A noisy sine, the MLP a regression `Experiment` fits to it, and the fitted curve.

    The underfitting and overfitting lessons: no hidden layer (``hidden=()``, a straight
    line) cannot bend to the sine; a few layers fit it to within the noise; a wide network
    on a handful of noisy points passes through them and swings between them, its training
    loss far below its validation loss.

    >>> pg = RegressionPlayground(n_samples=40, hidden=(16,), epochs=1)
    >>> pg.experiment.task, pg.curve().y.shape
    ('regression', (200,))

    Parameters:
        n_samples, noise: see `make_sine` (x in [-pi, pi], y = sin(x) + noise).
        val_fraction: the share of points held out for validation (a random split).
        resolution: points of x at which the curve is drawn.
        **config: anything `Experiment` takes (``hidden`` sets the width and depth, ``lr``,
            ``seed``...); the seed also draws the data. The loss is the mean squared error.

    Changing the size, the noise or the split (`restart`) builds a new experiment with the
    current experiment's settings, as `Playground` does; so does a change of ``hidden``.
    """

    _DATA_KEYS = ("n_samples", "noise", "val_fraction")
    _STRATIFY = False
    dataset = "sine"

    def __init__(
        self,
        *,
        n_samples: int = 100,
        noise: float = 0.2,
        val_fraction: float = 0.3,
        resolution: int = 200,
        **config: Any,
    ) -> None:
        super().__init__()
        self.resolution = _check_int("resolution", resolution, 2)
        config = {"hidden": (32, 32), "lr": 0.01, "batch_size": 32, "epochs": 100, **config}
        self._build(config, n_samples, noise, val_fraction)

    def _build(
        self, config: dict[str, Any], n_samples: int, noise: float, val_fraction: float
    ) -> None:
        # Validate everything before replacing anything: a refused change keeps the old state.
        x, y = make_sine(n_samples, noise, config.get("seed", 0))
        experiment = Experiment(
            data=(x, y), task="regression", val_fraction=val_fraction, **config
        )
        self.n_samples, self.noise, self.val_fraction = n_samples, noise, val_fraction
        self.x, self.y = x, y
        # The curve covers the data with a margin, so the extrapolation shows too.
        low, high = float(x.min()), float(x.max())
        pad = 0.1 * (high - low)
        self.curve_x = np.linspace(low - pad, high + pad, self.resolution, dtype=np.float32)
        self.experiment = experiment

    def features_of(self, points: np.ndarray) -> torch.Tensor:
        """Raw inputs x (shape (n,) or (n, 1)) as the model sees them: standardized with the
        training statistics, as the engine standardized the data."""
        data = self.experiment.data
        column = torch.from_numpy(np.asarray(points, dtype=np.float32).reshape(-1, 1))
        return (column - data.mean.cpu()) / data.std.cpu()

    def _predictions(self, inputs: torch.Tensor) -> tuple[np.ndarray, int, float]:
        # The targets are not standardized (nbtrain.data.prepare), so the model's output is
        # already in their units.
        return _forward_at_boundary(self.experiment, inputs, lambda out: out[:, 0])

    def curve(self) -> Curve:
        """The model's prediction over `curve_x`: one batched forward pass, between steps."""
        y, step, seconds = self._predictions(self.features_of(self.curve_x))
        return Curve(self.curve_x, y, step, seconds)

    def predict(self, points: np.ndarray) -> np.ndarray:
        """The model's prediction at raw inputs x (shape (n,) or (n, 1)), shape (n,)."""
        return self._predictions(self.features_of(points))[0]

    def __repr__(self) -> str:
        return (
            f"RegressionPlayground(sine, {self.n_samples} points, noise {self.noise:g}, "
            f"hidden {self.experiment.config.hidden})"
        )
