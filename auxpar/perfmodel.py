"""``auxpar model-perf``: profile a model on this device, predict every method's epoch time at K devices.

Profile (measured here, once, at the batch sizes the methods use):

* per part (stem, every block, head): forward, backward and no-grad forward seconds at each
  batch size (median of ``repeats`` after one warm-up), the forward FLOPs and parameters;
* per-sample values of every boundary state (fp32 bytes = 4 x values);
* SGD step seconds per parameter (momentum, Nesterov, weight decay, as training uses);
* the coupling's per-value work (aux-store gather, aux update, scatter, penalty loss and its
  backward), seconds per boundary value;
* the batch loader's seconds per batch with and without augmentation.

Prediction (one step, then an epoch of S = floor(n_train / B) steps plus loading). Stage k of a
K-stage cut has forward F_k, backward B_k and optimizer O_k time; boundary k (into stage k) has
v_k values per sample. A message of n bytes costs ``c(n) = latency + n / bandwidth``; one tiny
all-reduce (the NaN guard every multi-rank method runs each step) costs ``2 ceil(log2 K) latency``.

* serial: sum of F + B over all parts + O.
* ddp: the same at batch B/K, plus a ring all-reduce of the gradients,
  ``2 (K-1) latency x buckets + 2 (K-1)/K x 4P / bandwidth`` (no overlap with backward assumed).
* pipeline (GPipe or 1F1B, M micro-batches of m = B/M): the first micro-batch crosses every
  stage and link forward and back, the other M-1 follow at the pace of the slowest stage,
  ``sum_k t_k + 2 sum_k c(a_k) + (M-1) max_k (t_k + its sends) + max_k O_k`` with t_k = F_k(m) +
  B_k(m), a_k = 4 m v_k. For equal stages and free links this is (M+K-1) t, i.e. the bubble
  fraction (K-1)/(M+K-1); GPipe and 1F1B take the same time (they differ in memory).
* penalty / al, parallel phase: every stage at once, ``max_k (F_k + B_k + O_k + aux_k + sends_k)``,
  sends of 4 B v / s^2 bytes (DS factor s; aux dtype bytes instead of 4). Serial phase: the
  layer executor's ``sum_k (F_k + B_k) + 2 sum_k c(4 B v_k) + max_k O_k`` or the pipeline
  executor's pipeline time. Re-initialization (start of every parallel phase that follows a
  serial one, and the first): a forward over the training set, pipelined over batches. Epochs
  follow the SPH phases; the mean epoch time includes re-initializations.
* penalty / al with ``--dp D`` (a K x D mesh, K*D devices; rank = d*K + k): every replica runs
  the formulas above at its batch b = B/D (the profile at b; re-initialization over its shard of
  ceil(N/D) samples), and each stage's gradients are averaged over its D replicas by a ring
  all-reduce of 2 (D-1)/D x 4 P_k bytes (P_k: the stage's parameters; ``ring_allreduce_time`` at
  the scenario's link). The all-reduce is overlapped with backward (DDP on the stage's replica
  group, buckets reduced while backward fills the next): only its exposed part
  ``max(0, allreduce_k - B_k(b))`` adds to stage k's time, i.e. it is assumed to run at full link
  speed concurrently with the backward without slowing it. In the layer-serial phase stage k's
  reduce also hides behind the backward of the stages below it (``max(0, allreduce_k - sum_{j<=k}
  B_j(b))``); in the pipeline serial executor only behind the last micro-batch's backward. The
  NaN guard spans all K*D ranks. The ddp row next to it is plain DDP over all K*D devices at
  B/(K*D), under the same overlap assumption (both average gradients with DDP's bucketed
  all-reduce during backward, so neither side is favoured); ddp rows at D = 1 keep the
  conservative no-overlap figure above.
  MGRIT with --dp and the pipeline (no replicas) are not modelled: their rows say so.
* mgrit (cost model, not yet validated against runs): per forward iteration a relaxation on
  every rank (F: (m-1)/m, FCF: (2(m-1)+1)/m of the rank's block forwards), the coarse level solved
  serially (sum of block forwards / prod(cfactors), plus K-1 messages, intermediate levels
  relaxed in parallel), plus two neighbour messages per relaxation; adjoint iterations the same
  with backward times; then a final F-relaxation forward and backward that accumulates the
  gradients; plus the optimizer.

Assumptions to keep in mind: communication is not overlapped with compute (a conservative
choice, right for gloo on CPU); every device is the profiled one and runs nothing else, unless
``--contention F`` says the ranks share one machine (every multi-rank method's compute then takes
F times the profile, serial none: :attr:`Scenario.contention`); per-step
Python overhead of the training loop and of torch.distributed.pipelining's schedule is not
modeled (the pipeline is the method the model under-predicts most: -14% and -15% measured).
``experiments/validate_perfmodel.py`` measures the error against K = 2 CPU runs
(:data:`SERIAL_STEP_ERROR`, :data:`EPOCH_ERROR_K2`; README, performance model).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from auxpar import registry
from auxpar.errors import ConfigError
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb

SERIAL_STEP_ERROR = 0.20
"""Stated relative error of the predicted serial step time (sum of profiled parts + optimizer)
against a step measured on the same device. Measured on a 2-core x86_64 CPU, torch 2.13, 1 thread:
-12% .. +11% (experiments/validate_perfmodel.py and repeated in-process measurements; README)."""

EPOCH_ERROR_K2 = 0.16
"""Stated relative error of predicted K = 2 epoch times and speedups on CPU (gloo, 1 thread per
rank, idle machine): measured -15% .. +15% by experiments/validate_perfmodel.py on digits and on
3x32x32 synthetic data (serial, penalty parallel/serial epochs and re-initialization, pipeline)
on 2026-11-21. Rerun on 2026-12-01 it no longer held for these small workloads (digits: multi-rank
epochs -28% .. -40%, a fixed per-step cost the model lacks; synthetic: up to +21%, and +57% for the
re-initialization, which now borrows the idle rank's threads); on Fashion-MNIST, with the
measured ``Scenario.contention``, within 8% of the K = 2 study (README, performance model)."""


# ---------------------------------------------------------------------------- cost formulas

def message_time(nbytes: float, bandwidth_gbs: float, latency_us: float) -> float:
    """Seconds to send one message of ``nbytes``: latency + bytes / bandwidth (GB/s = 1e9 B/s)."""
    if nbytes <= 0:
        return 0.0
    return latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)


def bubble_fraction(K: int, M: int) -> float:
    """Idle fraction of a GPipe / 1F1B pipeline of K equal stages and M micro-batches."""
    return (K - 1) / (M + K - 1)


def small_allreduce_time(K: int, latency_us: float) -> float:
    """One all-reduce of a few bytes (recursive doubling / tree): 2 ceil(log2 K) latencies."""
    return 0.0 if K <= 1 else 2 * math.ceil(math.log2(K)) * latency_us * 1e-6


def ring_allreduce_time(nbytes: float, K: int, bandwidth_gbs: float, latency_us: float,
                        bucket_bytes: float = DDP_BUCKET_BYTES) -> float:
    """Bandwidth-optimal ring all-reduce of ``nbytes`` in buckets: each bucket 2 (K-1) latencies,
    the payload 2 (K-1)/K x bytes / bandwidth."""
    if K <= 1 or nbytes <= 0:
        return 0.0
    buckets = max(1, math.ceil(nbytes / bucket_bytes))
    return buckets * 2 * (K - 1) * latency_us * 1e-6 + 2 * (K - 1) / K * nbytes / (bandwidth_gbs * 1e9)


def exposed_allreduce_time(allreduce_s: float, hidden_by_s: float) -> float:
    """The part of a gradient all-reduce that the backward does not hide: ``max(0, allreduce -
    backward)``. Assumes DDP-style overlap: buckets are reduced as soon as backward has filled
    them, at full link speed, without slowing the backward (optimistic for the last bucket)."""
    return max(0.0, allreduce_s - hidden_by_s)


def pipeline_step_time(stage_times: list[float], link_bytes: list[float], M: int, bandwidth_gbs: float,
                       latency_us: float, optimizer: float = 0.0) -> float:
    """One micro-batched pipeline step (GPipe or 1F1B).

    stage_times[k]: forward + backward of one micro-batch on stage k; link_bytes[k]: bytes of one
    micro-batch's activation over the link between stage k and k+1 (the gradient back is the
    same size). The first micro-batch fills and drains the pipeline; the other M - 1 follow at
    the pace of the slowest stage, whose sends are not overlapped with its compute.
    """
    K = len(stage_times)
    c = [message_time(b, bandwidth_gbs, latency_us) for b in link_bytes]  # K - 1 links
    fill = sum(stage_times) + 2 * sum(c)
    pace = max(stage_times[k] + (c[k] if k < K - 1 else 0.0) + (c[k - 1] if k > 0 else 0.0)
               for k in range(K))
    return fill + (M - 1) * pace + optimizer


# ---------------------------------------------------------------------------- profile

@dataclass
class Profile:
    model: str
    dataset: str
    norm: str
    device: str
    threads: int
    torch_version: str
    date: str
    input_shape: list
    num_classes: int
    train_samples: int
    batch_size: int
    parts: list
    """["stem", "block0", ..., "head"]"""
    params: list
    flops: list
    """Forward FLOPs per sample of each part."""
    boundary_values: list
    """Values per sample of the state after the stem and after every block (len = blocks + 1)."""
    times: dict = field(default_factory=dict)
    """{"<batch>": {"fwd": [...], "bwd": [...], "fwd_nograd": [...]}} seconds per part."""
    opt_s_per_param: float = 0.0
    aux_s_per_value: float = 0.0
    load_s: dict = field(default_factory=dict)
    """{"<batch>": {"augment": s, "plain": s}} seconds per batch."""

    @property
    def num_blocks(self) -> int:
        return len(self.parts) - 2

    def at(self, batch: int) -> dict:
        key = str(batch)
        if key not in self.times:
            raise ConfigError(f"the profile has no timings at batch size {batch} (it has "
                              f"{', '.join(sorted(self.times, key=int))}); profile again without --profile")
        return self.times[key]

    def load(self, batch: int, augment: bool) -> float:
        rec = self.load_s.get(str(batch))
        return 0.0 if rec is None else rec["augment" if augment else "plain"]

    def slowed(self, factor: float) -> "Profile":
        """The profile with every compute time (parts, optimizer, aux work, loading) times ``factor``:
        what each rank of a method computes at when all ranks share the profiled hardware
        (:attr:`Scenario.contention`). Shapes, parameters and FLOPs are unchanged."""
        if factor == 1.0:
            return self
        times = {b: {k: [factor * v for v in vals] for k, vals in rec.items()} for b, rec in self.times.items()}
        load = {b: {k: factor * v for k, v in rec.items()} for b, rec in self.load_s.items()}
        data = dict(asdict(self), times=times, load_s=load, opt_s_per_param=factor * self.opt_s_per_param,
                    aux_s_per_value=factor * self.aux_s_per_value)
        return Profile(**data)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        return cls(**data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STAT = {"median": statistics.median, "min": min}


def _median_time(fn, repeats: int, device: torch.device, stat: str = "median") -> float:
    times = []
    for i in range(repeats + 1):  # the first call warms up kernels and allocators
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return _STAT[stat](times)


def _time_part(mod, x: torch.Tensor, y: torch.Tensor | None, repeats: int, device,
               input_grad: bool = True, stat: str = "median") -> tuple[float, float, float]:
    """(forward, backward, no-grad forward) median seconds of one part on ``x``; the backward
    computes the input gradient too unless ``input_grad`` is False (the stem: its input is data)."""
    fwd, bwd = [], []
    needs_grad = input_grad
    for i in range(repeats + 1):
        inp = x.detach().requires_grad_(needs_grad)
        _sync(device)
        t0 = time.perf_counter()
        out = mod(inp)
        if y is not None:
            out = F.cross_entropy(out, y)
        _sync(device)
        t1 = time.perf_counter()
        if y is not None:
            out.backward()
        else:
            out.backward(torch.ones_like(out))
        _sync(device)
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    mod.zero_grad(set_to_none=True)
    with torch.no_grad():
        nograd = _median_time(lambda: mod(x), repeats, device, stat)
    return _STAT[stat](fwd), _STAT[stat](bwd), nograd


def _aux_seconds_per_value(shape: tuple, batch: int, repeats: int, device, stat: str = "median") -> float:
    """Per boundary value: gather z from a store, aux update, scatter, penalty loss + backward."""
    from auxpar.coupling.layer_parallel import aux_update

    rows = 4 * batch
    store = torch.zeros((rows, *shape), device=device)
    idx = torch.randperm(rows, device=device)[:batch]
    o = torch.randn((batch, *shape), device=device)
    g = torch.randn((batch, *shape), device=device)

    def work():
        z = store.index_select(0, idx)
        (o - z).flatten(1).norm(dim=1).sum()  # residual accounting
        z_new, _ = aux_update("gradient", z, o, g, None, 0.1)
        store.index_copy_(0, idx, z_new)
        out = o.detach().requires_grad_(True)
        loss = 0.5 * 0.1 * (out - z).pow(2).flatten(1).sum(1).mean()
        loss.backward()

    return _median_time(work, repeats, device, stat) / (batch * math.prod(shape))


def _load_seconds(shape: tuple, classes: int, dataset: str, batch: int, repeats: int, device,
                  stat: str = "median") -> dict:
    from auxpar.data import Augment, BatchLoader, IndexSampler, default_augment, load_dataset

    n = batch * 4
    ds = load_dataset("synthetic", "train", synthetic={"num_train": n, "num_test": 1, "shape": tuple(shape),
                                                       "num_classes": classes})
    a = default_augment(dataset if dataset != "synthetic" else "synthetic")
    aug = Augment(crop_pad=a["crop_pad"], pad_mode=a["pad_mode"], flip=a["flip"])
    out = {}
    for key, use in (("augment", True), ("plain", False)):
        loader = BatchLoader(ds, IndexSampler(n, batch, seed=0), device=device, augment=aug if use else None)

        def one_epoch():
            for _ in loader:
                pass

        out[key] = _median_time(one_epoch, repeats, torch.device(device), stat) / len(loader)
    return out


def profile_model(model: str, dataset: str, batch_sizes: list[int], *, data_cfg=None, norm: str = "bn",
                  device: str | torch.device = "cpu", repeats: int = 5, threads: int = 0,
                  optim_cfg=None, progress=None, stat: str = "median") -> Profile:
    """Measure everything :func:`predict` needs, at every batch size in ``batch_sizes``.

    ``stat``: median (default) or min of the timed repetitions; min estimates the time on an
    otherwise idle machine (other processes only ever add time)."""
    if stat not in _STAT:
        raise ConfigError(f"stat {stat!r}: choose median or min")
    from auxpar.config import DataConfig, OptimConfig
    from auxpar.models import build_model
    from auxpar.plan import dataset_geometry

    device = torch.device(device)
    data_cfg = data_cfg or DataConfig(dataset=dataset)
    optim_cfg = optim_cfg or OptimConfig()
    c, size, classes, n_train = dataset_geometry(data_cfg)
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = build_model(model, in_channels=c, input_size=size, num_classes=classes, norm=norm).to(device)
        saved = {k: v.clone() for k, v in net.state_dict().items()}
        net.train()
        shapes = net.boundary_shapes()
        stem_f, block_f, head_f = net.costs()
        parts = [net.stem, *net.blocks, net.head]
        names = ["stem", *[f"block{j}" for j in range(net.num_blocks)], "head"]
        in_shapes = [net.input_shape, *shapes]  # input of part j
        prof = Profile(
            model=net.name, dataset=dataset, norm=norm, device=str(device), threads=torch.get_num_threads(),
            torch_version=torch.__version__, date=datetime.date.today().isoformat(),
            input_shape=list(net.input_shape), num_classes=classes, train_samples=n_train,
            batch_size=max(batch_sizes), parts=names,
            params=[sum(p.numel() for p in m.parameters()) for m in parts],
            flops=[stem_f, *block_f, head_f], boundary_values=[math.prod(s) for s in shapes])
        for b in sorted(set(batch_sizes), reverse=True):
            rec = {"fwd": [], "bwd": [], "fwd_nograd": []}
            gen = torch.Generator().manual_seed(b)
            for j, (mod, shp) in enumerate(zip(parts, in_shapes)):
                x = torch.randn((b, *shp), generator=gen).to(device)
                y = torch.randint(0, classes, (b,), generator=gen).to(device) if j == len(parts) - 1 else None
                f, bw, ng = _time_part(mod, x, y, repeats, device, input_grad=j > 0, stat=stat)
                rec["fwd"].append(f)
                rec["bwd"].append(bw)
                rec["fwd_nograd"].append(ng)
            prof.times[str(b)] = rec
            prof.load_s[str(b)] = _load_seconds(net.input_shape, classes, dataset, b, repeats, device, stat)
            if progress:
                progress(f"profiled batch {b}: forward+backward {sum(rec['fwd']) + sum(rec['bwd']):.4f} s")
        # SGD step (momentum, Nesterov, weight decay as configured) per parameter.
        from auxpar.coupling.serial import make_sgd

        class _Cfg:
            optim = optim_cfg

        params = list(net.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make_sgd(params, _Cfg)
        prof.opt_s_per_param = _median_time(opt.step, repeats, device, stat) / sum(p.numel() for p in params)
        net.zero_grad(set_to_none=True)
        net.load_state_dict(saved)
        b = max(batch_sizes)
        prof.aux_s_per_value = _aux_seconds_per_value(tuple(shapes[len(shapes) // 2]), b, repeats, device, stat)
    finally:
        torch.set_num_threads(old_threads)
    return prof


# ---------------------------------------------------------------------------- prediction

@dataclass
class Scenario:
    """What to predict: the cluster (K devices, link) and the methods' settings."""

    batch_size: int
    bandwidth_gbs: float = 10.0
    latency_us: float = 10.0
    ds_factor: int = 1
    microbatches: int = 4
    pipeline_schedule: str = "1f1b"
    phases: str = "parallel:2,serial:1"
    epochs: int = 15
    serial_executor: str = "layer"
    aux_dtype: str = "fp32"
    balance: str = "flops"
    mgrit_levels: int = 2
    mgrit_cfactor: list = field(default_factory=lambda: [2])
    mgrit_fwd_iters: int = 2
    mgrit_bwd_iters: int = 1
    mgrit_relax: str = "FCF"
    dp: int = 1
    """D data-parallel replicas of the K stages (penalty/al: K x D devices; ddp: K*D ranks)."""
    contention: float = 1.0
    """Compute slowdown of every rank of a multi-rank method, against the profile (measured with
    nothing else running): 1.0 for separate devices (one GPU per rank); for ranks that share a
    machine's cores, caches and memory (CPU ranks on one node), ranks / that machine's ceiling for
    so many processes. ``experiments/bench_parallel.py`` measures the 2-process ceiling: 1.82x
    gives 2 / 1.82 = 1.10. Serial (one process) is never slowed."""

    def c(self, nbytes: float) -> float:
        return message_time(nbytes, self.bandwidth_gbs, self.latency_us)


def needed_batch_sizes(sc: Scenario, stages: list[int], methods) -> list[int]:
    """Batch sizes the predictions need: B, B/M (pipeline) and B/K (ddp), where they divide;
    with ``sc.dp = D > 1`` also B/D (penalty/al replicas), (B/D)/M (their pipeline serial
    executor) and B/(K*D) (ddp over K*D devices); the pipeline's B/M is not needed then (it has
    no replicas, its rows are n/a)."""
    B, D = sc.batch_size, sc.dp
    sizes = {B}
    coupled = "penalty" in methods or "al" in methods
    if ("pipeline" in methods and D == 1) or (coupled and sc.serial_executor == "pipeline" and D == 1):
        if B % sc.microbatches == 0:
            sizes.add(B // sc.microbatches)
    if coupled and D > 1 and B % D == 0:
        b = B // D
        sizes.add(b)
        if sc.serial_executor == "pipeline" and b % sc.microbatches == 0:
            sizes.add(b // sc.microbatches)
    if "ddp" in methods:
        sizes.update(B // (K * D) for K in stages if B % (K * D) == 0)
    return sorted(sizes)


def _cut(prof: Profile, K: int, sc: Scenario) -> list[tuple[int, int]]:
    """Block ranges of the K stages, cut as training cuts them (by FLOPs, or by measured time)."""
    from auxpar.models import partition_counts

    if sc.balance == "time":
        t = prof.at(sc.batch_size)
        w = [f + b for f, b in zip(t["fwd"], t["bwd"])]
    else:
        w = list(prof.flops)
    counts = partition_counts((w[0], w[1:-1], w[-1]), K)
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges


class _Stages:
    """Per-stage sums of the profile for one cut."""

    def __init__(self, prof: Profile, ranges: list[tuple[int, int]]):
        self.prof, self.ranges, self.K = prof, ranges, len(ranges)
        n = prof.num_blocks
        self.parts = []
        for k, (a, b) in enumerate(ranges):
            p = list(range(a + 1, b + 1))  # block j is part j + 1
            if k == 0:
                p = [0, *p]
            if k == self.K - 1:
                p = [*p, n + 1]
            self.parts.append(p)
        # values per sample entering stage k (k = 1..K-1): the state after block ranges[k-1][1] - 1
        self.v = [0] + [prof.boundary_values[ranges[k - 1][1]] for k in range(1, self.K)]
        self.params = [sum(prof.params[j] for j in p) for p in self.parts]

    def sum(self, batch: int, key: str) -> list[float]:
        t = self.prof.at(batch)[key]
        return [sum(t[j] for j in p) for p in self.parts]

    def fb(self, batch: int) -> list[float]:
        return [f + b for f, b in zip(self.sum(batch, "fwd"), self.sum(batch, "bwd"))]

    def opt(self) -> list[float]:
        return [self.prof.opt_s_per_param * p for p in self.params]


def _serial_step(prof: Profile, batch: int) -> float:
    t = prof.at(batch)
    return sum(t["fwd"]) + sum(t["bwd"]) + prof.opt_s_per_param * sum(prof.params)


def predict_serial(prof: Profile, sc: Scenario) -> dict:
    B = sc.batch_size
    S = prof.train_samples // B
    step = _serial_step(prof, B)
    return {"step_s": step, "epoch_s": S * (step + prof.load(B, True)), "comm_bytes_per_step": 0,
            "idle_fraction": 0.0}


def predict_ddp(prof: Profile, K: int, sc: Scenario) -> dict:
    B = sc.batch_size
    if B % K:
        raise ConfigError(f"batch {B} does not split over {K} DDP ranks")
    b = B // K
    S = prof.train_samples // B
    P = sum(prof.params)
    ar = ring_allreduce_time(4 * P, K, sc.bandwidth_gbs, sc.latency_us)
    step = _serial_step(prof, b) + ar + small_allreduce_time(K, sc.latency_us)
    return {"step_s": step, "epoch_s": S * (step + prof.load(b, True)),
            "comm_bytes_per_step": int(round(2 * (K - 1) / K * 4 * P)), "idle_fraction": ar / step}


def _pipeline(st: _Stages, sc: Scenario, batch: int | None = None, ranks: int | None = None
              ) -> tuple[float, int, float]:
    """(step seconds, max bytes sent per rank per step, compute-idle fraction of the slowest rank)
    of one pipeline over ``batch`` samples (default the scenario's B); the NaN guard spans
    ``ranks`` ranks (default the K stages)."""
    from auxpar.coupling.pipeline import pipeline_problems

    B, M, K = batch or sc.batch_size, sc.microbatches, st.K
    problem = pipeline_problems(B, M, sc.pipeline_schedule, K, "pipeline", schedule_flag="--pipeline-schedule")
    if problem:
        raise ConfigError(problem)
    m = B // M
    t = st.fb(m)
    link = [4 * m * st.v[k] for k in range(1, K)]
    opt = max(st.opt())
    step = pipeline_step_time(t, link, M, sc.bandwidth_gbs, sc.latency_us, opt) + small_allreduce_time(
        ranks or K, sc.latency_us)
    sent = max(M * ((link[k] if k < K - 1 else 0) + (link[k - 1] if k > 0 else 0)) for k in range(K))
    busy = max(M * t[k] for k in range(K)) + opt
    return step, int(sent), 1.0 - busy / step


def predict_pipeline(prof: Profile, K: int, sc: Scenario) -> dict:
    st = _Stages(prof, _cut(prof, K, sc))
    step, sent, idle = _pipeline(st, sc)
    B = sc.batch_size
    S = prof.train_samples // B
    return {"step_s": step, "epoch_s": S * (step + prof.load(B, True)), "comm_bytes_per_step": sent,
            "idle_fraction": idle, "bubble_fraction": bubble_fraction(K, sc.microbatches)}


def _ds_values(st: _Stages, k: int, s: int) -> float:
    """Values per sample of boundary k after DS with factor s (exact where s divides the
    resolution; where DS rounds an odd size up, e.g. 7x7 -> 4x4 at s = 2, a slight underestimate)."""
    return st.v[k] / (s * s)


def predict_layer_parallel(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    """Penalty / AL on K stages x ``sc.dp`` = D replicas (module docstring): every replica at its
    batch b = B/D, plus each stage's gradient all-reduce over its D replicas where backward does
    not hide it. D = 1 is the plain K-stage prediction (the all-reduce terms are 0)."""
    from auxpar.phases import parse_phases, phase_at

    if K < 2:  # as training refuses it (layer_parallel check_layout); the re-init formula needs a boundary
        raise ConfigError(f"--method {method} couples K >= 2 stages (K = {K})")
    st = _Stages(prof, _cut(prof, K, sc))
    B, s, D = sc.batch_size, sc.ds_factor, sc.dp
    if D < 1:
        raise ConfigError(f"--dp {D} must be >= 1")
    if B % D:
        raise ConfigError(f"batch {B} does not split over --dp {D} replicas (B/D samples each)")
    b = B // D  # samples per replica per step
    S = prof.train_samples // B
    dt = DTYPE_BYTES[sc.aux_dtype]
    fb, opt = st.fb(b), st.opt()
    bwd = st.sum(b, "bwd")
    guard = small_allreduce_time(K * D, sc.latency_us)
    # each stage's gradients, averaged over its D replicas (0 for D = 1)
    ar = [ring_allreduce_time(4 * p, D, sc.bandwidth_gbs, sc.latency_us) for p in st.params]
    ar_bytes = [2 * (D - 1) / D * 4 * p for p in st.params]
    exposed = [exposed_allreduce_time(ar[k], bwd[k]) for k in range(K)]
    # parallel phase: every stage at once
    per_rank, sent = [], []
    for k in range(K):
        vin = _ds_values(st, k, s) if k > 0 else 0.0
        vout = _ds_values(st, k + 1, s) if k < K - 1 else 0.0
        aux = prof.aux_s_per_value * b * (vin + vout)
        send = sc.c(b * vout * dt) + sc.c(b * vin * dt)
        per_rank.append(fb[k] + opt[k] + aux + send + exposed[k])
        sent.append(b * (vin + vout) * dt + ar_bytes[k])
    par_step = max(per_rank) + guard
    # serial phase
    if sc.serial_executor == "pipeline":
        ser_step, _, _ = _pipeline(st, sc, b, K * D)
        if D > 1:  # the reduce hides only behind the backward of the last micro-batch
            mb = st.sum(b // sc.microbatches, "bwd")
            ser_step += max(exposed_allreduce_time(ar[k], mb[k]) for k in range(K))
    else:
        ser_step = sum(fb) + 2 * sum(sc.c(4 * b * st.v[k]) for k in range(1, K)) + max(opt) + guard
        if D > 1:  # stage k's reduce also hides behind the backward of stages k-1 .. 0, which follow
            ser_step += max(exposed_allreduce_time(ar[k], sum(bwd[:k + 1])) for k in range(K))
    # re-initialization: a no-grad forward over the replica's shard, pipelined over its batches
    R = math.ceil(math.ceil(prof.train_samples / D) / b)
    ng = st.sum(b, "fwd_nograd")
    u = [ng[k] + sc.c(b * _ds_values(st, k + 1, s) * dt) + prof.load(b, False) for k in range(K - 1)]
    reinit = sum(u) + (R - 1) * max(u)
    par_epoch = S * (par_step + prof.load(b, False))
    ser_epoch = S * (ser_step + prof.load(b, True))
    phases = parse_phases(sc.phases)
    total, stale, n_reinit, n_par = 0.0, True, 0, 0
    for e in range(sc.epochs):
        if phase_at(phases, e) == "parallel":
            n_par += 1
            if stale:
                total += reinit
                n_reinit += 1
                stale = False
            total += par_epoch
        else:
            stale = True
            total += ser_epoch
    busy = max(fb[k] + opt[k] for k in range(K))
    return {"step_s": par_step, "epoch_s": total / sc.epochs, "comm_bytes_per_step": int(max(sent)),
            "idle_fraction": 1.0 - busy / par_step, "parallel_epoch_s": par_epoch, "serial_epoch_s": ser_epoch,
            "serial_step_s": ser_step, "reinit_s": reinit, "reinits": n_reinit, "parallel_epochs": n_par,
            "dp": D, "devices": K * D, "batch_per_replica": b, "allreduce_s": max(ar),
            "allreduce_exposed_s": max(exposed)}


def predict_mgrit(prof: Profile, K: int, sc: Scenario) -> dict:
    """Cost model of a layer-parallel MGRIT step over the blocks (see the module docstring)."""
    st = _Stages(prof, _cut(prof, K, sc))
    B = sc.batch_size
    S = prof.train_samples // B
    n = prof.num_blocks
    L = sc.mgrit_levels
    cf = list(sc.mgrit_cfactor)
    cf = (cf * (L - 1))[: L - 1] if len(cf) == 1 else cf
    t = prof.at(B)
    blk = {"f": t["fwd_nograd"][1:n + 1], "b": t["bwd"][1:n + 1]}
    v_mean = sum(prof.boundary_values[1:]) / n
    msg = sc.c(4 * B * v_mean)

    def iteration(kind: str) -> float:
        per_block = blk[kind]
        total, scale = 0.0, 1.0
        for lvl in range(L - 1):
            m = cf[lvl]
            rf = (2 * (m - 1) + 1) / m if sc.mgrit_relax == "FCF" else (m - 1) / m
            rank_work = max(sum(per_block[a:b]) for a, b in st.ranges) / scale
            total += rf * rank_work + (4 if sc.mgrit_relax == "FCF" else 2) * msg
            scale *= m
        total += sum(per_block) / scale + (K - 1) * msg  # coarsest level: serial over all ranks
        return total

    fb = st.fb(B)
    final = max(fb) + 2 * msg  # final F-relaxation forward with graph and its backward
    opt = max(st.opt())
    step = (sc.mgrit_fwd_iters * iteration("f") + sc.mgrit_bwd_iters * iteration("b") + final + opt
            + small_allreduce_time(K, sc.latency_us))
    per_iter_msgs = (L - 1) * (4 if sc.mgrit_relax == "FCF" else 2) + 1
    sent = (sc.mgrit_fwd_iters + sc.mgrit_bwd_iters) * per_iter_msgs * 4 * B * v_mean + 2 * 4 * B * v_mean
    return {"step_s": step, "epoch_s": S * (step + prof.load(B, True)), "comm_bytes_per_step": int(sent),
            "idle_fraction": 1.0 - max(fb) / step}


# The registered predictors (auxpar.registry: perf="auxpar.perfmodel:perf_..."): each takes
# (prof, K, sc, method) and returns {"step_s", "epoch_s", "comm_bytes_per_step", "idle_fraction",
# "note", "dp", "devices", ...}; a ConfigError means "not applicable here" and becomes an n/a row.
# With sc.dp = D > 1 a predictor that models the replicas returns "dp": D; predict() turns any
# other answer into an n/a row.

def perf_serial(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    return predict_serial(prof, sc)


def perf_ddp(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    """DDP on the devices of the K x D mesh: K*D ranks at B/(K*D) (K ranks when D = 1)."""
    D = sc.dp
    if D == 1:
        return dict(predict_ddp(prof, K, sc), dp=1, devices=K)
    n = K * D
    res = predict_ddp(prof, n, sc)
    b = sc.batch_size // n
    ar = ring_allreduce_time(4 * sum(prof.params), n, sc.bandwidth_gbs, sc.latency_us)
    exposed = exposed_allreduce_time(ar, sum(prof.at(b)["bwd"]))
    # The same overlap assumption as the K x D rows (both average gradients with DDP's bucketed
    # all-reduce during backward), so the comparison favours neither side.
    step = res["step_s"] - ar + exposed
    S = prof.train_samples // sc.batch_size
    return dict(res, step_s=step, epoch_s=S * (step + prof.load(b, True)), idle_fraction=exposed / step,
                dp=D, devices=n, allreduce_s=ar, allreduce_exposed_s=exposed, note=(
                    f"plain DDP over all {n} devices at batch {b}; all-reduce {1000 * ar:.2f} ms overlapped with "
                    f"backward as in the {K}x{D} rows, {1000 * exposed:.2f} ms exposed"))


def perf_pipeline(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    if sc.dp > 1:
        raise ConfigError(f"--method pipeline has no data-parallel replicas (--dp {sc.dp}); predict it with --dp 1")
    return dict(predict_pipeline(prof, K, sc), note=f"{sc.pipeline_schedule} M={sc.microbatches}",
                dp=1, devices=K)


def perf_coupled(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    if sc.ds_factor > 1:
        from auxpar.coupling.ds import rounds_up
        from auxpar.models import build_model

        try:
            with torch.device("meta"):
                net = build_model(prof.model, in_channels=prof.input_shape[0], input_size=prof.input_shape[1],
                                  num_classes=prof.num_classes)
            shapes = net.boundary_shapes()
        except ConfigError:  # a hand-made profile of no buildable model: no shapes to check
            shapes = None
        st = _Stages(prof, _cut(prof, K, sc))
        if shapes is not None and not rounds_up(sc.ds_factor) and any(
                any(d % sc.ds_factor for d in shapes[st.ranges[k - 1][1]][1:]) for k in range(1, K)):
            raise ConfigError(f"--ds-factor {sc.ds_factor} does not divide a boundary resolution")
    res = predict_layer_parallel(prof, K, sc, method)
    note = f"ds={sc.ds_factor} phases={sc.phases} ({res['reinits']} re-init)"
    if sc.dp > 1:
        note += (f"; {sc.dp} replicas at batch {res['batch_per_replica']}, grad all-reduce "
                 f"{1000 * res['allreduce_s']:.2f} ms, {1000 * res['allreduce_exposed_s']:.2f} ms exposed")
    return dict(res, note=note)


def perf_mgrit(prof: Profile, K: int, sc: Scenario, method: str) -> dict:
    if sc.dp > 1:
        raise ConfigError(f"mgrit with --dp {sc.dp} is not modelled (the MGRIT cost model covers one replica); "
                          "predict it with --dp 1")
    return dict(predict_mgrit(prof, K, sc), dp=1, devices=K,
                note=(f"L={sc.mgrit_levels} m={','.join(map(str, sc.mgrit_cfactor))} "
                      f"iters={sc.mgrit_fwd_iters}/{sc.mgrit_bwd_iters} (unvalidated)"))


def check_contention(factor: float) -> float:
    """``Scenario.contention`` if it is a slowdown (>= 1), else a ConfigError naming the fix."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1.0):
        raise ConfigError(f"--contention {factor}: the compute slowdown of ranks that share a machine must be "
                          ">= 1 (1 = separate devices; CPU ranks on one node: ranks / the measured ceiling, "
                          "e.g. 2 / 1.82 = 1.10 from experiments/bench_parallel.py)")
    return float(factor)


def predict(prof: Profile, method: str, K: int, sc: Scenario) -> dict:
    """One prediction row; ``speedup`` is against the serial epoch time of the same profile (one
    device, batch B). The method's predictor is the one it registered (:mod:`auxpar.registry`).
    With ``sc.dp = D > 1`` a predictor must model the replicas and say so by returning
    ``"dp": D`` (and its ``"devices"``); one that does not gives an n/a row, never a silent D = 1."""
    info = registry.method(method)  # an unknown name is an error that lists the methods
    base = predict_serial(prof, sc)
    single = info.layout == "single"
    D = 1 if single else sc.dp
    row = {"method": method, "K": K, "dp": D, "devices": 1 if single else K * D, "note": ""}
    # every rank of a multi-rank method computes at the shared machine's pace (a bad factor is the
    # scenario's error, not this row's: it raises)
    ranks = prof if single else prof.slowed(check_contention(sc.contention))
    try:
        if not info.perf:
            raise ConfigError(f"no performance model for --method {method}")
        res = registry.load_target(info.perf, f"performance model of {method!r}")(ranks, K, sc, method)
        if D > 1 and res.get("dp") != D:  # a predictor that ignores sc.dp would predict D = 1
            raise ConfigError(f"the performance model of --method {method} does not model --dp {D} "
                              "(it predicts one replica only)")
    except ConfigError as exc:
        row.update(step_s=None, epoch_s=None, speedup=None, comm_bytes_per_step=None, idle_fraction=None,
                   note=f"n/a: {exc}")
        return row
    row.update(res)
    row["speedup"] = base["epoch_s"] / res["epoch_s"]
    return row


def profile_warnings(prof: Profile) -> list[str]:
    """Signs of a disturbed profile: a larger batch measured faster than a smaller one (on a busy
    machine, or with more torch threads than free cores, timings jump by integer factors)."""
    sizes = sorted(int(b) for b in prof.times)
    total = {b: sum(prof.times[str(b)]["fwd"]) + sum(prof.times[str(b)]["bwd"]) for b in sizes}
    out = []
    for small, big in zip(sizes, sizes[1:]):
        if total[big] < 0.9 * total[small]:
            out.append(f"batch {big} was measured faster than batch {small} ({total[big]:.4g} s < "
                       f"{total[small]:.4g} s): the profile looks disturbed (a busy machine, or more threads "
                       "than free cores); rerun with --threads 1, more --repeats, or --timing min")
    return out


def predict_all(prof: Profile, methods, stages: list[int], sc: Scenario) -> list[dict]:
    rows = [predict(prof, "serial", 1, sc)] if "serial" in methods else []
    for K in stages:
        rows += [predict(prof, m, K, sc) for m in methods if registry.method(m).layout != "single"]
    return rows


# ---------------------------------------------------------------------------- output

COLUMNS = ("method", "K", "step_s", "epoch_s", "speedup", "comm_bytes_per_step", "idle_fraction", "note")
DP_COLUMNS = ("method", "K", "dp", "devices", "step_s", "epoch_s", "speedup", "comm_bytes_per_step",
              "idle_fraction", "note")
"""The columns with data-parallel replicas (any row with dp > 1); without, COLUMNS as before."""


def _has_dp(rows: list[dict]) -> bool:
    return any(r.get("dp", 1) > 1 for r in rows)


def _mesh(r: dict) -> str:
    """K x D of a row ("4x2"), or K alone where D = 1."""
    d = r.get("dp", 1)
    return f"{r['K']}x{d}" if d > 1 else str(r["K"])


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    if key == "step_s":
        return f"{1000 * v:.2f} ms"
    if key == "epoch_s":
        return f"{v:.2f} s"
    if key == "speedup":
        return f"{v:.2f}x"
    if key == "comm_bytes_per_step":
        return f"{v / 1e6:.3f} MB"
    if key == "idle_fraction":
        return f"{100 * v:.0f}%"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The table; with replicas (dp > 1) the K column shows K x D and a devices column follows."""
    if _has_dp(rows):
        head = ["method", "K x D", "devices", "step", "epoch", "speedup", "sent/step/rank", "idle", "note"]
        cells = [[r["method"], _mesh(r), str(r.get("devices", r["K"])),
                  *(_fmt(r.get(k), k) for k in COLUMNS[2:])] for r in rows]
    else:
        head = ["method", "K", "step", "epoch", "speedup", "sent/step/rank", "idle", "note"]
        cells = [[_fmt(r.get(k), k) for k in COLUMNS] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        lines.append("| " + " | ".join(c) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, prof: Profile, sc: Scenario, rows: list[dict], stages: list[int],
                  plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    from auxpar import checkpoint

    header = (f"# Predicted epoch time: {prof.model} on {prof.dataset}, batch {sc.batch_size}\n\n"
              f"Profiled on {prof.device} ({prof.threads} thread(s), torch {prof.torch_version}, {prof.date}); "
              f"link {sc.bandwidth_gbs:g} GB/s, {sc.latency_us:g} us; {sc.epochs} epochs; "
              f"step = parallel-phase step for penalty/al; epoch = mean over the run incl. SPH and re-init; "
              f"sent = bytes the busiest rank sends per step; idle = share of the step the slowest rank "
              f"does not compute (communication, waiting, pipeline bubble).\n\n")
    if sc.contention != 1.0:
        header += (f"Contention {sc.contention:g}: every rank of a multi-rank method computes {sc.contention:g}x "
                   f"slower than the profile (ranks sharing one machine); serial runs alone at the profile's "
                   f"speed.\n\n")
    if _has_dp(rows):
        header += (f"K x D = K stages x D = {sc.dp} data-parallel replicas on K*D devices: penalty/al replicas run "
                   f"batch B/D each and average each stage's gradients over D (ring all-reduce, overlapped "
                   f"with backward: only max(0, all-reduce - backward) counts); ddp = plain DDP over all K*D "
                   f"devices at B/(K*D), its all-reduce overlapped the same way. Speedup is against "
                   f"serial on one device at batch B.\n\n")
    md = header + markdown_table(rows) + "\n"
    warn = profile_warnings(prof)
    if warn:
        md += "\n" + "\n".join(f"**Warning:** {w}" for w in warn) + "\n"
    files = [out / "perf.md", out / "perf.csv", out / "perf.json"]
    checkpoint.write_text(md, files[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=DP_COLUMNS if _has_dp(rows) else COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    checkpoint.write_text(buf.getvalue(), files[1])
    checkpoint.write_json({"scenario": asdict(sc), "stages": stages, "rows": rows, "profile": prof.to_json()},
                          files[2])
    if plot:
        files.append(plot_speedup(rows, out / "perf.png", prof, sc))
    return files


def plot_speedup(rows: list[dict], path: Path, prof: Profile, sc: Scenario) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'auxpar[plot]', or pass --no-plot") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "serial"]
    # x = devices (K, or K*D with replicas: penalty/al K x D and ddp on K*D devices share a point)
    mesh = {r.get("devices", r["K"]): _mesh(r) for r in rows if r["method"] != "serial"}
    Ks = sorted(mesh)
    dp = _has_dp(rows)
    for m in methods:
        pts = [(r.get("devices", r["K"]), r["speedup"], r["epoch_s"]) for r in rows
               if r["method"] == m and r["speedup"]]
        if not pts:
            continue
        style = dict(marker="o", label=m, ls="--" if m == "al" else "-")  # al costs what penalty costs
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    serial = [r for r in rows if r["method"] == "serial"]
    if Ks:
        ax1.plot(Ks, Ks, "k--", lw=0.8, label="ideal (devices)" if dp else "ideal (K)")
        if serial:
            ax2.axhline(serial[0]["epoch_s"], color="k", ls=":", lw=0.8, label="serial")
    xlabel = "devices (K x D)" if dp else "K (devices)"
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("predicted speedup vs serial")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("predicted epoch time [s]")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ks or [1])
        ax.set_xticklabels([(f"{k}\n({mesh[k]})" if dp else str(k)) for k in (Ks or [1])])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{prof.model} on {prof.dataset}, batch {sc.batch_size}, "
                 f"{f'D = {sc.dp} replicas, ' if dp else ''}{sc.bandwidth_gbs:g} GB/s, "
                 f"{sc.latency_us:g} us (profiled on {prof.device})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 2,4,8") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers, e.g. 2,4,8")
    return vals


def add_parser(sub) -> None:
    p = sub.add_parser(
        "model-perf", help="profile the model here and predict each method's epoch time and speedup at K devices",
        description="Profile per-block forward/backward times and boundary sizes on this device, then predict "
                    "epoch time and speedup vs serial of serial, ddp, pipeline, penalty, al and mgrit for K "
                    "devices at a given link bandwidth and latency. Writes perf.md, perf.csv, perf.json and "
                    "perf.png.")
    p.add_argument("--model", default=None, help="model name (default: resnet20)")
    p.add_argument("--dataset", choices=registry.dataset_names(),
                   default=None)
    p.add_argument("--batch-size", type=int, help="global batch size (default: the dataset recipe's)")
    p.add_argument("--stages", type=_int_list, default=[2, 4, 8], metavar="K[,K...]", help="device counts (2,4,8)")
    p.add_argument("--bandwidth", type=float, default=10.0, metavar="GB/s", help="link bandwidth (default 10)")
    p.add_argument("--latency", type=float, default=10.0, metavar="US", help="link latency in microseconds (10)")
    p.add_argument("--ds-factor", type=int, default=1, help="DS factor of penalty/al boundaries")
    p.add_argument("--microbatches", type=int, default=4, help="pipeline micro-batches per batch")
    p.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], default="1f1b",
                   help="pipeline schedule of --method pipeline (and of the pipeline serial executor)")
    p.add_argument("--phases", default=None, metavar="PHASES",
                   help="penalty/al SPH phases (default: coupling.phases's default)")
    p.add_argument("--serial-executor", choices=["layer", "pipeline"], default="layer")
    p.add_argument("--aux-dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    p.add_argument("--epochs", type=int, help="epochs of the run (default: the dataset recipe's)")
    p.add_argument("--methods", default=",".join(registry.method_names()),
                   help=f"subset of {','.join(registry.method_names())}")
    p.add_argument("--balance", choices=["flops", "time"], default="flops", help="how stages are cut")
    p.add_argument("--dp", type=int, default=1, metavar="D",
                   help="data-parallel replicas of the K stages: penalty/al on K x D devices (batch B/D per "
                        "replica, per-stage gradient all-reduce overlapped with backward) next to ddp on K*D "
                        "devices (default 1; mgrit and pipeline are not modelled with D > 1)")
    p.add_argument("--contention", type=float, default=1.0, metavar="F",
                   help="compute slowdown of each rank when all ranks share one machine's cores and memory "
                        "(default 1: separate devices, e.g. one GPU each); for CPU ranks on one node, ranks / "
                        "the node's measured ceiling, e.g. 2 / 1.82 = 1.10 from experiments/bench_parallel.py")
    p.add_argument("--norm", choices=["bn", "none"], default="bn")
    p.add_argument("--mgrit-levels", type=int, default=2)
    p.add_argument("--mgrit-cfactor", type=_int_list, default=[2], metavar="M[,M...]")
    p.add_argument("--mgrit-fwd-iters", type=int, default=2)
    p.add_argument("--mgrit-bwd-iters", type=int, default=1)
    p.add_argument("--mgrit-relax", choices=["F", "FCF"], default="FCF")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads while profiling (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--timing", choices=["median", "min"], default="median",
                   help="statistic of the repetitions; min estimates an idle machine's times on a busy one")
    p.add_argument("--profile", metavar="perf.json", help="reuse the profile of an earlier run instead of profiling")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/model-perf-MODEL-DATASET)")
    p.add_argument("--no-plot", action="store_true", help="skip perf.png")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="dataset geometry and optimizer settings, e.g. --set data.synthetic_shape=[3,32,32]")
    p.set_defaults(func=run)


def scenario_from_args(args, cfg) -> Scenario:
    if args.bandwidth <= 0:
        raise ConfigError(f"--bandwidth {args.bandwidth} must be > 0 (GB/s)")
    if args.latency < 0:
        raise ConfigError(f"--latency {args.latency} must be >= 0 (microseconds)")
    dp = getattr(args, "dp", 1)
    for name, v in (("--dp", dp), ("--ds-factor", args.ds_factor), ("--microbatches", args.microbatches),
                    ("--repeats", args.repeats), ("--mgrit-levels", args.mgrit_levels),
                    ("--mgrit-fwd-iters", args.mgrit_fwd_iters), ("--mgrit-bwd-iters", args.mgrit_bwd_iters)):
        if v < 1:
            raise ConfigError(f"{name} {v} must be >= 1")
    if any(m < 2 for m in args.mgrit_cfactor):
        raise ConfigError(f"--mgrit-cfactor {args.mgrit_cfactor}: coarsening factors are >= 2")
    contention = check_contention(getattr(args, "contention", 1.0))
    from auxpar.phases import parse_phases

    phases = args.phases or cfg.coupling.phases
    parse_phases(phases)
    return Scenario(batch_size=cfg.data.batch_size, bandwidth_gbs=args.bandwidth, latency_us=args.latency,
                    ds_factor=args.ds_factor, microbatches=args.microbatches, pipeline_schedule=args.pipeline_schedule, phases=phases,
                    epochs=cfg.run.epochs, serial_executor=args.serial_executor, aux_dtype=args.aux_dtype,
                    balance=args.balance, mgrit_levels=args.mgrit_levels, mgrit_cfactor=list(args.mgrit_cfactor),
                    mgrit_fwd_iters=args.mgrit_fwd_iters, mgrit_bwd_iters=args.mgrit_bwd_iters,
                    mgrit_relax=args.mgrit_relax, dp=dp, contention=contention)


def run(args) -> int:
    from auxpar.config import build_config, parse_value, set_dotted
    from auxpar.distributed import pick_device
    from auxpar.models import parse_model_name

    over: dict = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, "
                              "e.g. --set data.synthetic_num_train=4096")
        k, v = item.split("=", 1)
        set_dotted(over, k.strip(), parse_value(v.strip()))
    if args.model:
        over.setdefault("model", {})["name"] = args.model
    if args.dataset:
        over.setdefault("data", {})["dataset"] = args.dataset
    if args.batch_size is not None:
        over.setdefault("data", {})["batch_size"] = args.batch_size
    if args.epochs is not None:
        over.setdefault("run", {})["epochs"] = args.epochs
    cfg = build_config({}, over, source="model-perf")
    if ":" not in cfg.model.name:  # package.module:factory is checked when it is built
        parse_model_name(cfg.model.name)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in registry.method_names()]
    if bad or not methods:
        raise ConfigError(f"--methods {args.methods!r}: choose from {', '.join(registry.method_names())}")
    sc = scenario_from_args(args, cfg)
    stages = sorted(set(args.stages))
    out = Path(args.out) if args.out else Path("runs") / f"model-perf-{cfg.model.name}-{cfg.data.dataset}"

    if args.profile:
        path = Path(args.profile)
        try:
            data = json.loads(path.read_text())
            prof = Profile.from_json(data.get("profile", data))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"--profile {path}: not a perf.json written by auxpar model-perf ({exc})") from None
        for b in needed_batch_sizes(sc, stages, methods):
            prof.at(b)
    else:
        device = pick_device(args.device, 0)
        sizes = needed_batch_sizes(sc, stages, methods)
        print(f"auxpar: profiling {cfg.model.name} on {device} at batch size(s) {', '.join(map(str, sizes))}",
              flush=True)
        prof = profile_model(cfg.model.name, cfg.data.dataset, sizes, data_cfg=cfg.data, norm=args.norm,
                             device=device, repeats=args.repeats, threads=args.threads, optim_cfg=cfg.optim,
                             stat=args.timing,
                             progress=lambda msg: print(f"auxpar: {msg}", flush=True))
    rows = predict_all(prof, methods, stages, sc)
    files = write_outputs(out, prof, sc, rows, stages, plot=not args.no_plot)
    print(markdown_table(rows))
    for w in profile_warnings(prof):
        print(f"auxpar: warning: {w}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
