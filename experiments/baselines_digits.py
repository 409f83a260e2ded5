"""Serial and DDP baselines on the embedded digits set, several seeds, side by side.

    python experiments/baselines_digits.py                 # 3 seeds, serial (1x1 thread) vs DDP (2x1 threads)
    python experiments/baselines_digits.py --seeds 0 1 2 3 4 --out runs/baselines

Every run goes through the public CLI (``python -m auxpar train``) into its own run directory;
the table is computed from the runs' summary.json files. Test accuracy is reported as
mean +- std over seeds. Time ratios are taken from runs measured in the same invocation on the
same machine, never compared with absolute times from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = "experiments/configs/serial-resnet20-digits.toml"
ROOT = Path(__file__).resolve().parents[1]


def run(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}-s{seed}"
    cmd = [sys.executable, "-m", "auxpar", "train", "--config", CONFIG, "--method", method,
           "--seed", str(seed), "--out", str(run_dir), "--overwrite", "--progress", "off", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{res.stderr}")
    return json.loads((run_dir / "summary.json").read_text())


def mean_std(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} +- {100 * s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/baselines-digits"))
    args = ap.parse_args()

    methods = {
        "serial": ["--threads", "1"],
        "ddp": ["--nproc", "2", "--threads", "1"],
    }
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in args.seeds:  # interleave methods so machine drift hits both alike
        for m, extra in methods.items():
            s = run(m, seed, args.out, extra)
            results[m].append(s)
            print(f"  {m:<6} seed {seed}: final test {100 * s['final_test_acc']:.2f}%  "
                  f"train {s['train_time_s']:.1f}s", flush=True)

    serial_time = statistics.mean(s["train_time_s"] for s in results["serial"])
    print()
    print(f"ResNet-20 on digits, {CONFIG}, {len(args.seeds)} seeds; torch {torch.__version__}, "
          f"{platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"| method | processes x threads | final test acc % (mean +- std) | best test acc % | "
          f"train time / serial | comm MB / run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, runs in results.items():
        t = statistics.mean(s["train_time_s"] for s in runs)
        print(f"| {m} | {runs[0]['world_size']} x {runs[0]['threads']} | "
              f"{mean_std([s['final_test_acc'] for s in runs])} | {mean_std([s['best_test_acc'] for s in runs])} | "
              f"{t / serial_time:.2f} | {statistics.mean(s['comm_bytes'] for s in runs) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
