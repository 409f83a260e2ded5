"""Cost of the per-step NaN guard (one all-reduce of W flags and one host read per step).

    python experiments/bench_guard.py            # ~2 minutes on 2 cores

Runs the parallel phase of penalty K = 2 (2 processes x 1 thread, ResNet-20, batch 128,
synthetic 3x32x32) and serial backprop (1 thread) with ``--on-nan stop`` (the default: the
guard runs before every optimizer step) and ``--on-nan off`` (epoch-end check only),
alternating, and prints the median time-per-step ratio stop/off of each method.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from bench_parallel import per_step_time, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per epoch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bs = 128
    data = ["--dataset", "synthetic", "--model", "resnet20", "--batch-size", str(bs), "--epochs", "3",
            "--eval-every", "3", "--no-augment", "--set", f"data.synthetic_num_train={bs * args.steps}",
            "--set", "data.synthetic_num_test=128", "--set", "data.synthetic_shape=[3, 32, 32]"]
    methods = {"penalty K=2": ["--method", "penalty", "--stages", "2", "--phases", "parallel"],
               "serial": ["--method", "serial"]}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, margs in methods.items():
                t = {}
                for mode in ("stop", "off"):
                    eps = train(Path(tmp) / f"{name}-{mode}", *data, *margs, "--on-nan", mode)
                    t[mode] = per_step_time(eps, args.steps)
                ratios[name].append(t["stop"] / t["off"])
                print(f"repeat {rep + 1}: {name}: guard on {t['stop'] * 1e3:.1f} ms/step, "
                      f"off {t['off'] * 1e3:.1f} ms/step, ratio {t['stop'] / t['off']:.3f}", flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} cores visible, torch {torch.__version__}, "
          f"{args.repeats} repeats")
    for name, r in ratios.items():
        print(f"{name}: time per step with the guard / without: median {statistics.median(r):.3f} "
              f"(min {min(r):.3f}, max {max(r):.3f})")


if __name__ == "__main__":
    main()
