"""The training-challenges presets: one per classic way training goes wrong, and a baseline.

``Experiment(preset="vanishing", seed=1)`` starts from a preset's configuration; any other
keyword overrides it. Each preset shows its symptom on the embedded digits data, for any
seed, within ``budget_steps`` optimizer steps (a few seconds of CPU): the tests check that
the matching detector of `nbtrain.diagnosis` fires within that budget for several seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    recipe: str  # what is in it, in one line
    why: str  # why that produces the symptom
    budget_steps: int  # the detector fires within this many steps, for any seed


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "healthy",
            dict(
                hidden=(128, 64, 32),
                activation="relu",
                init="he",
                optimizer="adam",
                lr=1e-3,
                epochs=20,
            ),
            "funnel 128-64-32, ReLU, He init, Adam lr=1e-3, batch 64",
            "the course's starting point: every layer learns at a similar pace",
            460,
        ),
        Preset(
            "vanishing",
            dict(
                hidden=(64,) * 8,
                activation="sigmoid",
                init="xavier",
                optimizer="sgd",
                lr=0.1,
                epochs=15,
            ),
            "8 sigmoid layers of 64, Xavier init, plain SGD lr=0.1",
            "sigmoid's slope is at most 1/4, so each layer passes back less than a quarter of "
            "the gradient it receives; after 8 layers the first one gets almost nothing, and "
            "the loss stalls near chance",
            100,
        ),
        Preset(
            "exploding",
            dict(
                hidden=(128,) * 6,
                activation="relu",
                init="he",
                optimizer="momentum",
                lr=0.3,
                epochs=10,
            ),
            "6 ReLU layers of 128, He init, SGD with momentum 0.9 at lr=0.3",
            "a learning rate far too large for a deep unnormalized network: each update makes "
            "the weights larger, larger weights make larger gradients, and within a few dozen "
            "steps the loss and gradient norms grow by orders of magnitude to inf or NaN",
            150,
        ),
        Preset(
            "overfitting",
            dict(
                hidden=(256, 256),
                train_size=300,
                label_noise=0.3,
                optimizer="adam",
                lr=1e-3,
                batch_size=32,
                epochs=60,
            ),
            "two layers of 256 on 300 training digits, 30% of their labels replaced by random "
            "ones; Adam lr=1e-3, no regularization",
            "85,000 weights for 300 examples: the network learns the digits, then memorizes "
            "the wrong labels too (training accuracy 1.0), and what it memorizes does not carry "
            "over to the clean validation set, so the gap grows",
            250,
        ),
        Preset(
            "underfitting",
            dict(hidden=(2,), activation="tanh", optimizer="adam", lr=0.05, epochs=30),
            "a bottleneck of 2 tanh units between 64 pixels and 10 classes, Adam lr=0.05",
            "two numbers cannot separate ten digits: training and validation accuracy level "
            "off together, far below what the data allows",
            400,
        ),
        Preset(
            "slow",
            dict(
                hidden=(128, 64, 32),
                activation="relu",
                init="he",
                optimizer="sgd",
                lr=1e-3,
                epochs=30,
            ),
            "the healthy network, but plain SGD at lr=1e-3",
            "the right model with steps far too small for plain SGD: the loss falls steadily "
            "but would need thousands of steps where Adam needs a few hundred",
            300,
        ),
    )
}

#: The preset names, baseline first (also ``nbtrain.presets``).
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name].config)
