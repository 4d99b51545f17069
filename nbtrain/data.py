"""Data for an experiment: the embedded digits set, or arrays the user brings.

Everything ends up as four tensors (train and validation inputs and labels), standardized
with statistics of the training split only, so no validation information leaks into training:
per feature for tabular data, one mean and std over all pixels for images (digits).
"""

from __future__ import annotations

import dataclasses
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
    task: str = "classification"  # or "regression": float targets of shape (n, outputs)

    @property
    def n_features(self) -> int:
        return self.x_train[0].numel()

    @property
    def n_classes(self) -> int:
        """Classes for classification; for regression, the number of target columns."""
        if self.task == "regression":
            return self.y_train.shape[1] if self.y_train.ndim > 1 else 1
        return len(self.classes)

    def to(self, device: torch.device) -> Split:
        """The same split with every tensor on `device` (moved once, not per batch)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


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


def prepare(
    data: Any,
    *,
    val_fraction: float,
    seed: int,
    train_size: int | None = None,
    label_noise: float = 0.0,
    task: str = "classification",
) -> Split:
    """Split, standardize and convert `data` (None for digits, or a pair `(X, y)`).

    `train_size` keeps only that many training samples, drawn stratified from the training
    split, and `label_noise` replaces that share of the training labels by random classes
    (the validation set stays whole and clean): the ways to make a network memorize.
    A `Split` is taken as it is: forks and checkpoints hand over data already prepared.
    For ``task="regression"`` the targets stay numbers (float32, one column per output) and
    the split is random rather than stratified.
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
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(x) != len(y):
        raise ValueError(f"data X has {len(x)} rows but y has {len(y)} labels; they must match")
    if task == "regression":
        classes = np.zeros(0)
        y_index = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
        stratify = None
    else:
        classes, y_index = np.unique(np.asarray(y).reshape(-1), return_inverse=True)
        stratify = y_index

    x_train, x_val, y_train, y_val = train_test_split(
        x, y_index, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    if label_noise > 0 and task == "regression":
        raise ValueError("label_noise replaces class labels, and a regression has none")
    if train_size is not None and train_size < len(y_train):
        if train_size < len(classes):
            raise ValueError(
                f"train_size must be at least the number of classes ({len(classes)}), "
                f"got {train_size}"
            )
        x_train, _, y_train, _ = train_test_split(
            x_train,
            y_train,
            train_size=train_size,
            random_state=seed,
            stratify=y_train if task != "regression" else None,
        )
    if label_noise > 0:
        rng = np.random.default_rng(seed)
        flip = rng.random(len(y_train)) < label_noise
        y_train = y_train.copy()
        y_train[flip] = rng.integers(0, len(classes), int(flip.sum()))
    if image_shape is not None:
        # Images: one mean and std for all pixels, as image pipelines do. Per-pixel statistics
        # would give nearly blank border pixels a tiny std, and a shifted image (augmentation)
        # would turn a little ink there into a huge input.
        mean = np.full(x_train.shape[1], x_train.mean(), dtype=np.float32)
        std = np.full(x_train.shape[1], x_train.std(), dtype=np.float32)
    else:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # a constant feature stays zero instead of dividing by 0
    y_type = np.float32 if task == "regression" else np.int64
    return Split(
        x_train=torch.from_numpy((x_train - mean) / std),
        y_train=torch.from_numpy(y_train.astype(y_type)),
        x_val=torch.from_numpy((x_val - mean) / std),
        y_val=torch.from_numpy(y_val.astype(y_type)),
        classes=classes,
        name=name,
        mean=torch.from_numpy(mean),
        std=torch.from_numpy(std),
        image_shape=image_shape,
        task=task,
    )
