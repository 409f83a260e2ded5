"""Test accuracy of every method on the embedded digits set, several seeds, side by side.

    python experiments/accuracy_digits.py                          # serial, ddp:2, penalty/al at K = 2, 4; 3 seeds
    python experiments/accuracy_digits.py --methods serial penalty:4 --seeds 0 1 2 3 4
    python experiments/accuracy_digits.py --methods serial penalty:2 --extra --phases parallel

A method is ``NAME`` or ``NAME:K`` (K processes: DDP ranks, or layer-parallel stages). Every
run goes through the public CLI (``python -m auxpar train``) with the ResNet-20 digits config
and only ``--method``/``--stages``/``--nproc``/``--seed`` changed (plus ``--extra`` flags), so the
layer-parallel rows measure the package defaults. Accuracy is mean +- std over seeds; "gap" is
serial minus method, per seed, then averaged. Time ratios come from runs in this invocation.
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

from auxpar import registry

CONFIG = "experiments/configs/serial-resnet20-digits.toml"
ROOT = Path(__file__).resolve().parents[1]


def run(spec: str, seed: int, out: Path, extra: list[str]) -> dict:
    name, _, k = spec.partition(":")
    k = int(k or 1)
    run_dir = out / f"{name}-k{k}-s{seed}"
    cmd = [sys.executable, "-m", "auxpar", "train", "--config", CONFIG, "--method", name, "--seed", str(seed),
           "--out", str(run_dir), "--overwrite", "--progress", "off", "--threads", "1"]
    if registry.method(name).layout == "stages":  # one process per stage
        cmd += ["--stages", str(k)]
    if k > 1:
        cmd += ["--nproc", str(k)]
    if name != "serial":
        cmd += extra
    env = {key: v for key, v in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def pm(xs: list[float], scale: float = 100.0) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * m:.2f} +- {scale * s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["serial", "ddp:2", "penalty:2", "al:2", "penalty:4", "al:4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every non-serial run")
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy-digits"))
    args = ap.parse_args()
    methods = args.methods if "serial" in args.methods else ["serial", *args.methods]
    for m in methods:
        registry.method(m.partition(":")[0])  # an unknown name fails now, naming the registered ones

    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in args.seeds:  # interleave methods so machine drift hits all alike
        for m in methods:
            s = run(m, seed, args.out, args.extra)
            results[m].append(s)
            print(f"  {m:<10} seed {seed}: final test {100 * s['final_test_acc']:.2f}%  "
                  f"train {s['train_time_s']:.1f}s", flush=True)

    serial = results["serial"]
    t_serial = statistics.mean(s["train_time_s"] for s in serial)
    print()
    print(f"ResNet-20 on digits ({CONFIG}, 15 epochs), seeds {args.seeds}; torch {torch.__version__}, "
          f"{platform.machine()} CPU, {os.cpu_count()} cores; extra flags: {' '.join(args.extra) or 'none'}")
    print("| method | processes x threads | final test acc % | gap to serial (points) | best test acc % | "
          "train time / serial | comm MB / run | aux store MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, runs in results.items():
        gaps = [a["final_test_acc"] - b["final_test_acc"] for a, b in zip(serial, runs)]
        t = statistics.mean(s["train_time_s"] for s in runs)
        print(f"| {m} | {runs[0]['world_size']} x {runs[0]['threads']} | {pm([s['final_test_acc'] for s in runs])} | "
              f"{pm(gaps)} | {pm([s['best_test_acc'] for s in runs])} | {t / t_serial:.2f} | "
              f"{statistics.mean(s['comm_bytes'] for s in runs) / 1e6:.1f} | "
              f"{statistics.mean(s.get('aux_store_bytes', 0) for s in runs) / 1e6:.2f} |")


if __name__ == "__main__":
    main()
