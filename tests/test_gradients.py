import math

import torch
from torch import nn

from nbtrain.gradients import GradientProbe


def _independent(layer):
    grads = [p.grad.flatten() for p in layer.parameters()]
    flat = torch.cat(grads)
    return flat.norm().item(), flat.abs().mean().item(), flat.abs().max().item()


def test_per_layer_statistics_equal_an_independent_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3))
    layers = [("first", model[0]), ("last", model[3])]
    probe = GradientProbe(model, layers)
    model(torch.randn(16, 6)).pow(2).sum().backward()

    stats = probe.measure().tolist()
    values = dict(zip(probe.columns, stats))
    for name, layer in layers:
        norm, mean, mx = _independent(layer)
        assert math.isclose(values[f"grad_norm/{name}"], norm, rel_tol=1e-5)
        assert math.isclose(values[f"grad_mean/{name}"], mean, rel_tol=1e-5)
        assert math.isclose(values[f"grad_max/{name}"], mx, rel_tol=1e-5)
    everything = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert math.isclose(values["grad_norm"], everything.norm().item(), rel_tol=1e-5)


def test_a_layer_without_gradient_reads_nan_not_zero():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    probe = GradientProbe(model, [("used", model[0]), ("unused", model[1])])
    model[0](torch.randn(4, 3)).sum().backward()
    values = dict(zip(probe.columns, probe.measure().tolist()))
    assert values["grad_norm/used"] > 0
    assert math.isnan(values["grad_norm/unused"]) and math.isnan(values["grad_max/unused"])


def test_the_cpu_fast_path_and_the_foreach_path_agree_with_an_independent_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    layers = [("a", model[0]), ("b", model[2]), ("c", model[4])]
    probe = GradientProbe(model, layers)
    model(torch.randn(32, 7)).pow(3).sum().backward()

    fast = probe.measure_raw()  # every gradient present, float32 on the CPU: numpy's reduceat
    grads = [p.grad for p in probe.parameters]
    foreach = torch.stack(
        [*torch._foreach_norm(grads, 2), *torch._foreach_norm(grads, 1)]
        + list(torch._foreach_norm(grads, math.inf))
    )
    torch.testing.assert_close(fast, foreach, rtol=1e-5, atol=0)
    values = dict(zip(probe.columns, probe.combine(fast)[0].tolist(), strict=True))
    for name, layer in layers:
        norm, mean, mx = _independent(layer)
        assert math.isclose(values[f"grad_norm/{name}"], norm, rel_tol=1e-5)
        assert math.isclose(values[f"grad_mean/{name}"], mean, rel_tol=1e-5)
        assert math.isclose(values[f"grad_max/{name}"], mx, rel_tol=1e-5)
