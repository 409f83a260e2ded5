"""Time per training step: one-shot MGRIT and exact MGRIT on 2 ranks x 1 thread vs serial backprop on 1 thread.

    python3 experiments/bench_mgrit.py --steps 20                       # ResNet-20, 3x32x32, batch 32
    python3 experiments/bench_mgrit.py --steps 20 --model resnet56 --batch 32
    python3 experiments/bench_mgrit.py --factors                        # + convergence factors vs h

All three run in this one invocation, one after the other, on the same machine, same model
(built from one seed), same batches (synthetic, seeded), BN in train mode:

* ``one-shot``: ``--method mgrit`` defaults (2 levels, m = 2, 2 forward / 1 adjoint FCF
  iterations, warm start), K ranks (gloo processes, 1 thread each);
* ``exact``: 2 levels, F-relaxation, fwd = bwd iterations = N_c (the exactness bound): the
  serial step, computed by MGRIT;
* ``serial``: ordinary forward + backward + SGD step in this process, 1 thread.

Time per step = wall time of ``--steps`` steps (after ``--warmup`` untimed ones) on the last
rank, divided by the steps; the ranks start together (barrier). Printed: ms/step, the ratio to
serial, the residuals of the last step (forward and adjoint, per iteration, the last one after
the final sweep), block evaluations per step, and per-rank compute / communication / wait time.

``--factors`` adds, in one process (MGRIT iterates do not depend on K), the observed per-iteration
residual ratios r_(i+1)/r_i of the forward and adjoint solves (``--iters`` iterations, cold
start) for several h (``mgrit.step``), on the same model: the numbers the cost model needs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auxpar.config import build_config  # noqa: E402
from auxpar.coupling import get_method  # noqa: E402
from auxpar.data.loader import Batch  # noqa: E402
from auxpar.distributed import DistInfo  # noqa: E402
from auxpar.models import build_model  # noqa: E402


def _net(a):
    torch.manual_seed(0)
    c, s, _ = a.input
    return build_model(a.model, in_channels=c, input_size=s, num_classes=10, norm=a.norm)


def _batches(a, n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(a.batch, *a.input, generator=g), torch.randint(0, 10, (a.batch,), generator=g))
            for _ in range(n)]


def _cfg(a, mg, K):
    return build_config({"run": {"method": "mgrit"}, "model": {"name": a.model, "norm": a.norm},
                         "data": {"batch_size": a.batch}, "optim": {"lr": 0.01, "weight_decay": 5e-4},
                         "dist": {"stages": K}, "mgrit": mg})


def _worker(rank, world, port, a, mg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from auxpar.distributed import bind_defaults_before_the_group

    bind_defaults_before_the_group()  # no gloo thread outlives the group (the exit abort)
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    m = get_method("mgrit")(_cfg(a, mg, world), info, _net(a))
    data = _batches(a, a.warmup + a.steps)
    for i, (x, y) in enumerate(data[:a.warmup]):
        m.step_index = i + 1
        m.train_step(Batch(torch.arange(a.batch), x, y), "parallel")
    tdist.barrier()
    t0c, t0m, t0w, e0 = m.time_compute, m.nb.time_comm + m.time_dp, m.nb.time_wait, m.block_evals
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data[a.warmup:]):
        m.step_index = a.warmup + i + 1
        m.train_step(Batch(torch.arange(a.batch), x, y), "parallel")
    dt = time.perf_counter() - t0
    res = {"rank": rank, "s_per_step": dt / a.steps, "metrics": m.step_metrics(),
           "compute": (m.time_compute - t0c) / a.steps, "comm": (m.nb.time_comm + m.time_dp - t0m) / a.steps,
           "wait": (m.nb.time_wait - t0w) / a.steps, "evals": (m.block_evals - e0) / a.steps,
           "split": m.counts, "nc": m.grid.coarse_intervals, "bytes": m.comm_bytes()}
    tdist.barrier()
    tdist.destroy_process_group()
    with open(os.path.join(out, f"r{rank}.json"), "w") as fh:
        json.dump(res, fh)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mgrit(a, mg):
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(a.ranks, _free_port(), a, mg, out), nprocs=a.ranks, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(out, f"r{r}.json"))) for r in range(a.ranks)]


def run_serial(a):
    torch.set_num_threads(1)
    net = _net(a)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net.train()
    data = _batches(a, a.warmup + a.steps)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for x, y in data[:a.warmup]:
        step(x, y)
    t0 = time.perf_counter()
    for x, y in data[a.warmup:]:
        step(x, y)
    return (time.perf_counter() - t0) / a.steps


def _ratios(res: list[float]) -> list[float]:
    """r_{i+1} / r_i while r_i is not yet at rounding level (exactness ends the sequence)."""
    out = []
    for a, b in zip(res, res[1:]):
        if a <= 1e-7 * res[0]:
            break
        out.append(b / a)
    return out


def factors(a):
    """Observed convergence factors in one process (iterates are K-independent)."""
    x, y = _batches(a, 1)[0]
    print(f"\nconvergence, {a.iters} iterations, cold start, 2 levels m = 2, one process (iterates do not depend "
          "on K);\nratios r_(i+1)/r_i until the exactness property of the finite grid zeroes the residual:")
    for h in (1.0, 0.5, 0.2, 0.1):
        for relax in ("F", "FCF"):
            mg = {"levels": 2, "cfactor": [2], "fwd_iters": a.iters, "bwd_iters": a.iters, "relax": relax, "step": h,
                  "warm_start": False}
            m = get_method("mgrit")(_cfg(a, mg, 1), DistInfo(), _net(a))
            m.set_lr(0.0)
            m.train_step(Batch(torch.arange(a.batch), x, y), "parallel")
            r = m.step_metrics()["mgrit_residuals"]
            txt = "  ".join(f"{k} " + " ".join(f"{q:.3g}" for q in _ratios(r[k])) for k in ("fwd", "bwd"))
            print(f"h {h:4.2f} {relax:>3}: {txt}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input", default="3,32,32", help="C,H,W of the synthetic inputs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--norm", default="bn", choices=["bn", "none"])
    p.add_argument("--ranks", type=int, default=2, help="layer-parallel ranks (1 thread each)")
    p.add_argument("--factors", action="store_true", help="also print convergence factors vs h")
    p.add_argument("--iters", type=int, default=4, help="iterations of the --factors solves")
    a = p.parse_args()
    a.input = tuple(int(v) for v in a.input.split(","))
    print(f"auxpar MGRIT benchmark: {a.model} ({a.norm}), input {a.input}, batch {a.batch}, {a.ranks} ranks x 1 "
          f"thread vs serial 1 thread, {a.steps} timed steps after {a.warmup}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    one_shot = run_mgrit(a, {})
    nc = one_shot[0]["nc"]
    exact = run_mgrit(a, {"levels": 2, "cfactor": [2], "fwd_iters": nc, "bwd_iters": nc, "relax": "F"})
    t_serial = run_serial(a)
    print(f"split {one_shot[0]['split']}, exactness bound N_c = {nc}")
    print(f"{'variant':>10} {'ms/step':>9} {'x serial':>9} {'block evals':>12}  per-rank compute/comm/wait ms")
    print(f"{'serial':>10} {1000 * t_serial:9.1f} {1.0:9.2f} {'':>12}")
    for name, res in (("one-shot", one_shot), ("exact", exact)):
        t = res[-1]["s_per_step"]
        ev = sum(r["evals"] for r in res)
        split = "  ".join(f"{1000 * r['compute']:.0f}/{1000 * r['comm']:.0f}/{1000 * r['wait']:.0f}" for r in res)
        print(f"{name:>10} {1000 * t:9.1f} {t / t_serial:9.2f} {ev:12.0f}  {split}")
    for name, res in (("one-shot", one_shot), ("exact", exact)):
        met = res[-1]["metrics"]
        print(f"{name} last step: iterations {met['mgrit_iters']}, residuals fwd "
              f"{[float('%.3g' % v) for v in met['mgrit_residuals']['fwd']]}, bwd "
              f"{[float('%.3g' % v) for v in met['mgrit_residuals']['bwd']]}")
    if a.factors:
        factors(a)


if __name__ == "__main__":
    main()
