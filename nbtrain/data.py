"""Data for an experiment: the embedded digits set, or arrays the user brings.

Everything ends up as four tensors (train and validation inputs and labels), standardized
with statistics of the training split only, so no validation information leaks into training:
per feature for tabular data, one mean and std over all pixels for images (digits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class Split:
    """Standardized train and validation tensors, and what a model needs to know of them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: np.ndarray  # original label values; the tensors hold their indices 0..n-1
    name: str
    mean: torch.Tensor  # the training statistics the inputs were standardized with
    std: torch.Tensor
    image_shape: tuple[int, int] | None = None  # (height, width) when rows are images

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: 1,797 images, 64 features, 10 classes; ships with sklearn."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")


def _check_inputs(x: np.ndarray) -> np.ndarray:
    """Inputs as float32, refused if not numbers or not finite (say where, so it can be fixed)."""
    if x.dtype.kind not in "biuf":
        raise ValueError(f"data X must hold real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # float64 and integers alike; overflow becomes inf
        x32 = np.asarray(x, dtype=np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"data X must be finite, got {int(bad.sum())} NaN or infinite value(s) "
            f"(beyond float32's range counts as infinite); the first at index {first}"
        )
    return x32


def _check_labels(y: np.ndarray, n_rows: int) -> np.ndarray:
    if y.ndim > 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ValueError(
            f"data y must hold one class label per row (shape ({n_rows},)), got shape {y.shape}"
        )
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ValueError(
            f"data y must be finite class labels, got {int((~np.isfinite(y)).sum())}"
            " NaN or infinite label(s)"
        )
    return y


def _split(
    x: np.ndarray, y_index: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Stratified when it can be, else a plain seeded shuffle.

    The rule: stratify when every class has at least 2 samples and each split has room for
    one sample of every class (scikit-learn's own conditions); otherwise (a class seen once,
    or more classes than validation samples) shuffle and cut, which still keeps
    `val_fraction` of the rows for validation.
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y_index)
    n_val = math.ceil(val_fraction * len(y_index))  # scikit-learn's rounding for test_size
    n_classes = len(counts)
    can_stratify = counts.min() >= 2 and min(n_val, len(y_index) - n_val) >= n_classes
    return train_test_split(
        x,
        y_index,
        test_size=val_fraction,
        random_state=seed,
        stratify=y_index if can_stratify else None,
    )


def prepare(
    data: Any,
    *,
    val_fraction: float,
    seed: int,
    train_size: int | None = None,
    label_noise: float = 0.0,
) -> Split:
    """Split, standardize and convert `data` (None for digits, or a pair `(X, y)`).

    `train_size` keeps only that many training samples, drawn stratified from the training
    split, and `label_noise` replaces that share of the training labels by random classes
    (the validation set stays whole and clean): the ways to make a network memorize.
    A `Split` is taken as it is: forks and checkpoints hand over data already prepared.

    X may be any real dtype (float64 and integers are converted to float32) and any shape
    whose first axis is the samples (images are flattened). y may hold any labels: they are
    mapped to 0..n-1 in sorted order, the originals kept in `Split.classes`.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(data, Split):
        return data

    image_shape = None
    if data is None:
        x, y = load_digits()
        name, image_shape = "digits", (8, 8)
    else:
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(f"data must be None (digits) or a pair (X, y), got {data!r:.80}")
        x, y = _as_numpy("data X", data[0]), _as_numpy("data y", data[1])
        name = "user data"
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            f"data X and y must be arrays over samples, got shapes {x.shape}, {y.shape}"
        )
    if len(x) != len(y):
        raise ValueError(f"data X has {len(x)} rows but y has {len(y)} labels; they must match")
    n_val = math.ceil(val_fraction * len(x))
    if len(x) - n_val < 1 or n_val < 1:
        raise ValueError(
            f"data must leave at least one sample for training and one for validation with "
            f"val_fraction={val_fraction:g}, got {len(x)} rows"
        )
    x = _check_inputs(x).reshape(len(x), -1)
    y = _check_labels(y, len(x))
    classes, y_index = np.unique(y, return_inverse=True)

    x_train, x_val, y_train, y_val = _split(x, y_index, val_fraction, seed)
    if train_size is not None and train_size < len(y_train):
        if train_size < len(classes):
            raise ValueError(
                f"train_size must be at least the number of classes ({len(classes)}), "
                f"got {train_size}"
            )
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=train_size, random_state=seed, stratify=y_train
        )
    if label_noise > 0:
        rng = np.random.default_rng(seed)
        flip = rng.random(len(y_train)) < label_noise
        y_train = y_train.copy()
        y_train[flip] = rng.integers(0, len(classes), int(flip.sum()))
    # Statistics in float64: float32 sums of large inputs would overflow to inf.
    if image_shape is not None:
        # Images: one mean and std for all pixels, as image pipelines do. Per-pixel statistics
        # would give nearly blank border pixels a tiny std, and a shifted image (augmentation)
        # would turn a little ink there into a huge input.
        mean = np.full(x_train.shape[1], x_train.mean(dtype=np.float64))
        std = np.full(x_train.shape[1], x_train.std(dtype=np.float64))
    else:
        mean = x_train.mean(axis=0, dtype=np.float64)
        std = x_train.std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0  # a constant feature stays zero instead of dividing by 0
    return Split(
        x_train=torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_val=torch.from_numpy(((x_val - mean) / std).astype(np.float32)),
        y_val=torch.from_numpy(y_val.astype(np.int64)),
        classes=classes,
        name=name,
        mean=torch.from_numpy(mean.astype(np.float32)),
        std=torch.from_numpy(std.astype(np.float32)),
        image_shape=image_shape,
    )
