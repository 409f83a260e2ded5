"""Validate ``auxpar model-perf`` against measured K = 2 CPU runs on this machine.

    python experiments/validate_perfmodel.py                      # digits, ResNet-20, batch 64
    python experiments/validate_perfmodel.py --dataset synthetic  # 3x32x32, 1024 samples

Steps, all on this machine with 1 torch thread per process:

1. Measure the gloo link between two local processes (ping-pong: latency from 4-byte messages,
   bandwidth from 4 MiB ones).
2. Profile the model (``auxpar.perfmodel.profile_model``) and predict with the measured link.
3. Measure in-process: the serial step time (SerialMethod.train_step on fixed batches).
4. Run the CLI: serial, penalty K = 2 (SPH parallel:2,serial:1, layer serial executor) and
   pipeline K = 2 (1F1B, 4 micro-batches); read each epoch's time from metrics.jsonl. The first
   epoch (warm-up) is left out of the per-epoch medians; the whole-run mean includes it.
5. Print predicted vs measured and the relative error (predicted / measured - 1), and write
   them to OUT/validation.json; a second column predicts the K = 2 quantities with the measured
   contention (``--contention auto``: a serial step with a second one running beside it, over
   one alone; ``Scenario.contention``).

Every measurement waits until other processes leave the CPUs idle (``--quiet``) and is repeated
(``--repeats``, the fastest kept): on a shared 2-core machine a K = 2 run measured while another
job ran took 2.5x as long, which is contention, not the model's error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auxpar.errors import ConfigError  # noqa: E402
from auxpar.perfmodel import Scenario, check_contention, predict, profile_model  # noqa: E402


# ---------------------------------------------------------------------------- link

def _pingpong(rank, port, sizes, reps, out):
    import datetime as dt

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from auxpar.distributed import bind_defaults_before_the_group

    bind_defaults_before_the_group()  # no gloo thread outlives the group (the exit abort)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=dt.timedelta(seconds=60))
    res = {}
    for n in sizes:
        buf = torch.zeros(n // 4)
        times = []
        for i in range(reps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 2:
                times.append((time.perf_counter() - t0) / 2)
        res[n] = statistics.median(times)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save(res, out)


def measure_link(reps: int = 30) -> tuple[float, float]:
    """(bandwidth GB/s, latency us) of gloo between two local processes."""
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small, big = 4, 4 * 1024 * 1024
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "link.pt")
        mp.start_processes(_pingpong, args=(port, [small, big], reps, out), nprocs=2, join=True,
                           start_method="spawn")
        res = torch.load(out)
    lat = res[small]
    bw = big / max(res[big] - lat, 1e-9) / 1e9
    return bw, lat * 1e6


# ---------------------------------------------------------------------------- runs

def run_cli(out: Path, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "auxpar", "train", *args, "--out", str(out), "--threads", "1",
           "--progress", "off", "--overwrite"]
    print("$ " + " ".join(["auxpar", *cmd[3:]]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"run failed:\n{r.stdout}\n{r.stderr}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r["kind"] == "epoch"]


def cpu_busy(window_s: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``window_s`` (from /proc/stat), while this script sleeps."""
    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    t1, i1 = sample()
    time.sleep(window_s)
    t2, i2 = sample()
    return 1.0 - (i2 - i1) / max(t2 - t1, 1)


def wait_quiet(limit: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other processes keep the CPUs less than ``limit`` busy;
    returns the last busy fraction seen.

    The timings below are only meaningful on an otherwise idle machine: on a shared 2-core box
    another job's processes slow both ranks of a K = 2 run (seen: 2.5x)."""
    t0 = time.monotonic()
    while True:
        busy = cpu_busy()
        if busy < limit or time.monotonic() - t0 > max_wait_s:
            return busy
        time.sleep(3)


def med(values):
    return statistics.median(values) if values else float("nan")


def _serial_stepper(cfg_over: dict, batches: int):
    """(SerialMethod, fixed batches) for timing train_step without the loader."""
    from auxpar.config import build_config
    from auxpar.coupling import get_method
    from auxpar.data import eval_batches
    from auxpar.distributed import DistInfo
    from auxpar.models import build_model
    from auxpar.trainer import load_data

    cfg = build_config(cfg_over)
    train, _ = load_data(cfg, DistInfo())
    torch.manual_seed(0)
    c, h, _ = train.shape
    net = build_model(cfg.model.name, in_channels=c, input_size=h, num_classes=train.num_classes)
    m = get_method("serial")(cfg, DistInfo(), net)
    return m, list(eval_batches(train, cfg.data.batch_size, "cpu"))[:-1][:batches]


def _time_steps(m, data, rounds: int = 2) -> float:
    """Median seconds of one train_step over ``rounds`` passes of ``data`` (the first is warm-up)."""
    times = []
    for i in range(rounds):
        for b in data:
            t0 = time.perf_counter()
            m.train_step(b, "serial")
            if i:
                times.append(time.perf_counter() - t0)
    return med(times)


def serial_step_in_process(cfg_over: dict, batches: int = 12, threads: int = 1) -> float:
    """Median seconds of SerialMethod.train_step on fixed batches (no loader), this process."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m, data = _serial_stepper(cfg_over, batches)
        return _time_steps(m, data)
    finally:
        torch.set_num_threads(old)


def _contention_worker(cfg_over: dict, barrier, results) -> None:
    torch.set_num_threads(1)
    m, data = _serial_stepper(cfg_over, 12)
    _time_steps(m, data, rounds=1)  # warm-up before the common start
    barrier.wait()
    results.put(_time_steps(m, data, rounds=3))


def measure_contention(cfg_over: dict, repeats: int) -> tuple[float, list[float]]:
    """How much slower a 1-thread serial step runs while a second identical process runs at the
    same time: (median over repeats of pair / alone, the per-repeat ratios). This is what every
    rank of a K = 2 run on this machine pays; the model takes it as ``Scenario.contention``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def once(n: int) -> float:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contention_worker, args=(cfg_over, barrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        vals = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        return statistics.mean(vals)

    ratios = [once(2) / once(1) for _ in range(repeats)]
    return statistics.median(ratios), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3,
                    help="run every measurement this many times and keep the fastest (contention only adds time)")
    ap.add_argument("--quiet", type=float, default=0.15,
                    help="before each measurement wait until other processes keep the CPUs less busy than this")
    ap.add_argument("--max-wait", type=float, default=1500, help="longest wait for a quiet machine, seconds")
    ap.add_argument("--contention", default="auto",
                    help="the model's compute slowdown of the 2 ranks sharing this machine: auto (measure it: a "
                         "serial step with a second one running beside it / alone) or a number; the table shows "
                         "the error without it (1.0) and with it")
    args = ap.parse_args(argv)
    fixed = None  # --contention auto: measured below
    if args.contention != "auto":
        try:
            fixed = check_contention(float(args.contention))
        except (ValueError, ConfigError):
            ap.error(f"--contention {args.contention!r}: give auto or a number >= 1 (the compute slowdown of "
                     "ranks that share this machine)")
    out = Path(args.out or ROOT / "runs" / f"validate-perfmodel-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)

    data = ["--dataset", args.dataset, "--model", args.model, "--batch-size", str(args.batch_size)]
    over = {"model": {"name": args.model}, "data": {"dataset": args.dataset, "batch_size": args.batch_size}}
    if args.dataset == "synthetic":
        data += ["--set", "data.synthetic_num_train=1024", "--set", "data.synthetic_num_test=256"]
        over["data"].update(synthetic_num_train=1024, synthetic_num_test=256)
    from auxpar.config import build_config

    cfg = build_config(over)

    loads = []

    def quiet():
        loads.append(wait_quiet(args.quiet, args.max_wait))

    quiet()
    bw, lat = min((measure_link() for _ in range(args.repeats)), key=lambda v: v[1])
    print(f"gloo link between 2 local processes: {bw:.2f} GB/s, {lat:.1f} us", flush=True)
    B, M = args.batch_size, args.microbatches
    quiet()
    prof = profile_model(args.model, args.dataset, [B, B // M], data_cfg=cfg.data, device="cpu", repeats=7,
                         threads=1, optim_cfg=cfg.optim)
    if fixed is None:
        quiet()
        contention, c_ratios = measure_contention(over, args.repeats)
        c_ratios = [round(r, 4) for r in c_ratios]
        print(f"contention: a serial step with a second one beside it takes {contention:.3f}x as long "
              f"({', '.join(f'{r:.3f}' for r in c_ratios)})", flush=True)
    else:
        contention, c_ratios = fixed, []
    sph = "parallel:2,serial:1"
    sc = Scenario(batch_size=B, bandwidth_gbs=bw, latency_us=lat, microbatches=M, pipeline_schedule="1f1b", phases=sph,
                  epochs=args.epochs)
    contention = max(1.0, contention)  # (a pair measured faster than one alone is noise: no slowdown)
    sc_c = Scenario(**{**sc.__dict__, "contention": contention})
    p_serial = predict(prof, "serial", 1, sc)
    p_pen, p_pen_c = predict(prof, "penalty", 2, sc), predict(prof, "penalty", 2, sc_c)
    p_pipe, p_pipe_c = predict(prof, "pipeline", 2, sc), predict(prof, "pipeline", 2, sc_c)

    rows = []

    def add(what, predicted, measured, command, predicted_c=None):
        """predicted_c: the prediction with the measured contention (multi-rank quantities only)."""
        ok = measured and measured == measured
        err = predicted / measured - 1 if ok else float("nan")
        pc = predicted if predicted_c is None else predicted_c
        rows.append({"what": what, "predicted_s": predicted, "measured_s": measured, "error": err,
                     "predicted_contention_s": pc, "error_contention": pc / measured - 1 if ok else float("nan"),
                     "command": command})

    def fastest(fn):
        vals = []
        for _ in range(args.repeats):
            quiet()
            vals.append(fn())
        return vals

    step = min(fastest(lambda: serial_step_in_process(over)))
    add("serial step (in process, no loader)", p_serial["step_s"], step, "in-process SerialMethod.train_step")

    def epochs_of(recs, phase=None):
        return med([r["epoch_time_s"] for r in recs[1:] if phase is None or r["phase"] == phase])

    def mean_epoch(recs):
        return sum(r["epoch_time_s"] + (r["reinit_time_s"] or 0) for r in recs) / len(recs)

    common = [*data, "--epochs", str(args.epochs), "--eval-every", str(args.epochs)]
    sers = fastest(lambda: run_cli(out / "serial", "--method", "serial", *common))
    cmd = "auxpar train --method serial " + " ".join(common) + " --threads 1"
    add("serial epoch", p_serial["epoch_s"], min(epochs_of(r) for r in sers), cmd)
    add("serial run, mean epoch", p_serial["epoch_s"], min(mean_epoch(r) for r in sers), cmd)

    pens = fastest(lambda: run_cli(out / "penalty", "--method", "penalty", "--stages", "2", "--phases", sph,
                                   *common))
    cmd = f"auxpar train --method penalty --stages 2 --phases {sph} " + " ".join(common) + " --threads 1"
    add("penalty K=2 parallel epoch", p_pen["parallel_epoch_s"], min(epochs_of(r, "parallel") for r in pens), cmd,
        p_pen_c["parallel_epoch_s"])
    add("penalty K=2 serial epoch (layer executor)", p_pen["serial_epoch_s"],
        min(epochs_of(r, "serial") for r in pens), cmd, p_pen_c["serial_epoch_s"])
    add("penalty K=2 re-initialization", p_pen["reinit_s"],
        min(med([e["reinit_time_s"] for e in r if e["reinit_time_s"]]) for r in pens), cmd, p_pen_c["reinit_s"])
    add("penalty K=2 run, mean epoch (incl. re-init)", p_pen["epoch_s"], min(mean_epoch(r) for r in pens), cmd,
        p_pen_c["epoch_s"])

    pipes = fastest(lambda: run_cli(out / "pipeline", "--method", "pipeline", "--stages", "2", "--microbatches",
                                    str(M), "--pipeline-schedule", "1f1b", *common))
    cmd = f"auxpar train --method pipeline --stages 2 --microbatches {M} " + " ".join(common) + " --threads 1"
    add(f"pipeline K=2 1F1B M={M} epoch", p_pipe["epoch_s"], min(epochs_of(r) for r in pipes), cmd,
        p_pipe_c["epoch_s"])
    add("speedup penalty K=2 vs serial (mean epoch)", p_serial["epoch_s"] / p_pen["epoch_s"],
        min(mean_epoch(r) for r in sers) / min(mean_epoch(r) for r in pens), "ratio of the two runs above",
        p_serial["epoch_s"] / p_pen_c["epoch_s"])

    print()
    print(f"{args.model} on {args.dataset}, batch {B}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, 1 thread per process, {datetime.date.today()}; fastest of {args.repeats}; "
          f"CPU busy (other processes) before measurements {100 * min(loads):.0f}..{100 * max(loads):.0f}%")
    print(f"{'quantity':<48} {'predicted':>10} {'measured':>10} {'error':>8}   with contention {contention:.3f}")
    for r in rows:
        print(f"{r['what']:<48} {r['predicted_s']:>10.4f} {r['measured_s']:>10.4f} {100 * r['error']:>7.1f}%   "
              f"{r['predicted_contention_s']:>10.4f} {100 * r['error_contention']:>7.1f}%")
    (out / "validation.json").write_text(json.dumps(
        {"link": {"bandwidth_gbs": bw, "latency_us": lat}, "contention": contention, "contention_repeats": c_ratios,
         "rows": rows, "torch": torch.__version__,
         "cores": os.cpu_count(), "date": str(datetime.date.today()), "repeats": args.repeats,
         "cpu_busy_before_each_measurement": loads, "profile": prof.to_json()}, indent=2))
    print(f"wrote {out / 'validation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
