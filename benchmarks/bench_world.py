"""Synthetic-world generation speed: images (with caption and labels) per second on one core.

Times ``sith.testbed.world.sample`` (scene draw + numpy rendering + caption) over the natural
distribution, then the same through ``make_batch`` (adds label dicts and the normalised tensor).
Reports both wall-clock and CPU-time rates: on a shared machine the wall-clock rate drops with
the load, while images per CPU-second is what one dedicated core would do.
Target: >= 1,000 images/s on one core. Run: ``nice .venv/bin/python benchmarks/bench_world.py [-n 3000]``
"""

from __future__ import annotations

import argparse
import time

import torch

from sith.testbed.world import NATURAL, make_batch, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=3000, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sample(NATURAL, 0, 0)  # warm-up (imports, numpy caches)

    def sample_only(r: int) -> None:
        for i in range(args.n):
            sample(NATURAL, r, i)

    def batched(r: int) -> None:
        for k in range(0, args.n, 128):
            make_batch([sample(NATURAL, r, i) for i in range(k, min(k + 128, args.n))])

    for label, fn in (("sample()", sample_only), ("make_batch(128)", batched)):
        wall = cpu = 0.0
        for r in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn(r)
            wall = max(wall, args.n / (time.perf_counter() - w0))
            cpu = max(cpu, args.n / (time.process_time() - c0))
        print(f"{label:16s} {cpu:7.0f} images per CPU-second   {wall:7.0f} images/s wall-clock "
              f"(best of {args.repeats} x {args.n})")


if __name__ == "__main__":
    main()
