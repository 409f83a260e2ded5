"""Aux-state re-initialization time with and without the idle last stage's threads, side by side.

    python experiments/bench_reinit.py                  # 2 interleaved repeats, ~2 minutes on 2 cores
    python experiments/bench_reinit.py --subset 60000 --repeats 3

Runs penalty at K = 2 (2 processes) on a stratified Fashion-MNIST subset, phases serial:1,
parallel:1 (one re-initialization, after the serial epoch), with ``coupling.reinit_threads = 1``
(stage 0 on its own thread) and ``= 0`` (auto: stage 0 also takes the idle last stage's thread),
alternating, and prints the ``reinit`` seconds of each run's ``phase_times_s``. The cut is pinned
(``--split``) so that both settings re-initialize the same boundary. Needs the Fashion-MNIST IDX
files (``apt-get install dataset-fashion-mnist`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_parallel as bp  # noqa: E402  (its train(): one CLI run, metrics back)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=16384, help="training images (data.train_subset)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--split", default="4,5")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="auxpar-reinit-"))
    atexit.register(shutil.rmtree, tmp, True)  # the runs are read as they end; nothing stays in /tmp
    res: dict[int, list[float]] = {1: [], 0: []}
    threads: dict[int, list[int]] = {}
    for r in range(args.repeats):
        for setting in (1, 0):
            out = tmp / f"r{setting}-{r}"
            bp.train(out, "--dataset", "fashion-mnist", "--model", "resnet20", "--batch-size", "128", "--epochs", "2",
                     "--eval-every", "2", "--set", f"data.train_subset={args.subset}", "--method", "penalty",
                     "--stages", "2", "--nproc", "2", "--phases", "serial:1,parallel:1", "--split", args.split,
                     "--set", f"coupling.reinit_threads={setting}",
                     *(["--data-dir", args.data_dir] if args.data_dir else []))
            s = json.loads((out / "summary.json").read_text())
            res[setting].append(s["phase_times_s"]["reinit"])
            threads[setting] = s["reinit_threads"]
            print(f"  repeat {r + 1}, reinit_threads = {setting} (per rank {s['reinit_threads']}): "
                  f"re-initialization {s['phase_times_s']['reinit']:.2f} s", flush=True)
    one, auto = statistics.median(res[1]), statistics.median(res[0])
    print(f"\nresnet20, batch 128, fashion-mnist {args.subset}-image subset, K = 2, split {args.split}; torch "
          f"{__import__('torch').__version__}, {platform.machine()} CPU, {os.cpu_count()} cores; "
          f"{args.repeats} interleaved repeats")
    print(f"re-initialization, median: stage 0 on 1 thread {one:.2f} s, auto (threads per rank {threads[0]}) "
          f"{auto:.2f} s: {one / auto:.2f}x faster")


if __name__ == "__main__":
    main()
