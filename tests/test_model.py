import math

import torch

from nbtrain import FunnelMLP, funnel_widths
from nbtrain.model import initialize


def test_funnel_widths_follow_the_input_features():
    assert funnel_widths(64) == (128, 64, 32)
    assert funnel_widths(10, depth=2) == (32, 16)


def test_dropout_changes_train_passes_only_and_only_when_on():
    torch.manual_seed(0)
    model = FunnelMLP(16, (32, 16), 4)
    x = torch.randn(8, 16)
    model.train()
    assert torch.equal(model(x), model(x))  # off: nothing random
    model.set_dropout(0.5)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_batchnorm_switch_normalizes_hidden_activations():
    torch.manual_seed(0)
    model = FunnelMLP(4, (8,), 2, activation="tanh")
    x = torch.randn(64, 4) * 10 + 5
    pre = model.blocks[0].linear(x)
    model.set_batchnorm(True)
    normed = model.blocks[0].norm(pre)
    assert torch.allclose(normed.mean(dim=0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(model.blocks[0](x), torch.tanh(normed))
    model.set_batchnorm(False)
    assert torch.allclose(model.blocks[0](x), torch.tanh(pre))


def test_he_initialization_has_the_he_standard_deviation():
    torch.manual_seed(0)
    model = FunnelMLP(64, (128,), 10)
    initialize(model, "he", "relu")
    weight = model.blocks[0].linear.weight
    assert abs(weight.std().item() - math.sqrt(2 / 64)) < 0.01
    assert torch.count_nonzero(model.blocks[0].linear.bias) == 0
