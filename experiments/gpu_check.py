"""One-GPU check of auxpar: correctness on CUDA, coupled runs through gloo staging, and timings.

    python experiments/gpu_check.py OUTDIR [--budget-s 480]     # on a machine with one CUDA GPU
    python experiments/gpu_check.py OUTDIR --dry-run             # same code paths, CPU, tiny sizes

Writes OUTDIR/gpu_check.json (every number, every error) and OUTDIR/gpu_check.md (readable), after
every section, so a run cut short still leaves what it measured. Sections are independent: one
that fails records its error text and the script goes on; the exit code is 1 when any section
failed or was skipped for lack of time, 2 when there is no CUDA device and no --dry-run.

1. unit_tests: the device checks of tests/test_gpu_check.py (model forward/backward vs CPU,
   staged == whole net, DS filters, aux store placement, augmentation, serial steps, one-rank
   MGRIT exactness, bf16 autocast + channels_last) and the device-parametrized data tests of
   tests/test_data.py, in a pytest subprocess with AUXPAR_TEST_DEVICE=cuda; each test's outcome.
2. cli_runs: `auxpar train` on digits: serial, and penalty, al, mgrit at K = 2 (two ranks on the
   one GPU, --backend gloo, so tensors are staged through host memory); final test accuracy,
   train time and each rank's compute / comm / wait split from summary.json.
3. profile: per-block forward / backward / no-grad forward time of WRN-28-10 at CIFAR-100 shape,
   batch 128 (and the sub-batches model-perf needs), fp32 by auxpar.perfmodel.profile_model, and
   bf16 autocast + channels_last by this script's timer (optimizer, aux and loader costs copied
   from the fp32 profile); saved as model-perf profiles (`auxpar model-perf --profile FILE`).
4. throughput: serial WRN-28-10 training images/s at batch 128 (SGD step included), fp32 and
   bf16 autocast + channels_last, against the step time the profile predicts.
5. aux_store: AuxStore get_z / put_z GB/s of a batch of the K = 2 cut's boundary, store on the
   device and in pinned host memory, fp32 and bf16.
6. model_perf: `auxpar model-perf --profile` speedups of penalty, al, pipeline, ddp at K = 2, 4, 8
   over an NVLink-class and a PCIe-class link, from both profiles.

Timed regions are bracketed by torch.cuda.synchronize() (and CUDA events for per-block times).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ============================================================================ flags, in one place
# Extend here when the CLI grows (e.g. --precision / --channels-last for the training runs).

CLI_COMMON = ["--dataset", "digits", "--backend", "gloo", "--progress", "off", "--seed", "0", "--overwrite",
              "--timeout", "120"]
"""Flags of every `auxpar train` run of section 2 (plus --device, --epochs and --out)."""

CLI_RUNS = {
    "serial": ["--method", "serial"],
    "penalty": ["--method", "penalty", "--stages", "2"],  # --stages K starts K local ranks
    "al": ["--method", "al", "--stages", "2"],
    "mgrit": ["--method", "mgrit", "--stages", "2"],
}
"""Always run; a failure fails the section."""

OPTIONAL_CLI_RUNS = {
    "penalty_bf16_cl": ["--method", "penalty", "--stages", "2", "--precision", "bf16", "--channels-last"],
}
"""Run only when `auxpar train --help` lists every flag they use (flags being added elsewhere);
otherwise recorded as skipped (not a failure). Serial bf16 is measured in-process (section 4)."""

SUMMARY_KEYS = ("method", "stages", "world_size", "epochs", "steps", "final_test_acc", "best_test_acc",
                "final_train_loss", "train_time_s", "wall_time_s", "eval_time_s", "time_compute_s",
                "time_comm_s", "time_wait_s", "comm_bytes", "peak_memory_bytes_per_rank", "device", "backend",
                "threads", "precision", "channels_last")
"""summary.json fields copied into the report (absent ones are left out)."""

UNIT_TEST_FILES = ["tests/test_gpu_check.py", "tests/test_data.py"]
UNIT_TEST_SELECT = "test_device_ or augment_outputs or test_normalize or batch_loader_matches"
"""pytest -k: the device checks, and test_data's tests parametrized over the CUDA device."""

PERF_METHODS = "serial,ddp,pipeline,penalty,al"
PERF_STAGES = [2, 4, 8]
PERF_MICROBATCHES = 8
"""Pipeline micro-batches: 1F1B needs at least as many as stages (K = 8)."""
MODEL_PERF_FLAGS = ["--methods", PERF_METHODS, "--stages", ",".join(map(str, PERF_STAGES)),
                    "--microbatches", str(PERF_MICROBATCHES), "--no-plot"]
LINKS = {"nvlink": (300.0, 2.0), "pcie": (25.0, 10.0)}
"""name: (GB/s, microseconds)."""

VARIANTS = {"fp32": (None, False), "bf16_cl": (torch.bfloat16, True)}
"""name: (autocast dtype or None, channels_last)."""

SIZES = {
    "gpu": dict(model="wrn-28-10", dataset="cifar100", batch=128, repeats=5, warmup=5, steps=20, epochs=2,
                aux_batches=8, aux_repeats=10, test_timeout=240, run_timeout=180, threads=0, cli_extra=[]),
    # wrn-28-1: WRN-28-10's 12 blocks (so K = 8 is legal) at 1/10 the width; one thread everywhere
    "dry": dict(model="wrn-28-1", dataset="cifar100", batch=8, repeats=2, warmup=1, steps=3, epochs=1,
                aux_batches=4, aux_repeats=3, test_timeout=150, run_timeout=120, threads=1,
                cli_extra=["--threads", "1"]),
}
"""threads: torch threads of this process and of the unit-test process (0: torch's default);
cli_extra: flags added to every section-2 run."""

SECTION_ORDER = ("unit_tests", "profile", "throughput", "aux_store", "model_perf", "cli_runs")
MIN_SECONDS = {"unit_tests": 30, "profile": 30, "throughput": 15, "aux_store": 10, "model_perf": 5,
               "cli_runs": 20}
"""A section starts only with this much of the budget left (else: skipped, and the run fails)."""


# ============================================================================ helpers

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _child_env(**extra) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _fmt_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


# ============================================================================ machine

def machine_info(device: torch.device) -> dict:
    info = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_gib=p.total_memory / 2 ** 30,
                    gpu_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported())
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,pcie.link.gen.current,"
                                "pcie.link.width.current,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info["gpu_name"] = None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["git_commit"] = head.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# ============================================================================ 1. unit tests on the device

def section_unit_tests(ctx: dict) -> dict:
    dev = ctx["device"].type
    xml = ctx["out"] / "unit_tests.xml"
    cmd = [sys.executable, "-m", "pytest", *UNIT_TEST_FILES, "-k", UNIT_TEST_SELECT,
           "-m", "not slow and not benchmark", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    timeout = max(10.0, min(ctx["sizes"]["test_timeout"], ctx["remaining"]() - 5))
    threads = {"OMP_NUM_THREADS": str(ctx["sizes"]["threads"])} if ctx["sizes"]["threads"] else {}
    p = subprocess.run(cmd, cwd=ROOT, env=_child_env(AUXPAR_TEST_DEVICE=dev, **threads), capture_output=True,
                       text=True, timeout=timeout)
    (ctx["out"] / "logs").mkdir(exist_ok=True)
    (ctx["out"] / "logs" / "unit_tests.log").write_text(p.stdout + p.stderr)
    tests = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    msg = (child.get("message") or child.text or "")[:400]
            name = case.get("name", "")
            tests.append({"id": f"{case.get('classname', '')}::{name}", "outcome": outcome,
                          "on_device": name.startswith("test_device_") or f"[{dev}" in name or f"-{dev}" in name,
                          **({"message": msg} if msg else {})})
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    res = {"device": dev, "env": {"AUXPAR_TEST_DEVICE": dev}, "command": shlex.join(["python", *cmd[1:]]),
           "rc": p.returncode,
           "passed": count["passed"], "failed": count["failed"], "errors": count["error"],
           "skipped": count["skipped"], "on_device_passed": sum(t["on_device"] and t["outcome"] == "passed"
                                                               for t in tests),
           "tests": tests, "log": "logs/unit_tests.log"}
    if p.returncode != 0 or count["failed"] or count["error"] or not count["passed"]:
        res["error"] = (f"pytest exit {p.returncode}: {count['failed']} failed, {count['error']} errors, "
                        f"{count['passed']} passed; " + _tail(p.stdout, 1500))
    return res


# ============================================================================ 3. profile

def _config(ctx: dict):
    from auxpar.config import build_config

    s = ctx["sizes"]
    return build_config({}, {"model": {"name": s["model"]},
                             "data": {"dataset": s["dataset"], "batch_size": s["batch"]}},
                        source="gpu_check")


def _needed_batches(ctx: dict) -> list[int]:
    from auxpar.perfmodel import Scenario, needed_batch_sizes

    sc = Scenario(batch_size=ctx["sizes"]["batch"], microbatches=PERF_MICROBATCHES)
    return needed_batch_sizes(sc, PERF_STAGES, PERF_METHODS.split(","))


def _build(ctx: dict, device: torch.device, channels_last: bool = False):
    from auxpar.models import build_model
    from auxpar.plan import dataset_geometry

    c, size, classes, _ = dataset_geometry(_config(ctx).data)
    torch.manual_seed(0)
    net = build_model(ctx["sizes"]["model"], in_channels=c, input_size=size, num_classes=classes).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, classes


def part_times(net, batch_sizes: list[int], classes: int, device: torch.device, repeats: int, amp_dtype,
               channels_last: bool) -> dict:
    """{"<batch>": {"fwd", "bwd", "fwd_nograd"}} median seconds per part (stem, blocks, head), the
    layout auxpar.perfmodel.Profile.times uses; forward and backward are split by CUDA events."""
    clock = Clock(device)
    parts = [net.stem, *net.blocks, net.head]
    in_shapes = [net.input_shape, *net.boundary_shapes()]
    saved = copy.deepcopy(net.state_dict())
    net.train()
    out = {}
    for b in sorted(set(batch_sizes), reverse=True):
        rec = {"fwd": [], "bwd": [], "fwd_nograd": []}
        gen = torch.Generator().manual_seed(b)
        for j, (mod, shp) in enumerate(zip(parts, in_shapes)):
            x = _fmt_layout(torch.randn((b, *shp), generator=gen).to(device), channels_last)
            y = torch.randint(0, classes, (b,), generator=gen).to(device) if j == len(parts) - 1 else None
            fwd, bwd, ng = [], [], []
            for i in range(repeats + 1):  # the first repetition warms up kernels and allocators
                inp = x.detach().requires_grad_(j > 0)
                _sync(device)
                t0 = clock.mark()
                with _autocast(device, amp_dtype):
                    o = mod(inp)
                    loss = F.cross_entropy(o.float(), y) if y is not None else None
                t1 = clock.mark()
                if loss is not None:
                    loss.backward()
                else:
                    o.backward(torch.ones_like(o))
                t2 = clock.mark()
                if i:
                    fwd.append(clock.seconds(t0, t1))
                    bwd.append(clock.seconds(t1, t2))
            mod.zero_grad(set_to_none=True)
            with torch.no_grad():
                for i in range(repeats + 1):
                    _sync(device)
                    t0 = clock.mark()
                    with _autocast(device, amp_dtype):
                        mod(x)
                    t1 = clock.mark()
                    if i:
                        ng.append(clock.seconds(t0, t1))
            rec["fwd"].append(statistics.median(fwd))
            rec["bwd"].append(statistics.median(bwd))
            rec["fwd_nograd"].append(statistics.median(ng))
        out[str(b)] = rec
    net.load_state_dict(saved)
    return out


def _profile_summary(prof, batch: int, path: Path, out: Path) -> dict:
    t = prof.at(batch)
    fb = [f + b for f, b in zip(t["fwd"], t["bwd"])]
    opt_ms = 1e3 * prof.opt_s_per_param * sum(prof.params)
    return {"file": str(path.relative_to(out)), "batch": batch, "num_blocks": prof.num_blocks, "parts": prof.parts,
            "per_block_ms": [1e3 * v for v in fb], "fwd_ms": [1e3 * v for v in t["fwd"]],
            "bwd_ms": [1e3 * v for v in t["bwd"]], "fwd_nograd_ms": [1e3 * v for v in t["fwd_nograd"]],
            "fwd_bwd_ms": 1e3 * sum(fb), "optimizer_ms": opt_ms, "step_ms": 1e3 * sum(fb) + opt_ms,
            "fwd_bwd_ms_by_batch": {k: 1e3 * (sum(v["fwd"]) + sum(v["bwd"])) for k, v in prof.times.items()},
            "device": prof.device}


def _save_profile(ctx: dict, res: dict, name: str, prof, note: str) -> None:
    """Write one model-perf profile file (``{"profile": ...}``, what ``--profile`` loads) and its summary."""
    s, out = ctx["sizes"], ctx["out"]
    path = out / "profiles" / f"{s['model']}_{s['dataset']}_b{s['batch']}_{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"profile": prof.to_json(),
                                "gpu_check": {"variant": name, "autocast": str(VARIANTS[name][0]),
                                              "channels_last": VARIANTS[name][1], "note": note}}, indent=1))
    cmd = (f"python -m auxpar model-perf --profile {path} --model {s['model']} --dataset {s['dataset']} "
           f"--batch-size {s['batch']} " + " ".join(MODEL_PERF_FLAGS[:-1]) + " --bandwidth GBS --latency US")
    res["variants"][name] = {**_profile_summary(prof, s["batch"], path, out), "note": note,
                             "model_perf_command": cmd}
    ctx["profiles"][name] = path


def section_profile(ctx: dict) -> dict:
    from auxpar.perfmodel import Profile, profile_model

    s, dev = ctx["sizes"], ctx["device"]
    cfg = _config(ctx)
    sizes = _needed_batches(ctx)
    res = {"model": s["model"], "dataset": s["dataset"], "batch_sizes": sizes, "repeats": s["repeats"],
           "timing": "median", "variants": {}}
    # fp32: exactly what `auxpar model-perf` measures
    t0 = time.perf_counter()
    prof32 = profile_model(s["model"], s["dataset"], sizes, data_cfg=cfg.data, device=dev, repeats=s["repeats"],
                           optim_cfg=cfg.optim)
    res["fp32_profile_s"] = time.perf_counter() - t0
    _release(dev)
    tf32 = (f"; cuDNN convolutions in TF32: torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}"
            if dev.type == "cuda" else "")
    _save_profile(ctx, res, "fp32", prof32,
                  f"auxpar.perfmodel.profile_model (what `auxpar model-perf` measures{tf32})")
    # bf16 autocast + channels_last by this script's timer, which first times fp32 too (a cross-check)
    try:
        net, classes = _build(ctx, dev)
        mine32 = part_times(net, [s["batch"]], classes, dev, s["repeats"], None, False)
        mine = 1e3 * (sum(mine32[str(s["batch"])]["fwd"]) + sum(mine32[str(s["batch"])]["bwd"]))
        res["cross_check"] = {"fp32_fwd_bwd_ms_profile_model": res["variants"]["fp32"]["fwd_bwd_ms"],
                              "fp32_fwd_bwd_ms_script_timer": mine,
                              "ratio_script_over_profile_model": mine / res["variants"]["fp32"]["fwd_bwd_ms"]}
        net = net.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        times_bf = part_times(net, sizes, classes, dev, s["repeats"], VARIANTS["bf16_cl"][0], True)
        res["bf16_cl_profile_s"] = time.perf_counter() - t0
        del net
        prof_bf = Profile.from_json(copy.deepcopy(prof32.to_json()))
        prof_bf.times = times_bf
        prof_bf.device = f"{prof32.device} bf16-autocast channels_last"
        _save_profile(ctx, res, "bf16_cl", prof_bf,
                      "per-part times by experiments/gpu_check.py under torch.autocast(bfloat16), model and inputs "
                      "channels_last; opt_s_per_param, aux_s_per_value and load_s copied from the fp32 profile "
                      "(the optimizer and aux store stay fp32)")
        res["bf16_cl_speedup_fwd_bwd"] = (res["variants"]["fp32"]["fwd_bwd_ms"]
                                          / res["variants"]["bf16_cl"]["fwd_bwd_ms"])
    except Exception as exc:  # the fp32 profile stays
        res["error"] = f"bf16_cl: {type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()[-4000:]
    _release(dev)
    return res


# ============================================================================ 4. serial throughput

def serial_throughput(ctx: dict, amp_dtype, channels_last: bool) -> dict:
    from auxpar.coupling.serial import make_sgd

    s, dev = ctx["sizes"], ctx["device"]
    cfg = _config(ctx)
    net, classes = _build(ctx, dev, channels_last)
    net.train()
    opt = make_sgd(net.parameters(), cfg)
    B = s["batch"]
    g = torch.Generator().manual_seed(0)
    x = _fmt_layout(torch.randn((B, *net.input_shape), generator=g).to(dev), channels_last)
    y = torch.randint(0, classes, (B,), generator=g).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(dev, amp_dtype):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(s["warmup"]):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    clock = Clock(dev)
    per_step = []
    t_wall = time.perf_counter()
    for _ in range(s["steps"]):
        _sync(dev)
        a = clock.mark()
        loss = step().detach()
        b = clock.mark()
        per_step.append(clock.seconds(a, b))
    _sync(dev)
    wall = time.perf_counter() - t_wall
    res = {"batch": B, "warmup_steps": s["warmup"], "timed_steps": s["steps"],
           "median_step_ms": 1e3 * statistics.median(per_step), "min_step_ms": 1e3 * min(per_step),
           "images_per_s": B / statistics.median(per_step), "images_per_s_wall": B * s["steps"] / wall,
           "final_loss": float(loss), "loss_finite": bool(math.isfinite(float(loss)))}
    if dev.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    del net, opt, x, y
    _release(dev)
    return res


def section_throughput(ctx: dict) -> dict:
    res = {"model": ctx["sizes"]["model"], "dataset_shape": ctx["sizes"]["dataset"], "variants": {},
           "how": "SGD (momentum, Nesterov, weight decay) step on a fixed random batch; each step bracketed by "
                  "a synchronize and CUDA events; images/s from the median step"}
    errors = []
    for name, (amp, cl) in VARIANTS.items():
        try:
            r = serial_throughput(ctx, amp, cl)
            prof = ctx["section_results"].get("profile", {}).get("variants", {}).get(name)
            if prof:
                r["profile_step_ms"] = prof["step_ms"]
                r["measured_over_profile"] = r["median_step_ms"] / prof["step_ms"]
            res["variants"][name] = r
        except Exception as exc:  # one variant failing leaves the other
            res["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            _release(ctx["device"])
    if "fp32" in res["variants"] and "bf16_cl" in res["variants"] and not errors:
        res["bf16_cl_speedup"] = res["variants"]["bf16_cl"]["images_per_s"] / res["variants"]["fp32"]["images_per_s"]
    if errors:
        res["error"] = "; ".join(errors)
    return res


# ============================================================================ 5. aux store

def section_aux_store(ctx: dict) -> dict:
    from auxpar.coupling.aux_store import AuxStore
    from auxpar.models import partition_counts

    s, dev = ctx["sizes"], ctx["device"]
    net, _ = _build(ctx, torch.device("meta"))
    counts = partition_counts(net, 2)
    shape = tuple(net.boundary_shapes()[counts[0]])  # the boundary into stage 2 of the K = 2 cut
    B, rows = s["batch"], s["aux_batches"] * s["batch"]
    res = {"shape": list(shape), "batch": B, "store_rows": rows, "repeats": s["aux_repeats"],
           "how": "wall time of get_z / put_z of one batch of random rows, each call followed by a "
                  "synchronize; GB/s = stored bytes of the batch / median time", "rows": []}
    g = torch.Generator().manual_seed(0)
    vals = torch.randn((B, *shape), generator=g).to(dev)
    for placement in ("device", "host"):
        for dtype in ("fp32", "bf16"):
            store = AuxStore(rows, shape, dtype=dtype, placement=placement, device=dev)
            idx = torch.randperm(rows, generator=g)[:B].to(dev)
            nbytes = B * math.prod(shape) * store.z.element_size()
            t = {}
            for op, fn in (("put", lambda: store.put_z(idx, vals)), ("get", lambda: store.get_z(idx))):
                times = []
                for i in range(s["aux_repeats"] + 1):
                    _sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    _sync(dev)
                    if i:
                        times.append(time.perf_counter() - t0)
                t[op] = statistics.median(times)
            res["rows"].append({"placement": placement, "dtype": dtype, "pinned": bool(store.z.is_pinned()),
                                "store_device": str(store.store_device), "batch_bytes": nbytes,
                                "get_ms": 1e3 * t["get"], "put_ms": 1e3 * t["put"],
                                "get_gbs": nbytes / t["get"] / 1e9, "put_gbs": nbytes / t["put"] / 1e9})
            del store
            _release(dev)
    return res


# ============================================================================ 6. model-perf

def section_model_perf(ctx: dict) -> dict:
    from auxpar import cli

    s, out = ctx["sizes"], ctx["out"]
    if not ctx["profiles"]:
        raise RuntimeError("needs the profile section's files, and the profile section wrote none")
    res = {"links": {k: {"bandwidth_gbs": v[0], "latency_us": v[1]} for k, v in LINKS.items()}, "runs": {},
           "rows": [], "how": "auxpar.cli.main(['model-perf', '--profile', FILE, ...]) in this process"}
    errors = []
    for variant, path in ctx["profiles"].items():
        for link, (bw, lat) in LINKS.items():
            d = out / "model_perf" / f"{variant}_{link}"
            argv = ["model-perf", "--profile", str(path), "--model", s["model"], "--dataset", s["dataset"],
                    "--batch-size", str(s["batch"]), "--bandwidth", str(bw), "--latency", str(lat),
                    "--out", str(d), *MODEL_PERF_FLAGS]
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                code = cli.main(argv)
            key = f"{variant}_{link}"
            res["runs"][key] = {"argv": " ".join(argv), "rc": code, "dir": str(d.relative_to(out))}
            if code != 0 or not (d / "perf.json").exists():
                errors.append(f"{key}: model-perf exit {code}: {_tail(buf.getvalue(), 800)}")
                continue
            perf = json.loads((d / "perf.json").read_text())
            res["runs"][key]["epochs"] = perf["scenario"]["epochs"]
            for r in perf["rows"]:
                res["rows"].append({"profile": variant, "link": link, "method": r["method"], "K": r["K"],
                                    "speedup": r.get("speedup"), "step_ms": None if r.get("step_s") is None
                                    else 1e3 * r["step_s"], "epoch_s": r.get("epoch_s"),
                                    "idle_fraction": r.get("idle_fraction"), "note": r.get("note", "")})
    missing = [v for v in VARIANTS if v not in ctx["profiles"]]
    if missing:
        errors.append(f"no profile of {', '.join(missing)} (see the profile section)")
    if errors:
        res["error"] = "; ".join(errors)
    return res


# ============================================================================ 2. CLI runs

def _train_flags() -> set[str]:
    p = subprocess.run([sys.executable, "-m", "auxpar", "train", "--help"], cwd=ROOT, env=_child_env(),
                       capture_output=True, text=True, timeout=120)
    return {tok.strip("[],") for tok in p.stdout.split() if tok.startswith(("--", "[--"))}


def _run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own session; on timeout stop its whole process group (the launcher and
    the ranks it started), so no rank is left holding the GPU. Returns (exit code or None, output)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
        return p.returncode, text
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                text, _ = p.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                text = ""
        return None, f"timed out after {timeout:.0f} s\n{text or ''}"


def _one_run(ctx: dict, name: str, flags: list[str]) -> dict:
    s, out = ctx["sizes"], ctx["out"]
    rdir = out / "runs" / name
    dev = "cuda" if ctx["device"].type == "cuda" else "cpu"
    argv = ["train", *CLI_COMMON, *flags, *s["cli_extra"], "--device", dev, "--epochs", str(s["epochs"]),
            "--out", str(rdir)]
    timeout = min(s["run_timeout"], ctx["remaining"]() - 2)
    rec = {"argv": "python -m auxpar " + " ".join(argv), "log": f"logs/{name}.log"}
    if timeout < 10:
        rec["skipped"] = f"out of time budget ({timeout + 2:.0f} s left; raise --budget-s)"
        return rec
    t0 = time.perf_counter()
    rc, text = _run_group([sys.executable, "-m", "auxpar", *argv], timeout)
    rec["rc"], rec["wall_s"] = rc, time.perf_counter() - t0
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{name}.log").write_text(text if isinstance(text, str) else str(text))
    summ = rdir / "summary.json"
    if rc == 0 and summ.exists():
        data = json.loads(summ.read_text())
        rec.update({k: data[k] for k in SUMMARY_KEYS if k in data})
    else:
        rec["error"] = f"exit {rc}: {_tail(text, 1500)}"
    return rec


def section_cli_runs(ctx: dict) -> dict:
    res = {"epochs": ctx["sizes"]["epochs"], "common_flags": " ".join(CLI_COMMON), "runs": {}}
    have = _train_flags()
    errors = []
    for name, flags in CLI_RUNS.items():
        r = _one_run(ctx, name, flags)
        res["runs"][name] = r
        if "error" in r or "skipped" in r:
            errors.append(f"{name}: {r.get('error', r.get('skipped'))[:300]}")
    for name, flags in OPTIONAL_CLI_RUNS.items():
        missing = [f for f in flags if f.startswith("--") and f not in have]
        if missing:
            res["runs"][name] = {"skipped": f"flags not in `auxpar train --help` yet: {', '.join(missing)}"}
            continue
        r = _one_run(ctx, name, flags)
        res["runs"][name] = r
        if "error" in r and ctx["device"].type == "cpu":
            # the dry run: bf16 / channels_last may legitimately be refused on a CPU
            r["not_counted"] = "optional run on the CPU dry run: its failure does not fail the section"
        elif "error" in r:
            errors.append(f"{name}: {r['error'][:300]}")
    if errors:
        res["error"] = "; ".join(errors)
    return res


SECTIONS = {"unit_tests": section_unit_tests, "profile": section_profile, "throughput": section_throughput,
            "aux_store": section_aux_store, "model_perf": section_model_perf, "cli_runs": section_cli_runs}


# ============================================================================ report

def _f(v, fmt="{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    if isinstance(v, list):
        return ", ".join(_f(x, fmt) for x in v)
    return str(v)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(rep: dict) -> str:
    m, sec = rep["machine"], rep["sections"]
    L = [f"# auxpar GPU check{' (dry run on CPU)' if rep['dry_run'] else ''}", "",
         f"Started {rep['started_utc']}, {'finished ' + rep['finished_utc'] if rep.get('finished_utc') else 'running'}"
         f"; {_f(rep.get('elapsed_s'), '{:.0f}')} s of a {rep['budget_s']:.0f} s budget. "
         f"Overall: **{'OK' if rep.get('ok') else 'NOT OK'}**.", "", "## Machine", ""]
    for k in ("hostname", "platform", "cpu_count", "python", "torch", "cuda_runtime", "cudnn", "device", "gpu_name",
              "gpu_capability", "gpu_memory_gib", "gpu_count", "bf16_supported", "nvidia_smi", "cudnn_allow_tf32",
              "matmul_allow_tf32", "cudnn_benchmark", "torch_threads", "git_commit", "git_dirty"):
        if k in m:
            L.append(f"- {k}: {_f(m[k])}")
    L += ["", "Sizes: " + ", ".join(f"{k}={v}" for k, v in rep["sizes"].items()), "",
          "| section | status | seconds |", "|---|---|---|"]
    for name in SECTION_ORDER:
        s = sec.get(name, {})
        L.append(f"| {name} | {s.get('status', 'not run')} | {_f(s.get('seconds'), '{:.1f}')} |")
    for name in SECTION_ORDER:
        s = sec.get(name)
        if s and s.get("error"):
            L += ["", f"**{name} error:**", "", "~~~", str(s["error"])[:3000].replace("~~~", "~ ~ ~"), "~~~"]

    s = sec.get("unit_tests")
    if s and "tests" in s:
        L += ["", "## Unit tests on the device", "",
              f"`AUXPAR_TEST_DEVICE={s['device']} {s['command']}` (exit {s['rc']}): "
              f"{s['passed']} passed ({s['on_device_passed']} on {s['device']}), {s['failed']} failed, "
              f"{s['errors']} errors, {s['skipped']} skipped.", "", "| test | outcome |", "|---|---|"]
        for t in s["tests"]:
            msg = _cell(t.get("message", "")[:160])
            L.append(f"| {t['id']} | {t['outcome']}{': ' + msg if msg else ''} |")

    s = sec.get("cli_runs")
    if s and "runs" in s:
        L += ["", f"## CLI runs (digits, {s['epochs']} epoch(s); common flags `{s['common_flags']}`)", "",
              "| run | rc | final test acc | train s | wall s | compute s (per rank) | comm s | wait s | device "
              "| backend |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in s["runs"].items():
            if "skipped" in r:
                L.append(f"| {name} | skipped: {_cell(r['skipped'])} |||||||||")
                continue
            acc = r.get("final_test_acc")
            L.append(f"| {name} | {r.get('rc')} | {'-' if acc is None else f'{100 * acc:.2f}%'} | "
                     f"{_f(r.get('train_time_s'))} | {_f(r.get('wall_s'))} | {_f(r.get('time_compute_s'))} | "
                     f"{_f(r.get('time_comm_s'))} | {_f(r.get('time_wait_s'))} | {r.get('device', '-')} | "
                     f"{r.get('backend', '-')} |")
        L += ["", "Commands:", ""] + [f"- `{r['argv']}`" for r in s["runs"].values() if "argv" in r]
        failed = [(n, r) for n, r in s["runs"].items() if r.get("error")]
        if failed:
            L += ["", "Failed runs (log files under OUTDIR/logs):", ""]
            L += [f"- {n}{' (not counted: ' + r['not_counted'] + ')' if r.get('not_counted') else ''}: "
                  f"{_cell(r['error'][-600:])}" for n, r in failed]

    s = sec.get("profile")
    if s and s.get("variants"):
        L += ["", f"## Profile: {s['model']} at {s['dataset']} shape, per part forward + backward (ms)", "",
              f"Batch sizes profiled: {s['batch_sizes']}; median of {s['repeats']} after one warm-up."]
        vs = s["variants"]
        names = next(iter(vs.values()))["parts"]
        L += ["", "| part | " + " | ".join(f"{v} fwd | {v} bwd | {v} fwd+bwd" for v in vs) + " |",
              "|---|" + "---|---|---|" * len(vs)]
        for j, part in enumerate(names):
            L.append(f"| {part} | " + " | ".join(f"{v['fwd_ms'][j]:.3f} | {v['bwd_ms'][j]:.3f} | "
                                                  f"{v['per_block_ms'][j]:.3f}" for v in vs.values()) + " |")
        for n, v in vs.items():
            L.append(f"\n- {n}: fwd+bwd {v['fwd_bwd_ms']:.2f} ms, optimizer {v['optimizer_ms']:.2f} ms, step "
                     f"{v['step_ms']:.2f} ms at batch {v['batch']}; by batch "
                     + ", ".join(f"{b}: {t:.2f} ms" for b, t in v["fwd_bwd_ms_by_batch"].items())
                     + f"; file `{v['file']}`; reuse: `{v['model_perf_command']}`. {v['note']}.")
        if "cross_check" in s:
            c = s["cross_check"]
            L.append(f"- cross-check fp32 fwd+bwd: profile_model {c['fp32_fwd_bwd_ms_profile_model']:.2f} ms, "
                     f"this script's timer {c['fp32_fwd_bwd_ms_script_timer']:.2f} ms "
                     f"(ratio {c['ratio_script_over_profile_model']:.3f}); bf16_cl speedup of fwd+bwd "
                     f"{_f(s.get('bf16_cl_speedup_fwd_bwd'))}x.")

    s = sec.get("throughput")
    if s and s.get("variants"):
        L += ["", f"## Throughput: serial {s['model']} training ({s['how']})", "",
              "| variant | images/s | median step ms | min step ms | images/s (wall) | profile step ms "
              "| measured/profile | peak GiB |",
              "|---|---|---|---|---|---|---|---|"]
        for n, r in s["variants"].items():
            if "error" in r:
                L.append(f"| {n} | error: {_cell(r['error'][:200])} |||||||")
                continue
            L.append(f"| {n} | {r['images_per_s']:.1f} | {r['median_step_ms']:.2f} | {r['min_step_ms']:.2f} | "
                     f"{r['images_per_s_wall']:.1f} | {_f(r.get('profile_step_ms'))} | "
                     f"{_f(r.get('measured_over_profile'))} | {_f(r.get('peak_memory_gib'))} |")
        if "bf16_cl_speedup" in s:
            L.append(f"\nbf16 autocast + channels_last: {s['bf16_cl_speedup']:.2f}x the fp32 images/s.")

    s = sec.get("aux_store")
    if s and s.get("rows"):
        L += ["", f"## Aux store: batch {s['batch']} of boundary {tuple(s['shape'])}, {s['store_rows']} rows "
                  f"({s['how']})", "",
              "| placement | dtype | pinned | batch MB | get ms | get GB/s | put ms | put GB/s |",
              "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            L.append(f"| {r['placement']} | {r['dtype']} | {r['pinned']} | {r['batch_bytes'] / 1e6:.1f} | "
                     f"{r['get_ms']:.3f} | {r['get_gbs']:.2f} | {r['put_ms']:.3f} | {r['put_gbs']:.2f} |")

    s = sec.get("model_perf")
    if s and s.get("rows"):
        L += ["", "## model-perf predicted speedups vs serial (from the saved profiles)", "",
              "Links: " + "; ".join(f"{k} {v['bandwidth_gbs']:g} GB/s, {v['latency_us']:g} us"
                                    for k, v in s["links"].items()) + ".", "",
              "| profile | link | method | K | speedup | step ms | epoch s | idle | note |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            idle = "-" if r["idle_fraction"] is None else f"{100 * r['idle_fraction']:.0f}%"
            L.append(f"| {r['profile']} | {r['link']} | {r['method']} | {r['K']} | {sp} | {_f(r['step_ms'])} | "
                     f"{_f(r['epoch_s'])} | {idle} | {r['note']} |")
    return "\n".join(L) + "\n"


def write_report(rep: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1, default=str))
    try:
        md = markdown(rep)
    except Exception as exc:  # a report bug must not lose the numbers: fall back to the JSON
        md = (f"# auxpar GPU check\n\nThe markdown renderer failed ({type(exc).__name__}: {exc}); "
              f"the results as JSON:\n\n~~~\n{json.dumps(rep, indent=1, default=str)}\n~~~\n")
    (out / "gpu_check.md").write_text(md)


# ============================================================================ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script end to end")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; run this on the GPU machine, "
              "or pass --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    if sizes["threads"]:
        torch.set_num_threads(sizes["threads"])
    ctx = {"out": out, "device": device, "sizes": sizes, "profiles": {}, "section_results": {},
           "remaining": lambda: args.budget_s - (time.perf_counter() - t_start)}
    rep = {"script": "experiments/gpu_check.py", "format": 1, "dry_run": args.dry_run, "started_utc": _now(),
           "budget_s": args.budget_s, "sizes": sizes, "machine": machine_info(device),
           "flags": {"cli_common": CLI_COMMON, "cli_runs": CLI_RUNS, "optional_cli_runs": OPTIONAL_CLI_RUNS,
                     "model_perf": MODEL_PERF_FLAGS, "links": LINKS, "unit_test_files": UNIT_TEST_FILES,
                     "unit_test_select": UNIT_TEST_SELECT},
           "sections": {}}
    write_report(rep, out)
    for name in SECTION_ORDER:
        left = ctx["remaining"]()
        t0 = time.perf_counter()
        if left < MIN_SECONDS[name]:
            rec = {"status": "skipped", "error": f"skipped: {left:.0f} s of the budget left, needs "
                                                 f"{MIN_SECONDS[name]} s (raise --budget-s)"}
        else:
            print(f"gpu_check: {name} ({left:.0f} s left)", flush=True)
            try:
                rec = SECTIONS[name](ctx)
                rec["status"] = "failed" if rec.get("error") else "ok"
            except Exception as exc:
                rec = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-4000:]}
                _release(device)
        rec["seconds"] = float(time.perf_counter() - t0)
        ctx["section_results"][name] = rec
        rep["sections"][name] = rec
        rep["elapsed_s"] = time.perf_counter() - t_start
        write_report(rep, out)
        print(f"gpu_check: {name}: {rec['status']} in {rec['seconds']:.1f} s"
              + (f" ({str(rec['error'])[:300]})" if rec.get("error") else ""), flush=True)
    rep["ok"] = all(s["status"] == "ok" for s in rep["sections"].values())
    rep["finished_utc"] = _now()
    rep["elapsed_s"] = time.perf_counter() - t_start
    write_report(rep, out)
    print(f"gpu_check: {'all sections ok' if rep['ok'] else 'some sections failed'} in {rep['elapsed_s']:.0f} s; "
          f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
