"""Parallel-phase speed, communication per step and aux-store memory, measured side by side.

    python experiments/bench_parallel.py               # 3 interleaved repeats, ~3 minutes on 2 cores
    python experiments/bench_parallel.py --repeats 5 --model resnet20 --batch-size 128

    python experiments/bench_parallel.py --dataset fashion-mnist --steps 8   # real 1x28x28 images
    python experiments/bench_parallel.py --dataset fashion-mnist --steps 32 --channels-last
    python experiments/bench_parallel.py --dataset fashion-mnist --steps 32 --split-blocks 3 --cut-split 4,6

1. Time per training step of the parallel phase with K = 2 processes of 1 thread each
   (``--method penalty --phases parallel``) against serial backprop in 1 process of 1 thread,
   on the same model, batch and synthetic 3x32x32 data, with the FLOP-balanced split
   (``--balance flops``) and with the time-balanced split (``--balance time``: the cut by measured
   forward+backward per block, refined by timing whole stages of it and its neighbouring cuts),
   and with ``--split-blocks J`` a third cut: blocks J cut in two units (``model.split_blocks``),
   so the boundary can fall inside a block, at ``--cut-split`` or the time-balanced cut of units.
   The first epoch of every run is warm-up and is not timed; runs of the two methods alternate
   so that drift of a shared machine hits both alike. Prints the median ratio, and beside it the
   machine's ceiling for 2 processes: two independent serial 1-thread runs started together,
   each one's speed relative to a run alone, summed (2.0 on an ideal machine; shared caches,
   memory bandwidth and clock boost make it less). A K = 2 speedup can only approach it.
2. Bytes exchanged per parallel step (all ranks) for DS factors s = 1, 2, 4, read from the
   runs' metrics.jsonl (the difference of the cumulative counters of two epochs).
3. Aux-store memory of the WRN-28-10 / CIFAR-100 configs at K = 4, from ``auxpar plan``.

Synthetic data: speed only, never accuracy.
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


def _cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "auxpar", "train", "--out", str(out), "--overwrite", "--progress", "off",
            "--threads", "1", "--lr-schedule", "constant", "--lr", "0.01", *args]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _epochs(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "epoch"]


def train(out: Path, *args: str) -> list[dict]:
    cmd = _cmd(out, *args)
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return _epochs(out)


def train_together(outs: list[Path], *args: str) -> list[list[dict]]:
    """The same run started len(outs) times at once, as independent processes."""
    procs = [subprocess.Popen(_cmd(o, *args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for o in outs]
    for p, o in zip(procs, outs):
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(_cmd(o, *args))}\n{err[-3000:]}")
    return [_epochs(o) for o in outs]


def per_step_time(epochs: list[dict], steps_per_epoch: int) -> float:
    timed = epochs[1:]  # epoch 1 is warm-up
    return sum(e["epoch_time_s"] for e in timed) / (len(timed) * steps_per_epoch)


def rank_compute(epochs: list[dict], steps_per_epoch: int) -> list[float]:
    """Seconds of each rank's own compute per step over the timed epochs (the counters are
    cumulative, so the warm-up epoch's values are subtracted)."""
    first, last = epochs[0]["time_compute_s"], epochs[-1]["time_compute_s"]
    n = (len(epochs) - 1) * steps_per_epoch
    return [(b - a) / n for a, b in zip(first, last)]


def split_of(out: Path) -> str:
    try:
        return ",".join(map(str, json.loads((out / "summary.json").read_text())["split"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dataset", default="synthetic",
                    help="synthetic (3x32x32, the default) or a registered dataset, e.g. fashion-mnist "
                         "(a stratified subset of batch x steps training images)")
    ap.add_argument("--split-blocks", default="",
                    help="also time a third cut: these blocks cut in two units (model.split_blocks), the cut "
                         "given by --cut-split or else measured (--balance time), e.g. --split-blocks 3 --cut-split 4,6")
    ap.add_argument("--cut-split", default="", help="the units per stage for the --split-blocks run")
    ap.add_argument("--channels-last", action="store_true",
                    help="every run (serial, parallel, the ceiling pair) with --channels-last")
    args = ap.parse_args()

    n_train = args.batch_size * args.steps

    def data(epochs: int) -> list[str]:
        common = ["--dataset", args.dataset, "--model", args.model, "--batch-size", str(args.batch_size),
                  "--epochs", str(epochs), "--eval-every", str(epochs), "--no-augment",
                  *(["--channels-last"] if args.channels_last else [])]
        if args.dataset == "synthetic":
            return common + ["--set", f"data.synthetic_num_train={n_train}", "--set", "data.synthetic_num_test=128",
                             "--set", "data.synthetic_shape=[3, 32, 32]"]
        return common + ["--set", f"data.train_subset={n_train}"]

    tmp = Path(tempfile.mkdtemp(prefix="auxpar-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # the runs are read as they end; nothing stays in /tmp
    ratios, t_ser, t_par, ratios_t, t_part, ceilings, t_pair = [], [], [], [], [], [], []
    computes: dict[str, list[list[float]]] = {"FLOP-balanced": [], "time-balanced": []}
    cut_label = f"blocks {args.split_blocks} cut in two, " + (f"split {args.cut_split}" if args.cut_split else "time-balanced")
    ratios_c, t_cut = [], []
    if args.split_blocks:
        computes[cut_label] = []
    cut_args = ["--split-blocks", args.split_blocks, *(["--split", args.cut_split] if args.cut_split
                                                        else ["--balance", "time"])]
    splits: dict[str, str] = {}
    par = ["--method", "penalty", "--stages", "2", "--nproc", "2", "--phases", "parallel"]
    print(f"timing {args.model}, batch {args.batch_size}, {args.steps} steps x {args.epochs - 1} timed epochs, "
          f"{args.repeats} repeats", flush=True)
    for r in range(args.repeats):
        s = per_step_time(train(tmp / f"serial{r}", *data(args.epochs), "--method", "serial"), args.steps)
        ep_p = train(tmp / f"par{r}", *data(args.epochs), *par, "--balance", "flops")  # (a recipe may say time)
        ep_t = train(tmp / f"part{r}", *data(args.epochs), *par, "--balance", "time")
        p, pt = per_step_time(ep_p, args.steps), per_step_time(ep_t, args.steps)
        if args.split_blocks:
            ep_c = train(tmp / f"parc{r}", *data(args.epochs), *par, *cut_args)
            t_cut.append(per_step_time(ep_c, args.steps))
            ratios_c.append(s / t_cut[-1])
            computes[cut_label].append(rank_compute(ep_c, args.steps))
            splits[cut_label] = split_of(tmp / f"parc{r}")
        computes["FLOP-balanced"].append(rank_compute(ep_p, args.steps))
        computes["time-balanced"].append(rank_compute(ep_t, args.steps))
        splits["FLOP-balanced"], splits["time-balanced"] = split_of(tmp / f"par{r}"), split_of(tmp / f"part{r}")
        pair = [per_step_time(e, args.steps) for e in
                train_together([tmp / f"pairA{r}", tmp / f"pairB{r}"], *data(args.epochs), "--method", "serial")]
        ceilings.append(sum(s / t for t in pair))
        t_pair.append(statistics.mean(pair))
        t_ser.append(s)
        t_par.append(p)
        t_part.append(pt)
        ratios.append(s / p)
        ratios_t.append(s / pt)
        print(f"  repeat {r + 1}: serial {s * 1e3:.0f} ms/step; parallel K=2 FLOP-balanced {p * 1e3:.0f} ms/step "
              f"({s / p:.2f}x), time-balanced {pt * 1e3:.0f} ms/step ({s / pt:.2f}x)"
              + (f", {cut_label} {t_cut[-1] * 1e3:.0f} ms/step ({ratios_c[-1]:.2f}x)" if args.split_blocks else "")
              + "; two serial runs at once: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in pair)} ms/step (ceiling {ceilings[-1]:.2f}x)", flush=True)

    print("\nbytes exchanged per parallel step (all ranks, t down + o up):")
    comm = {}
    for s in (1, 2, 4):
        ep = train(tmp / f"ds{s}", *data(2), "--method", "penalty", "--stages", "2", "--nproc", "2",
                   "--phases", "parallel", "--ds-factor", str(s))
        comm[s] = (ep[1]["comm_bytes"] - ep[0]["comm_bytes"]) / args.steps
        print(f"  s={s}: {comm[s]:,.0f} bytes/step ({comm[1] / comm[s]:.1f}x less than s=1)")

    sys.path.insert(0, str(ROOT))
    from auxpar.config import build_config
    from auxpar.plan import make_plan

    plan = make_plan("wrn-28-10", build_config({"data": {"dataset": "cifar100"}}).data, 4)
    print("\naux-store memory, WRN-28-10 / CIFAR-100, K = 4, 50,000 samples (auxpar plan):")
    for m in plan["aux_memory"]:
        print(f"  s={m['ds_factor']} {m['dtype']}: penalty {m['aux_bytes'] / 2**30:6.1f} GiB, "
              f"al {m['aux_and_multiplier_bytes'] / 2**30:6.1f} GiB")

    where = "synthetic 3x32x32" if args.dataset == "synthetic" else f"{args.dataset} ({n_train}-image subset)"
    if args.channels_last:
        where += ", channels_last"
    print(f"\n{args.model}, batch {args.batch_size}, {where}; torch {torch.__version__}, "
          f"{platform.machine()} CPU, {os.cpu_count()} cores; {args.repeats} interleaved repeats; "
          f"serial {statistics.median(t_ser) * 1e3:.0f} ms/step")
    variants = [("FLOP-balanced", ratios, t_par), ("time-balanced", ratios_t, t_part)]
    if args.split_blocks:
        variants.append((cut_label, ratios_c, t_cut))
    for label, rs, ts in variants:
        print(f"parallel phase K=2 (2 x 1 thread, {label}) vs serial (1 x 1 thread): median speedup "
              f"{statistics.median(rs):.2f}x (min {min(rs):.2f}, max {max(rs):.2f}), "
              f"{statistics.median(ts) * 1e3:.0f} ms/step")
        # The stages' own compute per step (median over repeats, per rank): the step cannot be
        # shorter than the slower stage, and a perfectly balanced cut would give each rank the
        # mean. Blocks are the unit of a cut, so the best cut may still be uneven.
        rc = [statistics.median(c[i] for c in computes[label]) for i in range(2)]
        print(f"    split {splits[label]}: compute per step {rc[0] * 1e3:.0f} / {rc[1] * 1e3:.0f} ms (rank 0 / 1); "
              f"slower / mean = {max(rc) / statistics.mean(rc):.2f}; with a perfect balance the step would "
              f"be {statistics.mean(rc) * 1e3:.0f} ms + exchange")
        # Paired with the ceiling of the same repeat, so that the machine's drift cancels: the
        # share of the ceiling reached, and the two ranks' compute summed against one serial step
        # of the contended pair (1.00: splitting the step added no work beyond the contention
        # that any two processes on this machine pay).
        eff = [r / c for r, c in zip(rs, ceilings)]
        work = [sum(c) / tp for c, tp in zip(computes[label], t_pair)]
        print(f"    speedup / ceiling of the same repeat: median {statistics.median(eff):.2f} "
              f"(min {min(eff):.2f}, max {max(eff):.2f}); both ranks' compute / a serial step of the "
              f"contended pair: median {statistics.median(work):.2f}")
    print(f"ceiling of this machine for 2 processes (two independent serial runs at once, summed speed "
          f"relative to one alone): median {statistics.median(ceilings):.2f}x (min {min(ceilings):.2f}, "
          f"max {max(ceilings):.2f})")


if __name__ == "__main__":
    main()
