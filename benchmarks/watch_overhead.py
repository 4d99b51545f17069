"""What watching your own loop costs: the same loop with and without nbtrain.watch.

Prints the ratio of the times, measured side by side (alternating runs, best of each).
Usage: python benchmarks/watch_overhead.py [--device cpu|cuda] [--steps 300]
"""

import argparse
import time

import torch
from torch import nn

import nbtrain


def loop(model, optimizer, x, y, steps, watcher=None):
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if watcher is not None:
            watcher.log(step=step, loss=loss)
    if x.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    layers = [nn.Linear(256, 256) for _ in range(8)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())], nn.Linear(256, 10))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 256, device=device), torch.randint(0, 10, (256,), device=device)
    watcher = nbtrain.watch(model, optimizer)
    watcher.close()  # hooks off for the plain runs; re-made for the watched ones
    plain, watched = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loop(model, optimizer, x, y, args.steps)
        plain.append(time.perf_counter() - start)
        w = nbtrain.watch(model, optimizer)
        start = time.perf_counter()
        loop(model, optimizer, x, y, args.steps, w)
        w.flush()  # what the panel would read, once
        watched.append(time.perf_counter() - start)
        w.close()
    print(f"device {device}, {args.steps} steps, 17 parameters, best of {args.repeats}")
    print(f"watched / plain time: {min(watched) / min(plain):.3f}")


if __name__ == "__main__":
    main()
