"""run.host_memory = keep against release, side by side: serial and the K = 2 parallel phase.

    python experiments/bench_hostmem.py                                   # synthetic 3x32x32
    python experiments/bench_hostmem.py --dataset fashion-mnist --steps 32 --repeats 3

Each repeat runs, one after another, serial (1 process, 1 thread) and penalty's parallel phase
at K = 2 (2 processes, 1 thread each, the FLOP cut) once with ``--host-memory release`` (glibc's
defaults: freed activation buffers go back to the kernel and fault in again) and once with
``keep`` (auxpar's default: they are reused). The order of the two policies alternates between
repeats. Prints the time per step of each, the median speedup keep / release, and the parallel
phase's speedup over serial under each policy (whether the gain moves the ratio).
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parallel import per_step_time, train  # noqa: E402  (the same runner and timing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dataset", default="synthetic", help="synthetic (3x32x32) or e.g. fashion-mnist")
    args = ap.parse_args()

    n_train = args.batch_size * args.steps
    common = ["--dataset", args.dataset, "--model", args.model, "--batch-size", str(args.batch_size),
              "--epochs", str(args.epochs), "--eval-every", str(args.epochs), "--no-augment"]
    if args.dataset == "synthetic":
        common += ["--set", f"data.synthetic_num_train={n_train}", "--set", "data.synthetic_num_test=128",
                   "--set", "data.synthetic_shape=[3, 32, 32]"]
    else:
        common += ["--set", f"data.train_subset={n_train}"]
    runs = {"serial": ["--method", "serial"],
            "parallel": ["--method", "penalty", "--stages", "2", "--nproc", "2", "--phases", "parallel",
                         "--balance", "flops"]}
    tmp = Path(tempfile.mkdtemp(prefix="auxpar-hostmem-"))
    atexit.register(shutil.rmtree, tmp, True)  # the runs are read as they end; nothing stays in /tmp
    t: dict[tuple[str, str], list[float]] = {}
    print(f"timing {args.model}, batch {args.batch_size}, {args.dataset}, {args.steps} steps x "
          f"{args.epochs - 1} timed epochs, {args.repeats} repeats", flush=True)
    for r in range(args.repeats):
        order = ("release", "keep") if r % 2 == 0 else ("keep", "release")
        for name, extra in runs.items():
            for policy in order:
                ep = train(tmp / f"{name}-{policy}{r}", *common, *extra, "--host-memory", policy)
                t.setdefault((name, policy), []).append(per_step_time(ep, args.steps))
        print(f"  repeat {r + 1}: " + "; ".join(
            f"{name} {t[(name, 'release')][-1] * 1e3:.0f} -> {t[(name, 'keep')][-1] * 1e3:.0f} ms/step"
            for name in runs), flush=True)

    print(f"\n{args.model}, batch {args.batch_size}, {args.dataset}; torch {torch.__version__}, "
          f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.libc_ver()[0] or 'unknown libc'}; "
          f"{args.repeats} interleaved repeats")
    for name in runs:
        rel, keep = t[(name, "release")], t[(name, "keep")]
        sp = [a / b for a, b in zip(rel, keep)]
        print(f"{name:8s}: release {statistics.median(rel) * 1e3:.0f} ms/step, keep "
              f"{statistics.median(keep) * 1e3:.0f} ms/step: keep is {statistics.median(sp):.2f}x as fast "
              f"(min {min(sp):.2f}, max {max(sp):.2f})")
    for policy in ("release", "keep"):
        ratio = [s / p for s, p in zip(t[("serial", policy)], t[("parallel", policy)])]
        print(f"parallel phase K=2 vs serial under {policy}: median {statistics.median(ratio):.2f}x")


if __name__ == "__main__":
    main()
