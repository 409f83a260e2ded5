"""Typed run configuration: dataclasses, TOML loading, flag overrides, validation.

A run is described by one :class:`Config`, made of sections that mirror the TOML file::

    [run]    method, seed, epochs, out, threads, eval_every, log_every, precision, channels_last
    [model]  name, dropout, norm
    [data]   dataset, data_dir, batch_size, augment, crop_pad, pad_mode, flip, synthetic_*
    [optim]  lr, momentum, nesterov, weight_decay, lr_schedule, milestones, gamma, min_lr
    [dist]   stages, split, nproc, backend, device, timeout_s
    [coupling] rho, rho_growth, rho_max, aux_update, aux_lr, ds_factor, ds_mode, upsample,
             aux_dtype, aux_device, phases, mu_reset, mu_damping, serial_executor
    [mgrit]  levels, cfactor, fwd_iters, bwd_iters, tol, relax, ..., phases

Precedence: dataclass defaults < dataset recipe defaults (e.g. digits turns flipping off)
< the TOML file < command-line flags. ``Config.resolved()`` returns the plain dict that is
written to the run directory as ``config.toml``, so a run can always be reproduced with
``auxpar train --config RUN/config.toml``.

Validation happens here, at construction, and every message names the key and the fix:
unknown keys, wrong types, values out of range. Checks that need the model or the world size
(split vs blocks, stages vs world size) happen where those are known and raise the same
:class:`~auxpar.errors.ConfigError`.

Later methods add their own section (e.g. ``[coupling]``, ``[mgrit]``) by adding a dataclass
field to :class:`Config`; loading, overrides and validation pick it up without other changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from auxpar import registry
from auxpar.errors import ConfigError
from auxpar.phases import parse_phases

SCHEDULES = ("constant", "step", "multistep", "cosine")

RENAMED = {
    "optim.schedule": "optim.lr_schedule",
    "coupling.schedule": "coupling.phases",
    "mgrit.schedule": "mgrit.phases",
}
"""Keys that were renamed so that each name has one meaning ("schedule" meant the lr schedule,
the SPH phases and the pipeline schedule): an old key is an error that names the new one."""


@dataclass
class RunConfig:
    method: str = "serial"
    """A registered method (auxpar.registry): serial (backprop in one process, the baseline), ddp,
    pipeline, penalty, al, mgrit, or one a plugin registers."""
    plugins: list = field(default_factory=list)
    """Modules to import before anything else (they register methods or datasets), e.g.
    ["my_plugin"]; also --plugin and $AUXPAR_PLUGINS."""
    seed: int = 0
    epochs: int = 10
    max_steps: int = 0
    """0 = every step of run.epochs; N > 0 = at most N training steps: the run stops within its
    last epoch, and the lr schedule spans those N steps (a cosine reaches its floor at step N).
    The study's equal-time runs with equal_time_round = "step" use it: serial given exactly a
    layer-parallel run's training time, not the whole epochs that fit into it."""
    out: str = ""
    """Run directory; empty means runs/<method>-<model>-<dataset>-s<seed>."""
    threads: int = 0
    """torch intra-op threads per process; 0 leaves torch's default (or 1 per rank under --nproc)."""
    eval_every: int = 1
    """Evaluate on the test set every N epochs (and always after the last one)."""
    log_every: int = 0
    """Write a step record to metrics.jsonl every N steps; 0 = only per-epoch records."""
    progress: str = "auto"
    """Progress bar: auto (on when stderr is a TTY), on, off."""
    checkpoint_every: str = ""
    """Checkpoint cadence: "" or "0" = off; "N" or "Ne" = every N epochs; "Ns" = every N steps."""
    keep: int = 2
    """Complete checkpoints kept in RUN/checkpoints (older ones are deleted); at least 2."""
    resume: str = ""
    """"" = start fresh; "latest" = the latest complete checkpoint of the run directory; or a
    checkpoint directory. Under torchrun restarts the latest checkpoint is always resumed."""
    on_nan: str = "stop"
    """Non-finite loss on any rank (checked across all ranks before the optimizer step): stop
    (all ranks exit with one message naming rank, stage and step) or skip (drop that step);
    off = no per-step check (no all-reduce and host read per step), only the epoch-end check,
    which stops after the fact (parameters are then already damaged)."""
    precision: str = "fp32"
    """Compute precision of forwards (and losses): fp32 (default: no autocast, unchanged), bf16
    or fp16 = forward under torch.autocast(device, dtype). Parameters, gradients, optimizer
    state, losses/penalties and the tensors sent between ranks stay fp32; aux states and their
    messages keep coupling.aux_dtype (fp32 by default, also under bf16/fp16). fp16 adds one
    GradScaler per rank; a step that overflows on any rank is skipped on every rank and the
    scale backs off (auxpar/precision.py). fp16 is not available for --method mgrit (use bf16);
    on CPU fp16 runs (torch autocasts CPU to fp16) but far slower than fp32/bf16 (digits
    ResNet-20: 57 s vs 1.6 s for 6 epochs). Evaluation is always fp32."""
    channels_last: bool = False
    """Convert the model/stages and their 4-D inputs to torch.channels_last memory format."""
    host_memory: str = "keep"
    """keep: freed CPU tensor memory stays in the process and is reused (glibc mallopt), so the
    hot loop takes no page faults for its activation buffers; release: glibc's defaults, which
    give large freed blocks back to the kernel (auxpar/hostmem.py, experiments/bench_hostmem.py)."""

    def validate(self) -> None:
        registry.load_plugins(self.plugins)
        if self.method not in registry.method_names():
            raise ConfigError(
                f"run.method = {self.method!r} is not a known method; choose one of "
                f"{', '.join(registry.method_names())} (or load the plugin that registers it: run.plugins)"
            )
        _positive("run.epochs", self.epochs)
        _nonneg("run.max_steps", self.max_steps)
        _nonneg("run.threads", self.threads)
        _positive("run.eval_every", self.eval_every)
        _nonneg("run.log_every", self.log_every)
        _choice("run.progress", self.progress, ("auto", "on", "off"))
        parse_every(self.checkpoint_every)
        if self.keep < 2:
            raise ConfigError(f"run.keep = {self.keep} must be >= 2, so that a crash while writing a "
                              "checkpoint always leaves a complete previous one")
        _choice("run.on_nan", self.on_nan, ("stop", "skip", "off"))
        _choice("run.precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("run.host_memory", self.host_memory, ("keep", "release"))


@dataclass
class ModelConfig:
    name: str = "resnet20"
    """resnet<6n+2>, preact-resnet<6n+2>, wrn-<6n+4>-<k> (e.g. resnet56, wrn-28-10), or your own
    network as package.module:factory (README, "Your own network and data")."""
    dropout: float = 0.0
    """Dropout between the convolutions of WRN blocks (WRN only)."""
    norm: str = "bn"
    """bn: BatchNorm (default); none: no normalization (exact-equality tests)."""
    split_blocks: list = field(default_factory=list)
    """Blocks to cut in two units (after their first convolution), so that a stage boundary can
    fall inside them: a finer balance than whole blocks. The net computes the same function with
    the same parameters; --split and the plan then count units (each listed block is two). E.g.
    [3] with --split 4,6 at K = 2 on ResNet-20 puts the first half of block 3 on stage 0."""

    def validate(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout = {self.dropout} must be in [0, 1)")
        _choice("model.norm", self.norm, ("bn", "none"))
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.split_blocks):
            raise ConfigError(f"model.split_blocks = {self.split_blocks!r}: give block indices (whole numbers "
                              ">= 0), e.g. [3]")
        if len(set(self.split_blocks)) != len(self.split_blocks):
            raise ConfigError(f"model.split_blocks = {self.split_blocks!r} names a block twice")


@dataclass
class DataConfig:
    dataset: str = "digits"
    """A registered dataset (auxpar.registry): cifar10, cifar100, digits, fashion-mnist, synthetic,
    or one a plugin registers."""
    data_dir: str = "data"
    download: bool = True
    batch_size: int = 128
    """Global batch size (DDP splits it across ranks)."""
    eval_batch_size: int = 512
    augment: bool = True
    """Random crop + flip during training (phases that use aux states switch it off)."""
    crop_pad: int = -1
    """Padding of the random crop in pixels; -1 = the dataset's default (4 for CIFAR, 1 for digits)."""
    pad_mode: str = "auto"
    """reflect or zero; auto = the dataset's default."""
    flip: str = "auto"
    """Horizontal flip: on, off, or auto (on for CIFAR, off for digits)."""
    synthetic_num_train: int = 1024
    synthetic_num_test: int = 256
    synthetic_shape: list = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10
    train_subset: int = 0
    """Train on a fixed class-stratified subset of this many training samples (0 = all). The
    subset depends only on the dataset and N (a constant seed, not run.seed), so every run
    seed and method sees the same samples; the test set is never reduced."""
    strata: int = 0
    """Split the training ids into this many fixed classes (``id % strata``), each shuffled on
    its own, and take ``batch_size / strata`` ids of each per batch (auxpar/data/loader.py).
    0 = the method's choice: ``dist.dp`` for penalty/AL (replica d owns the samples
    ``id % dp == d`` and keeps their aux states), 1 (one plain shuffle) for every other method.
    Set it on a one-replica run to see exactly the global batches of a ``--dp`` run."""

    def validate(self) -> None:
        _choice("data.dataset", self.dataset, registry.dataset_names())
        _nonneg("data.train_subset", self.train_subset)
        _nonneg("data.strata", self.strata)
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        if self.crop_pad < -1:
            raise ConfigError(f"data.crop_pad = {self.crop_pad} must be >= 0 (or -1 for the dataset default)")
        _choice("data.pad_mode", self.pad_mode, ("auto", "reflect", "zero"))
        _choice("data.flip", self.flip, ("auto", "on", "off"))
        _positive("data.synthetic_num_train", self.synthetic_num_train)
        _positive("data.synthetic_num_test", self.synthetic_num_test)
        _positive("data.synthetic_classes", self.synthetic_classes)
        shape = self.synthetic_shape
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ConfigError(
                f"data.synthetic_shape = {shape!r} must be three positive integers [C, H, W], e.g. [3, 32, 32]"
            )


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    """constant, step (x gamma every step_size epochs), multistep (x gamma at milestones), cosine."""
    milestones: list = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    step_size: int = 30
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    warmup_epochs: int = 0
    """Linear warm-up from lr/10 over this many epochs (counted in steps)."""
    grad_clip: float = 0.0
    """Clip the whole network's gradient to this global 2-norm before each optimizer step; 0 = off
    (no norm computed, no collective). The norm is what torch.nn.utils.clip_grad_norm_ of the
    whole network computes in serial training, for every method: ranks holding different stages
    add their squared norms (one float64 all-reduce over the stages; data-parallel replicas count
    once), and for penalty/AL the gradient is the concatenation of every stage's gradient of its
    own local objective. See auxpar/coupling/optim.py."""

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum = {self.momentum} must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov = true needs optim.momentum > 0; set momentum (e.g. 0.9) or nesterov = false")
        _nonneg("optim.weight_decay", self.weight_decay)
        _choice("optim.lr_schedule", self.lr_schedule, SCHEDULES)
        if any((not isinstance(m, int)) or m <= 0 for m in self.milestones):
            raise ConfigError(f"optim.milestones = {self.milestones!r} must be positive integer epochs, e.g. [60, 120, 160]")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"optim.milestones = {self.milestones!r} must be increasing")
        _positive("optim.gamma", self.gamma)
        _positive("optim.step_size", self.step_size)
        _nonneg("optim.min_lr", self.min_lr)
        _nonneg("optim.warmup_epochs", self.warmup_epochs)
        _nonneg("optim.grad_clip", self.grad_clip)


@dataclass
class DistConfig:
    stages: int = 1
    """K: number of layer-parallel stages (one per rank for layer-parallel methods)."""
    split: list = field(default_factory=list)
    """Explicit blocks per stage, e.g. [4, 4, 4]; empty = balance by estimated FLOPs."""
    balance: str = "flops"
    """How the default cut balances stages: flops (estimated forward FLOPs at the input shape)
    or time (rank 0 measures each block's forward+backward at the batch size on the device and
    broadcasts the cut). Ignored when split is given."""
    nproc: int = 1
    """Start this many local worker processes (no torchrun needed). Ignored under torchrun."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), gloo or nccl."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    timeout_s: float = 300.0
    """Collective / point-to-point timeout: a dead peer ends the job instead of hanging it."""
    dp: int = 1
    """Data-parallel replicas of the layer-parallel group (penalty, al, mgrit): world = stages *
    dp, rank = d * stages + k (auxpar/mesh.py). The batch size is global: B / dp per replica."""
    microbatches: int = 4
    """Pipeline baseline (and the pipeline serial executor): micro-batches per batch."""
    pipeline_schedule: str = "1f1b"
    """Pipeline baseline schedule: gpipe or 1f1b (torch.distributed.pipelining)."""

    def validate(self) -> None:
        _positive("dist.stages", self.stages)
        _positive("dist.nproc", self.nproc)
        if any((not isinstance(c, int)) or c <= 0 for c in self.split):
            raise ConfigError(f"dist.split = {self.split!r}: every stage needs a positive whole number of blocks, e.g. 4,4,4")
        if self.split and len(self.split) != self.stages:
            raise ConfigError(
                f"dist.split has {len(self.split)} entries but dist.stages = {self.stages}; "
                f"give one block count per stage or drop --split to balance automatically"
            )
        _choice("dist.balance", self.balance, ("flops", "time"))
        _choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        _choice("dist.device", self.device, ("auto", "cpu", "cuda"))
        _positive("dist.timeout_s", self.timeout_s)
        _positive("dist.dp", self.dp)
        _positive("dist.microbatches", self.microbatches)
        _choice("dist.pipeline_schedule", self.pipeline_schedule, ("gpipe", "1f1b"))


@dataclass
class CouplingConfig:
    """Auxiliary-variable coupling (``--method penalty`` and ``--method al``); algorithms.md §3-5.

    ``rho`` is the penalty parameter beta of algorithms.md. The penalty is normalized per
    element: stage k-1's local loss is ``(rho/2) * mean_i ||D(F(z_{k-1,i})) - t_{k,i}||^2 / n_k``
    with n_k the number of values of one stored boundary state, i.e. beta_k = rho / n_k in the
    per-sample formulas. That makes one rho fit every boundary and model size (algorithms.md
    notes an unnormalized beta had to shrink with the boundary size).
    """

    rho: float = 10.0
    """Penalty parameter (beta), per element of the boundary state.

    Default 10 growing x1.2 per epoch: chosen on digits (ResNet-20, 15 epochs, seeds 0-2; see
    experiments/accuracy_digits.py). A small beta early leaves upstream stages free (the
    penalty against a one-epoch-old target acts as a brake proportional to beta); a larger beta
    late keeps stage inputs consistent while the learning rate is small. Constant rho in
    1..30 was within ~1 point of this on average but had worse single runs; rho >= 100 froze
    the upstream stages (K = 4 at rho = 1000: chance accuracy)."""
    rho_growth: float = 1.2
    """Geometric beta schedule: beta <- min(rho_growth * beta, rho_max) every epoch; 1 = constant."""
    rho_max: float = 1e6
    aux_update: str = "gradient"
    """gradient (z -= aux_lr * grad_z), prox (linearized proximal step, tau = aux_lr), forward (z = o)."""
    aux_lr: float = 0.0
    """Aux step eta_z (gradient) or tau (prox); 0 = 1/beta_k, the step that makes the upstream
    penalty gradient equal the backprop gradient (algorithms.md §3, practical notes)."""
    ds_factor: int = 1
    """Spatial downsampling s of stored and sent boundary tensors; 1 = exact, no filter."""
    ds_mode: str = "avg"
    """Downsampling operator D: avg or max pooling with kernel = stride = s."""
    upsample: str = "nearest"
    """Upsampling operator U: nearest or bilinear."""
    aux_dtype: str = "fp32"
    """Storage (and send) dtype of aux states and multipliers: fp32, bf16, fp16."""
    aux_device: str = "device"
    """device (training device memory) or host (CPU memory; pinned when training on CUDA)."""
    phases: str = "parallel:2,serial:1"
    """SPH phase list, repeated until run.epochs: e.g. parallel:8,serial:2; 'parallel' alone = no serial phase."""
    mu_reset: bool = True
    """AL: reset multipliers to 0 when the aux states are re-initialized after a serial phase."""
    mu_damping: float = 0.0
    """AL: mu <- (1 - mu_damping) * mu + beta (o - z); damps multiplier build-up over long phases."""
    mu_order: str = "after"
    """AL: update the multipliers after the aux step (algorithms.md) or before it, from the
    current residual (then the upstream target is o - g/beta at every step; see aux_update)."""
    stage_input: str = "aux"
    """What a stage k > 0 reads in the parallel phase: aux (its aux states z_k, the penalty
    problem of algorithms.md §3) or output (the last output o_k of stage k-1 that arrived for
    the sample, i.e. the true activation of the network one visit ago; z_k = o_k - g/beta then
    only serves as stage k-1's target). With aux, the aux step z <- o - g/beta moves the input
    of the stage itself along its loss gradient, so that stage trains on inputs its own loss
    has already improved; output keeps every stage on activations the network really produced.
    Stores one more state per sample and boundary (like the AL multipliers)."""
    serial_executor: str = "layer"
    """How the serial phase runs over the K ranks: layer (activations forward, gradients back,
    one batch at a time) or pipeline (micro-batched schedule of torch.distributed.pipelining)."""
    reinit_threads: int = 0
    """CPU threads of the ranks that compute during an aux-state re-initialization (stages 0..K-2;
    the last stage only receives and stores). 0 = auto: those ranks also take the cores of the
    last stages on their node, which sit idle then (K = 2 with one thread per rank: 2 threads
    for stage 0); N > 0 = N threads. Only the re-initialization's forward pass; no effect on GPUs."""

    def validate(self) -> None:
        _positive("coupling.rho", self.rho)
        if self.rho_growth < 1.0:
            raise ConfigError(f"coupling.rho_growth = {self.rho_growth} must be >= 1 (1 keeps beta constant)")
        if self.rho_max < self.rho:
            raise ConfigError(f"coupling.rho_max = {self.rho_max} is below coupling.rho = {self.rho}; raise rho_max")
        _choice("coupling.aux_update", self.aux_update, ("gradient", "prox", "forward"))
        _nonneg("coupling.aux_lr", self.aux_lr)
        _positive("coupling.ds_factor", self.ds_factor)
        _choice("coupling.ds_mode", self.ds_mode, ("avg", "max"))
        _choice("coupling.upsample", self.upsample, ("nearest", "bilinear"))
        _choice("coupling.aux_dtype", self.aux_dtype, ("fp32", "bf16", "fp16"))
        _choice("coupling.aux_device", self.aux_device, ("device", "host"))
        if not 0.0 <= self.mu_damping < 1.0:
            raise ConfigError(f"coupling.mu_damping = {self.mu_damping} must be in [0, 1)")
        _choice("coupling.serial_executor", self.serial_executor, ("layer", "pipeline"))
        _choice("coupling.mu_order", self.mu_order, ("after", "before"))
        _choice("coupling.stage_input", self.stage_input, ("aux", "output"))
        _nonneg("coupling.reinit_threads", self.reinit_threads)
        parse_phases(self.phases)


@dataclass
class MgritConfig:
    """Multigrid reduction in time over the block grid (``--method mgrit``); algorithms.md §6.

    The defaults are one-shot training settings (a fixed, small amount of MGRIT work per step,
    inexact gradients), chosen by measurement on digits (see auxpar/coupling/mgrit.py and
    experiments/bench_mgrit.py). Two levels, F-relaxation and ``fwd_iters = bwd_iters = N_c`` (the
    number of level-1 intervals) give the exact serial step instead.
    """

    levels: int = 2
    """Grid levels; 1 = serial propagation across the ranks (exact, nothing to iterate).
    Default 2: the coarse grid (N/m steps, e.g. 14 for ResNet-56) is solved serially across the
    ranks. More levels shorten that serial chain -- needed for a speedup on many ranks (README,
    cost model) -- but add relaxation work per level and another crude coarse propagator."""
    cfactor: list = field(default_factory=lambda: [2])
    """Coarsening factor m: one value for every coarsening or one per coarsening (levels - 1).
    Default 2: a coarse step lumps m blocks into one block at step m*h, so larger m means a
    cruder coarse step (at h = 1 already m = 2 lets the adjoint residual grow in the first
    iteration, experiments/bench_mgrit.py --factors); m = 2 also keeps the most stage cuts legal
    (every stage boundary must be a multiple of prod(cfactor))."""
    fwd_iters: int = 2
    """Forward MGRIT iterations (FAS cycles) per step; a cap when tol > 0. Default 2 (TorchBraid's
    usual one-shot count): on digits ResNet-20 (N_c = 5) two FCF iterations already bring the
    forward residual to rounding level, and one-shot training matches serial accuracy (98.61%
    vs 98.70%, 15 epochs, 3 seeds); on ResNet-56 (N_c = 14) they leave it at ~0.6 of the first."""
    bwd_iters: int = 1
    """Adjoint MGRIT iterations per step; a cap when tol > 0. Default 1 (one-shot): the final sweep
    then accumulates inexact gradients (relative error ~0.4 against the exact gradient on digits
    ResNet-20/56 after one epoch); each extra iteration costs about as much as a forward one."""
    tol: float = 0.0
    """Relative stopping tolerance: a solve stops once its residual norm (global 2-norm over the
    level-0 C-points, XBraid's) is at or below tol times its first residual norm (after the
    first relaxation); the iteration counts are then caps. Relative because forward residuals
    (states) and adjoint residuals (dLoss/du) differ by orders of magnitude. 0 = always run the
    iteration counts (one-shot training; no extra reduction per iteration)."""
    relax: str = "FCF"
    """Relaxation per iteration: F or FCF. Default FCF: about 2.5 instead of 1.5 block evaluations
    per block and iteration (m = 2), and per-iteration residual ratios of 0.6-0.9 instead of
    0.8-2 on ResNet-56 at h = 1 (experiments/bench_mgrit.py --factors)."""
    cweight: float = 1.0
    """Weight w of the C-relaxation, u_c <- u_c + w (Phi(u_{c-1}) - u_c); 1 = plain C-relaxation."""
    final_relax: str = "F"
    """Final sweep after the last iteration (the sweep that keeps graphs / accumulates the
    parameter gradients): F keeps the coarse-corrected C-points, FC also C-relaxes them."""
    nested: bool = False
    """Start every solve from a serial coarsest-grid solve interpolated up (nested iteration)
    instead of zeros / the warm start; off by default because the warm start is free."""
    warm_start: bool = True
    """Start each step's forward solve from the previous step's final C-point states (in the form
    warm_mode says); cold = zeros. Measured (digits, ResNet-20/56 with BN, 2 forward FCF iterations,
    see auxpar/coupling/mgrit.py): the previous batch's states as they are lower the first
    residual but not the final one and worsen the gradient; their batch mean lowers the final
    forward residual by ~7% and the gradient error by ~2% against zeros, hence on, mode mean.
    Test accuracy does not resolve these differences (15 epochs, 3 seeds: mean 98.61%, cold
    98.52%, states + warm adjoint 98.89%; seed-to-seed spread ~0.5 points)."""
    warm_mode: str = "mean"
    """mean: every sample starts at the previous step's batch-mean state of that point (the states
    belong to other samples, so only what they share carries over); states: the previous step's
    per-sample states as they are (TorchBraid's warm start)."""
    warm_adjoint: bool = False
    """Warm-start the adjoint solve too (same warm_mode). Off: the previous batch's adjoints
    (per-sample dLoss/du of other samples) measured worse than starting from zero."""
    step: float = 1.0
    """h scaling the residual branch, u + h f(u); 1 = the standard ResNet (the default, so that
    the model is the one serial training trains). h = T/N gives the ODE scaling."""
    phases: str = "parallel"
    """SPH phases for --method mgrit (syntax of coupling.phases): parallel = MGRIT step, serial =
    exact layer-serial backprop over the ranks. Default parallel only: MGRIT states are not tied
    to samples, so MGRIT phases train on augmented data already and need no re-initialization,
    and serial phases did not help (digits ResNet-20 K=2, 15 epochs, seeds 0-2: parallel only
    98.61% mean test accuracy, parallel:2,serial:1 98.24%, serial backprop 98.70%). The
    --phases flag sets this key when --method is mgrit (and coupling.phases otherwise)."""

    def validate(self) -> None:
        _positive("mgrit.levels", self.levels)
        if not self.cfactor or any((not isinstance(c, int)) or isinstance(c, bool) or c < 2 for c in self.cfactor):
            raise ConfigError(f"mgrit.cfactor = {self.cfactor!r}: give whole numbers >= 2, e.g. [2] or [4, 2]")
        if len(self.cfactor) not in (1, max(self.levels - 1, 1)):
            raise ConfigError(f"mgrit.cfactor has {len(self.cfactor)} entries for {self.levels} levels; "
                              f"give one value or {self.levels - 1} (one per coarsening)")
        _positive("mgrit.fwd_iters", self.fwd_iters)
        _positive("mgrit.bwd_iters", self.bwd_iters)
        _nonneg("mgrit.tol", self.tol)
        _choice("mgrit.relax", self.relax, ("F", "FCF"))
        _positive("mgrit.cweight", self.cweight)
        if self.cweight >= 2:
            raise ConfigError(f"mgrit.cweight = {self.cweight} must be in (0, 2) (weighted Jacobi diverges "
                              "beyond 2); 1 is plain C-relaxation")
        _choice("mgrit.final_relax", self.final_relax, ("F", "FC"))
        _positive("mgrit.step", self.step)
        _choice("mgrit.warm_mode", self.warm_mode, ("mean", "states"))
        parse_phases(self.phases)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    mgrit: MgritConfig = field(default_factory=MgritConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m = registry.method(self.run.method)
        if self.model.split_blocks and self.run.method == "mgrit":
            raise ConfigError("model.split_blocks does not run with --method mgrit: its layer grid steps whole "
                              "residual blocks (x -> x + h f(x)); cut the net between blocks (drop --split-blocks)")
        if self.run.precision not in m.precisions:
            raise ConfigError(f"--precision {self.run.precision} does not run with --method {m.name}: "
                              + (m.precision_note or f"use one of {', '.join(m.precisions)}"))
        return self

    def resolved(self) -> dict:
        """Plain nested dict of every setting (what config.toml in the run directory holds)."""
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        if self.run.out:
            return Path(self.run.out)
        model = self.model.name.replace(":", "-").replace("/", "-")  # a package.module:factory model
        return Path("runs") / f"{self.run.method}-{model}-{self.data.dataset}-s{self.run.seed}"


# --------------------------------------------------------------------------- loading

def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the field's type (taken from its default), with TOML's mild coercions."""
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected true or false")
    if want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a whole number")
    if want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"{key} = {value!r} must be a finite number")
            return v
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a number")
    if want is str:
        if isinstance(value, str):
            return value
        if key == "run.checkpoint_every" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # checkpoint_every = 2 in TOML means every 2 epochs
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a string")
    if want is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list, e.g. [1, 2]")
    return value  # pragma: no cover - all fields are one of the above


def apply_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    """Merge a nested ``{section: {key: value}}`` mapping into ``cfg``; reject unknown keys."""
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, sec_values in data.items():
        if sec_name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{sec_name}]; valid sections are "
                + ", ".join(f"[{s}]" for s in sections)
            )
        if not isinstance(sec_values, dict):
            raise ConfigError(f"{source}: [{sec_name}] must be a table of key = value pairs")
        section = getattr(cfg, sec_name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in sec_values.items():
            old = f"{sec_name}.{key}"
            if old in RENAMED:
                raise ConfigError(f"{source}: {old} was renamed {RENAMED[old]}; write "
                                  f"{RENAMED[old].split('.')[1]} = {value!r} in [{sec_name}] (or --set "
                                  f"{RENAMED[old]}=...)")
            if key not in fields:
                close = [k for k in fields if k.startswith(key[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"{source}: unknown key {sec_name}.{key}{hint}; valid keys in [{sec_name}]: "
                    + ", ".join(fields)
                )
            default = getattr(section, key)
            setattr(section, key, _coerce(f"{sec_name}.{key}", value, default))
    return cfg


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the path (configs live in experiments/configs/)")
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def parse_value(text: str) -> Any:
    """Parse a ``--set key=value`` right-hand side with TOML syntax, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    if "." not in dotted:
        raise ConfigError(f"--set {dotted}=...: keys are written section.key, e.g. --set optim.lr=0.1")
    sec, key = dotted.split(".", 1)
    data.setdefault(sec, {})[key] = value


def dataset_defaults(dataset: str) -> dict:
    """Recipe defaults of a registered dataset, applied below the TOML file and the flags
    (``recipe=`` of :func:`auxpar.registry.register_dataset`); {} for an unknown name (the
    validation then names the choices)."""
    import copy

    try:
        return copy.deepcopy(registry.dataset(dataset).recipe)
    except ConfigError:
        return {}


def build_config(file_data: dict | None = None, overrides: dict | None = None,
                 source: str = "config") -> Config:
    """Defaults < dataset recipe < TOML file < flag overrides; then validate."""
    file_data = file_data or {}
    overrides = overrides or {}
    for layer in (file_data, overrides):  # plugins first: they may register the method or dataset
        plugins = layer.get("run", {}).get("plugins", []) if isinstance(layer.get("run"), dict) else []
        if not isinstance(plugins, list):
            raise ConfigError(f"run.plugins = {plugins!r} must be a list of module names, e.g. [\"my_plugin\"]")
        registry.load_plugins(plugins)
    dataset = (
        overrides.get("data", {}).get("dataset")
        or file_data.get("data", {}).get("dataset")
        or DataConfig.dataset
    )
    cfg = Config()
    if isinstance(dataset, str):
        apply_dict(cfg, dataset_defaults(dataset), source="dataset defaults")
    apply_dict(cfg, file_data, source=source)
    apply_dict(cfg, overrides, source="command line")
    return cfg.validate()


def config_to_toml(data: dict) -> str:
    """Write a resolved config dict as TOML (only the value types the dataclasses use)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = []
    for sec, values in data.items():
        lines.append(f"[{sec}]")
        for k, v in values.items():
            lines.append(f"{k} = {fmt(v)}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers

def parse_every(text: str) -> tuple[str, int]:
    """``run.checkpoint_every`` -> ("off", 0) | ("epochs", N) | ("steps", N)."""
    t = str(text).strip().lower()
    if t in ("", "0", "off"):
        return "off", 0
    m = re.fullmatch(r"(\d+)\s*(e|epochs?|s|steps?)?", t)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"run.checkpoint_every = {text!r}: write N or Ne (every N epochs) or Ns "
                          "(every N steps), e.g. --checkpoint-every 1 or --checkpoint-every 200s")
    unit = "steps" if (m.group(2) or "e").startswith("s") else "epochs"
    t = m.group(1)
    return unit, int(t)


def _positive(key: str, v: float) -> None:
    if not v > 0:
        raise ConfigError(f"{key} = {v} must be > 0")


def _nonneg(key: str, v: float) -> None:
    if not v >= 0:
        raise ConfigError(f"{key} = {v} must be >= 0")


def _choice(key: str, v: str, options: tuple) -> None:
    if v not in options:
        raise ConfigError(f"{key} = {v!r} is not valid; choose one of {', '.join(options)}")

