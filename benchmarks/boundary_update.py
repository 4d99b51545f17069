"""What one decision-boundary update costs, next to what one training step costs.

Usage: PYTHONPATH=. python benchmarks/boundary_update.py
Measured side by side in one process, one torch thread; prints milliseconds and ratios.
"""

import statistics
import time

import torch

from nbtrain import Playground, PlaygroundPanel


def median_ms(fn, repeat: int = 50) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    print("step: an epoch's time over its steps, evaluation included; all in ms")
    for hidden in [(), (8, 8), (32, 32, 32)]:
        for resolution in (50, 100):
            pg = Playground("spirals", hidden=hidden, resolution=resolution)
            panel = PlaygroundPanel(pg)
            panel._closed = True  # measure refresh() alone, without the panel's own thread
            exp = pg.experiment
            step = median_ms(lambda e=exp: e.run(epochs=1)) / exp.steps_per_epoch
            forward = median_ms(pg.grid)
            update = median_ms(panel.refresh)
            print(
                f"hidden {hidden!s:>12} grid {resolution}x{resolution}: step {step:.2f}, "
                f"grid forward {forward:.2f}, whole update {update:.2f} "
                f"(update / step = {update / step:.1f})"
            )
            panel.close()


if __name__ == "__main__":
    main()
