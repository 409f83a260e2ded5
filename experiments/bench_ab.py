"""Before/after timing of one training command: this tree against a git revision, interleaved.

    python experiments/bench_ab.py --base c68910c            # penalty K=2 parallel phase (default)
    python experiments/bench_ab.py --base HEAD~3 --repeats 5 -- --method al --stages 2 --nproc 2 --phases parallel

The base revision is checked out into a temporary git worktree; the same ``auxpar train``
command (synthetic 3x32x32 data, ResNet-20, batch 128, 1 thread per process) runs alternately
from the base tree and from this tree, so drift of a shared machine hits both alike. Time per
step is read from ``metrics.jsonl`` (epoch time over steps, first epoch = warm-up, an epoch ends
when the slowest rank has finished). Prints the per-repeat times and the median ratio
after / before (below 1 = faster now), plus whether the two trees logged the same losses.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["--method", "penalty", "--stages", "2", "--nproc", "2", "--phases", "parallel"]


def run(tree: Path, out: Path, args: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "auxpar", "train", "--out", str(out), "--overwrite", "--progress", "off",
           "--threads", "1", "--lr-schedule", "constant", "--lr", "0.01", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tree))
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed in {tree}: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    with open(out / "metrics.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "epoch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    ap.add_argument("train_args", nargs="*", help="auxpar train flags after --")
    a = ap.parse_args()
    extra = a.train_args or DEFAULT
    data = ["--dataset", "synthetic", "--model", "resnet20", "--batch-size", "128", "--epochs", str(a.epochs),
            "--eval-every", str(a.epochs), "--no-augment", "--set", f"data.synthetic_num_train={128 * a.steps}",
            "--set", "data.synthetic_num_test=128", "--set", "data.synthetic_shape=[3, 32, 32]"]
    tmp = Path(tempfile.mkdtemp(prefix="auxpar-ab-"))
    atexit.register(shutil.rmtree, tmp, True)  # the runs are read as they end; nothing stays in /tmp
    base = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), a.base], check=True,
                   capture_output=True)
    try:
        before, after, same = [], [], True
        print(f"{' '.join(extra)}: {a.steps} steps x {a.epochs - 1} timed epochs, {a.repeats} interleaved repeats",
              flush=True)
        for r in range(a.repeats):
            eb = run(base, tmp / f"b{r}", [*data, *extra])
            ea = run(ROOT, tmp / f"a{r}", [*data, *extra])
            tb = sum(e["epoch_time_s"] for e in eb[1:]) / ((len(eb) - 1) * a.steps)
            ta = sum(e["epoch_time_s"] for e in ea[1:]) / ((len(ea) - 1) * a.steps)
            before.append(tb)
            after.append(ta)
            same &= [e["train_loss"] for e in eb] == [e["train_loss"] for e in ea]
            print(f"  repeat {r + 1}: before {tb * 1e3:.0f} ms/step, after {ta * 1e3:.0f} ms/step "
                  f"(ratio {ta / tb:.3f})", flush=True)
        ratios = [x / y for x, y in zip(after, before)]
        print(f"\nafter/before time per step: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); identical losses: {same}")
        print(f"base {a.base}; torch {torch.__version__}, {platform.machine()} CPU, {os.cpu_count()} cores")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)


if __name__ == "__main__":
    main()
