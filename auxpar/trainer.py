"""The training loop: read :func:`train` top to bottom.

    multi-rank run with checkpoints or --resume: check that every rank sees one run directory
    decide whether this run resumes (before anything in the run directory changes)
    build data and model (one seed, whole model), decide the stage cut once, let the method slice it
    open the run directory (config.toml, metrics.jsonl)
    for each epoch:
        phase = method.phase(epoch)             # 'serial' or 'parallel' (SPH alternates them)
        run_epoch: for each batch (sample ids, x, y), augmentation on or off per phase:
            lr = schedule(global epoch)         # one curve for every method and phase
            method.train_step(batch, phase)     # device tensors only: no host sync
        sum the epoch statistics (one sync), NaN guard, evaluate, log one line, checkpoint
    write summary.json and model.pt (atomically)

The rank that owns the loss (``method.log_rank``) writes the run directory and prints; the
others stay quiet. The helpers below :func:`train` are in the order it calls them.
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from auxpar import __version__ as auxpar_version
from auxpar import checkpoint, faults, hostmem
from auxpar.resume import (CheckpointSaver, LoopState, Resume, check_compatible, load_rank_state, model_file,
                           set_rng_state, truncate_metrics)
from auxpar.resume import resolve_resume as find_checkpoint
from auxpar.config import Config, config_to_toml, parse_every
from auxpar.coupling import get_method
from auxpar.coupling.base import Method
from auxpar.data import Augment, BatchLoader, IndexSampler, default_augment, eval_batches, load_dataset
from auxpar.distributed import DistInfo, all_reduce_, barrier, reduce_floats
from auxpar.shared_fs import check_shared_run_dir
from auxpar.timing import sync
from auxpar.errors import ConfigError, TrainingError
from auxpar.metrics import MetricsWriter, peak_memory_bytes
from auxpar.models import StagedNet, build_model, build_user_model, count_parameters, partition_counts
from auxpar.models.profile import best_cut, measure_costs, neighbour_cuts, time_stage_cuts
from auxpar.lr_schedule import lr_at

log = logging.getLogger("auxpar")


def train(cfg: Config, info: DistInfo, t_launch: float | None = None, overwrite: bool = False, *,
          model: Any = None, data: Any = None) -> dict:
    """Run one training job on this rank; returns the summary summary.json holds (on every rank).

    ``overwrite`` (--overwrite) allows starting over in a run directory that holds checkpoints.
    ``model`` / ``data`` come from :func:`auxpar.train`: a user's network (factory function,
    StagedNet or (stem, blocks, head)) and data (:class:`auxpar.TensorData`); None means
    ``cfg.model.name`` / ``cfg.data.dataset``, as on the command line."""
    t_launch = time.perf_counter() if t_launch is None else t_launch
    hostmem.configure(cfg.run.host_memory)  # before the data and the model take their memory
    fault = faults.from_env()
    method_cls = get_method(cfg.run.method)
    method_cls.check_layout(cfg, info)
    run_dir = cfg.run_dir()
    if needs_shared_run_dir(cfg, info):
        check_shared_run_dir(run_dir, info)  # before any rank reads or writes a checkpoint
    resume = resolve_resume(cfg, info, run_dir, overwrite)  # before anything in run_dir changes

    # ---- data and model: the whole model from one seed, so parameters do not depend on K
    train_set, test_set = load_data(cfg, info, data)
    net, arch = build_net(cfg, info, train_set, model)
    n_params = count_parameters(net)
    cfg.dist.split = decide_split(cfg, info, net, resume)  # the one place the cut is chosen
    method = method_cls(cfg, info, net)
    method.prepare(train_set)
    del net  # layer-parallel methods keep only their stage
    loader = make_loader(cfg, info, method, train_set, data)
    loop = restore(resume, info, method)  # fresh counters, or the checkpoint's (and its RNG state)

    # ---- run directory: config.toml (after the cut is decided) and metrics.jsonl, owner rank only
    owner = info.rank == method.log_rank
    metrics = open_run_dir(cfg, info, run_dir, owner, resume, loop, overwrite, n_params)
    run = Run(cfg, info, method, loader, test_set, loop, metrics, owner, fault,
              CheckpointSaver(cfg, info, method, run_dir, len(loader), fault, arch),
              progress_bar(cfg, loop, len(loader), owner))

    for epoch in range(loop.epoch, run_length(cfg, len(loader))[0]):
        phase = method.phase(epoch)
        lr, epoch_time = run_epoch(run, epoch, phase)
        train_loss, train_acc, first_loss = train_stats(run, epoch)  # one sync; NaN guard
        extras = method.epoch_metrics()  # collective
        comm_now = int(reduce_floats(info, [float(method.comm_bytes())])[0])  # all ranks, cumulative
        test_loss, test_acc = evaluate(run, epoch)
        loop.last = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
        skipped = int(reduce_floats(info, [float(method.skipped_steps)], op="max")[0])
        log_epoch(run, dict(
            epoch=epoch + 1, step=loop.step, phase=phase, lr=lr, train_loss=train_loss, train_acc=train_acc,
            test_loss=test_loss, test_acc=test_acc, first_step_loss=first_loss, epoch_time_s=epoch_time,
            train_time_s=loop.train_time, comm_bytes=comm_now, reinit_time_s=loop.reinit_time,
            skipped_steps=skipped, **extras))
        if run.saver.due_epoch(epoch + 1, loop.step):
            loop.epoch, loop.position = epoch + 1, 0
            loop.method_epoch_state = None
            run.saver.save(loop)
    run.bar.close()
    metrics.close()

    summary, state = summarize(run, t_launch, n_params, len(train_set))  # collectives: every rank
    if owner:
        write_summary(run, summary, state, arch, run_dir)
    return owner_summary(info, summary, method.log_rank)


@dataclass
class Run:
    """What the epoch helpers share: one rank's method, data, counters and outputs."""

    cfg: Config
    info: DistInfo
    method: Method
    loader: BatchLoader
    test_set: Any
    loop: LoopState
    metrics: MetricsWriter
    owner: bool
    fault: Any
    saver: CheckpointSaver
    bar: Any


# ---------------------------------------------------------------------------------------- setting up

def needs_shared_run_dir(cfg: Config, info: DistInfo) -> bool:
    """Checkpoints (written, or read by --resume) need one run directory that every rank sees:
    each rank writes its file and rank 0's manifest lists them all. Without them a multi-node run
    may use node-local directories (only the log rank writes there)."""
    return info.distributed and info.world_size > 1 and (
        parse_every(cfg.run.checkpoint_every)[0] != "off" or bool(cfg.run.resume))


def resolve_resume(cfg: Config, info: DistInfo, run_dir: Path, overwrite: bool) -> Resume | None:
    """The checkpoint this run continues from (checked against this run), or None to start
    fresh; refuses to start over silently in a directory holding an unfinished run's checkpoints."""
    resume = find_checkpoint(cfg, run_dir, info)
    if resume is not None:
        check_compatible(resume.manifest, cfg, info, resume.path)
    elif checkpoint.complete_checkpoints(run_dir) and not overwrite:
        raise ConfigError(
            f"run directory {run_dir} holds checkpoints of an unfinished run; pass --resume to continue "
            "it, --overwrite to start over (its checkpoints are deleted), or choose another --out")
    return resume


def load_data(cfg: Config, info: DistInfo, data: Any = None):
    """Train and test sets. Local rank 0 downloads/caches first; the others then read the cache.
    ``data`` (a :class:`auxpar.TensorData` from the Python API) is already in memory."""
    if data is not None:
        return data.splits(cfg.data.train_subset)
    d = cfg.data
    synthetic = {"num_train": d.synthetic_num_train, "num_test": d.synthetic_num_test,
                 "shape": tuple(d.synthetic_shape), "num_classes": d.synthetic_classes}

    def _load():
        kw = dict(data_dir=d.data_dir, download=d.download, seed=cfg.run.seed, synthetic=synthetic, train_subset=d.train_subset)
        return load_dataset(d.dataset, "train", **kw), load_dataset(d.dataset, "test", **kw)

    if info.distributed and info.local_rank != 0:
        barrier(info)  # wait for local rank 0 to download and cache
        return _load()
    sets = _load()
    if info.distributed:
        barrier(info)
    return sets


def build_net(cfg: Config, info: DistInfo, train_set, model: Any = None) -> tuple[StagedNet, dict]:
    """The whole network from the run's seed (on every rank the same), and its ``arch`` record
    (model.pt, checkpoint manifests): built-in name or ``module:factory`` (``cfg.model.name``),
    or the API's ``model`` object (a ready-made network: rank 0's weights on every rank)."""
    torch.manual_seed(cfg.run.seed)
    c, h, _ = train_set.shape
    arch = {"name": cfg.model.name, "in_channels": c, "input_size": h, "num_classes": train_set.num_classes,
            "dropout": cfg.model.dropout, "norm": cfg.model.norm}
    kw = dict(in_channels=c, input_size=h, num_classes=arch["num_classes"], dropout=cfg.model.dropout,
              norm=cfg.model.norm)
    if model is None:
        net = build_model(arch["name"], **kw)
    else:
        net = build_user_model(model, name=cfg.model.name, **kw)
        if isinstance(model, (tuple, list, torch.nn.Module)):
            broadcast_(info, [*net.parameters(), *net.buffers()])  # built outside this call: maybe unseeded
    # Units, not blocks, from here on (the same modules, so the same function and parameters);
    # model.pt keeps the uncut net's keys (arch has no trace of the cut).
    return net.split_blocks(cfg.model.split_blocks), arch


def broadcast_(info: DistInfo, tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` (in place; through info.device)."""
    if not info.distributed:
        return
    import torch.distributed as tdist

    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(info.device)
            tdist.broadcast(buf, src=0)
            t.copy_(buf)


def decide_split(cfg: Config, info: DistInfo, net: StagedNet, resume: Resume | None) -> list[int]:
    """Blocks per stage, decided once before anything is written: an explicit ``--split`` >
    the resumed checkpoint's cut > ``--balance time`` (measured) > balanced by estimated FLOPs
    (for MGRIT: with every interior boundary on the coarsest grid). [] for one stage."""
    K = cfg.dist.stages
    if cfg.dist.split:
        return list(cfg.dist.split)
    if resume is not None and resume.manifest["meta"]["split"]:
        return list(resume.manifest["meta"]["split"])  # the cut the run was trained with
    if K <= 1:
        return []
    if cfg.dist.balance == "time":
        return time_balanced_split(net, cfg, info)
    if cfg.run.method == "mgrit":
        from auxpar.mgrit.grid import build_hierarchy, mgrit_split

        grid = build_hierarchy(net.num_blocks, net.transition_indices(), cfg.mgrit.levels, cfg.mgrit.cfactor,
                               net.name)
        stem_c, block_c, head_c = net.costs()
        return mgrit_split(grid, K, block_c, None, stem_c, head_c, net.name)
    return partition_counts(net, K)


def time_balanced_split(net, cfg: Config, info: DistInfo) -> list[int]:
    """Rank 0 times every block (forward + backward, batch size, this device), cuts by those
    times, then times whole stages of that cut and of its neighbours (each boundary moved by one
    block) and keeps the cut whose slowest stage is fastest; all ranks get its cut."""
    # Every tensor handed to the collective lives on info.device (a CPU tensor added to a CUDA one
    # raises on rank 0 while the others already wait in the all-reduce: a hang under nccl).
    counts = torch.zeros(cfg.dist.stages, dtype=torch.float64, device=info.device)
    # Every rank first meets here, so that rank 0 times with the others idle: one still loading
    # its data would share the cores with the timing (seen at the start of a Fashion-MNIST study
    # run: stage 0 of the 4, 5 cut timed at 230 ms per step, against 128-144 ms in bench_parallel).
    all_reduce_(info, torch.zeros(1, dtype=torch.float64, device=info.device))
    grid = None
    if cfg.run.method == "mgrit":
        # MGRIT's boundaries must lie on the coarsest grid: the measured block costs deal its
        # coarse intervals to the ranks (no whole-stage refinement: a neighbour is off the grid).
        # Every rank first cuts by FLOPs, so a grid that cannot be cut fails on all of them alike.
        from auxpar.mgrit.grid import build_hierarchy, mgrit_split

        grid = build_hierarchy(net.num_blocks, net.transition_indices(), cfg.mgrit.levels, cfg.mgrit.cfactor,
                               net.name)
        stem_c, block_c, head_c = net.costs()
        mgrit_split(grid, cfg.dist.stages, block_c, None, stem_c, head_c, net.name)
    if info.rank == 0 and grid is not None:
        stem_c, block_c, head_c = measure_costs(net, cfg.data.batch_size, info.device,
                                                channels_last=cfg.run.channels_last)
        split = mgrit_split(grid, cfg.dist.stages, block_c, None, stem_c, head_c, net.name)
        log.info("time-balanced split on the coarsest MGRIT grid (measured block times): %s",
                 ",".join(map(str, split)))
        counts = torch.tensor(split, dtype=torch.float64, device=info.device)
    elif info.rank == 0:
        bs, cl = cfg.data.batch_size, cfg.run.channels_last
        first = partition_counts(measure_costs(net, bs, info.device, channels_last=cl), cfg.dist.stages)
        candidates = neighbour_cuts(first)
        times = time_stage_cuts(net, candidates, bs, info.device, channels_last=cl)
        best = best_cut(candidates, times)
        log.info("time-balanced split: block times give %s; whole stages timed (ms per step): %s -> %s",
                 ",".join(map(str, first)),
                 "; ".join(f"{','.join(map(str, c))}: {' / '.join(f'{t * 1e3:.0f}' for t in ts)}"
                           for c, ts in zip(candidates, times)),
                 ",".join(map(str, candidates[best])))
        counts = torch.tensor(candidates[best], dtype=torch.float64, device=info.device)
    all_reduce_(info, counts)  # the others contributed zeros: everyone now holds rank 0's cut
    return [int(c) for c in counts.tolist()]


def make_loader(cfg: Config, info: DistInfo, method: Method, train_set, data: Any = None) -> BatchLoader:
    """The training batches of this rank (its replica's slice of every global batch)."""
    replicas, replica = method.sampler_layout()
    sampler = IndexSampler(len(train_set), cfg.data.batch_size, seed=cfg.run.seed, shuffle=True,
                           drop_last=True, num_replicas=replicas, rank=replica, strata=method.sampler_strata())
    # One augmentation stream for the global batch (each replica applies its slice), so DDP
    # sees exactly the crops and flips a single process would.
    augment = make_augment(cfg, data.augment_defaults() if data is not None else None)
    return BatchLoader(train_set, sampler, device=info.device, augment=augment, generator_seed=cfg.run.seed)


def make_augment(cfg: Config, defaults: dict | None = None) -> Augment | None:
    """The random crop / flip of ``cfg.data`` over the dataset's defaults (``defaults`` for a
    user's data, else the built-in dataset's)."""
    d = cfg.data
    if not d.augment:
        return None
    dflt = default_augment(d.dataset) if defaults is None else defaults
    pad = dflt["crop_pad"] if d.crop_pad < 0 else d.crop_pad
    mode = dflt["pad_mode"] if d.pad_mode == "auto" else d.pad_mode
    flip = dflt["flip"] if d.flip == "auto" else d.flip == "on"
    return Augment(crop_pad=pad, pad_mode=mode, flip=flip)


def restore(resume: Resume | None, info: DistInfo, method: Method) -> LoopState:
    """The loop counters: fresh, or the checkpoint's with the method state and RNG state."""
    loop = LoopState()
    if resume is not None:
        saved = load_rank_state(resume, info)
        method.load_state_dict(saved["method"])
        loop.load(saved["loop"], info.device)
        set_rng_state(saved["rng"], info.device)
    return loop


def open_run_dir(cfg: Config, info: DistInfo, run_dir: Path, owner: bool, resume: Resume | None,
                 loop: LoopState, overwrite: bool, n_params: int) -> MetricsWriter:
    """The owner writes config.toml and opens metrics.jsonl (truncated to the resumed step);
    ``--overwrite`` of a fresh run deletes old checkpoints. Returns the metrics writer (a
    no-op writer on the other ranks); every rank leaves once the directory is final."""
    metrics = MetricsWriter(None)
    if owner:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.resolved()
            resolved["run"]["resume"] = ""  # rerunning the saved config starts a run, not a resume
            checkpoint.write_text(config_to_toml(resolved), run_dir / "config.toml")
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir} ({exc.strerror}); "
                              "choose a writable --out") from None
        if resume is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(run_dir / "metrics.jsonl", loop.step)
        metrics = MetricsWriter(run_dir / "metrics.jsonl")
        log.info("run %s: %s %s on %s, %s parameters, %d rank(s), device %s, %d thread(s)",
                 run_dir, cfg.run.method, cfg.model.name, cfg.data.dataset, f"{n_params:,}",
                 info.world_size, info.device, torch.get_num_threads())
        if resume is not None:
            log.info("resumed from %s (epoch %d, step %d)", resume.path, loop.epoch + 1, loop.step)
    if resume is None and info.rank == 0 and overwrite:
        import shutil

        shutil.rmtree(checkpoint.ckpt_root(run_dir), ignore_errors=True)  # --overwrite: start over
    barrier(info)  # nobody writes a checkpoint before the directory is in its final state
    return metrics


def run_length(cfg: Config, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs to enter, training steps in all): run.epochs whole epochs, or fewer steps with
    run.max_steps, whose last epoch is then cut short."""
    total = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)
    return -(-total // max(steps_per_epoch, 1)), total


def progress_bar(cfg: Config, loop: LoopState, steps_per_epoch: int, owner: bool):
    return tqdm(total=run_length(cfg, steps_per_epoch)[1], initial=loop.step, desc=f"{cfg.run.method}", unit="step",
                disable=not (owner and _progress_enabled(cfg)), dynamic_ncols=True, leave=False)


def _progress_enabled(cfg: Config) -> bool:
    if cfg.run.progress == "on":
        return True
    if cfg.run.progress == "off":
        return False
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------------------- one epoch

def run_epoch(run: Run, epoch: int, phase: str) -> tuple[float, float]:
    """Train one epoch (the rest of it after a mid-epoch resume); returns (the last step's lr,
    the epoch's training seconds). Step records and mid-epoch checkpoints are written here."""
    cfg, info, method, loader, loop = run.cfg, run.info, run.method, run.loader, run.loop
    steps_per_epoch = len(loader)
    total = run_length(cfg, steps_per_epoch)[1]
    epochs = total / steps_per_epoch  # the lr schedule's length (fractional under run.max_steps)
    limit = min(steps_per_epoch, total - epoch * steps_per_epoch)  # batches of this epoch to train
    lr = lr_at(cfg.optim, float(epoch), epochs)
    start = loop.position if epoch == loop.epoch else 0
    if start:
        loader.load_state_dict({"epoch": epoch, "position": start, "seed": cfg.run.seed})
    else:
        loader.set_epoch(epoch)
    loader.augment_enabled = method.uses_augmentation(phase)
    extra = method.begin_epoch(epoch, phase)  # e.g. aux-state re-initialization (timed inside)
    if start:
        method.load_epoch_state(loop.method_epoch_state)  # continue the interrupted epoch
    else:
        loop.new_epoch(info.device, sum(extra.values()))
        for name, secs in extra.items():
            loop.phase_times[name] = loop.phase_times.get(name, 0.0) + secs
        loop.train_time += loop.reinit_time  # part of the training cost (T_reinit)
    t0 = time.perf_counter()
    # (cut to `limit` before the look-ahead: no message is posted for a batch that never trains)
    for i, (batch, next_idx) in enumerate(_lookahead(itertools.islice(loader, limit - start)), start=start):
        lr = lr_at(cfg.optim, epoch + i / steps_per_epoch, epochs)
        method.set_lr(lr)
        method.step_index = loop.step + 1
        method.poison = run.fault is not None and run.fault.hits("nan", info.rank, loop.step + 1)
        out = method.train_step(batch, phase, next_idx)
        # Device accumulators: summed here, read once per epoch (no sync per step).
        loop.loss_sum += out.loss.double() * out.count
        loop.correct += out.correct.double()
        if i == 0:  # the loss right after a phase switch shows how far the stages drifted
            loop.first = torch.stack([out.loss.detach().double() * out.count,
                                      torch.tensor(float(out.count), dtype=torch.float64, device=info.device)])
        loop.seen += out.count
        loop.step += 1
        run.bar.update(1)
        step_extra = method.step_metrics()  # e.g. MGRIT iterations and residuals, every step
        if (cfg.run.log_every and loop.step % cfg.run.log_every == 0) or step_extra:
            loss_now = method.logged_loss(out)  # the one sync of a logged step
            if run.owner:
                run.metrics.step(epoch=epoch, step=loop.step, phase=phase, lr=lr, loss=loss_now, **step_extra)
                run.bar.set_postfix(loss=f"{loss_now:.3f}")
        faults.after_step(run.fault, info.rank, loop.step)
        if i + 1 < limit and run.saver.due_step(loop.step):
            sync(info.device)  # the host clock is true once the queued device work has run
            seg = time.perf_counter() - t0
            loop.epoch_time += seg
            loop.train_time += seg
            loop.phase_times[phase] = loop.phase_times.get(phase, 0.0) + seg
            loop.epoch, loop.position = epoch, i + 1
            loop.method_epoch_state = method.epoch_state()
            run.saver.save(loop)
            t0 = time.perf_counter()  # checkpoint time is not training time
    method.end_epoch(epoch)
    sync(info.device)  # (end_epoch flushed the method's work; the clock reads true time)
    seg = time.perf_counter() - t0
    loop.train_time += seg
    loop.phase_times[phase] = loop.phase_times.get(phase, 0.0) + seg
    return lr, loop.epoch_time + seg


def _lookahead(loader):
    """Yield (batch, sample ids of the next batch or None): lets a method post messages early."""
    it = iter(loader)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, (nxt.idx if nxt is not None else None)
        cur = nxt


def train_stats(run: Run, epoch: int) -> tuple[float, float, float | None]:
    """(train loss, train accuracy, first step's loss) of the epoch: the device sums read once
    (summed over the ranks for data parallel methods); stops on a non-finite epoch loss."""
    info, loop = run.info, run.loop
    stats = torch.cat([torch.stack([loop.loss_sum, loop.correct,
                                    torch.tensor(float(loop.seen), dtype=torch.float64, device=info.device)]),
                       loop.first])
    every_rank = run.method.reduce_epoch_stats(stats)
    loss_total, correct_total, seen_total, first_total, first_count = stats.tolist()
    train_loss = loss_total / max(seen_total, 1)
    first_loss = first_total / first_count if first_count > 0 else None
    # The per-step guard (all ranks, before the optimizer step) already stopped on NaN; this
    # catches a non-finite epoch mean that --on-nan skip let through on every step.
    _nan_guard(train_loss, epoch, loop.step, run.cfg, every_rank=every_rank)
    return train_loss, correct_total / max(seen_total, 1), first_loss


def evaluate(run: Run, epoch: int) -> tuple[float | None, float | None]:
    """(test loss, test accuracy) when this epoch is evaluated (every ``eval_every`` epochs and
    after the last one), else (None, None); the method decides which ranks see which samples."""
    cfg, info, method, loop = run.cfg, run.info, run.method, run.loop
    if (epoch + 1) % cfg.run.eval_every and epoch + 1 != run_length(cfg, len(run.loader))[0]:
        return None, None
    test_loss = test_acc = None
    te = time.perf_counter()
    shards, shard = method.eval_layout()
    l_sum, c_sum, n = method.evaluate(
        eval_batches(run.test_set, cfg.data.eval_batch_size, info.device, shards=shards, shard=shard))
    ev = torch.stack([l_sum.double(), c_sum.double(), torch.tensor(float(n), dtype=torch.float64, device=info.device)])
    if shards > 1:
        all_reduce_(info, ev)
    l_tot, c_tot, n_tot = ev.tolist()
    if n_tot > 0:
        test_loss, test_acc = l_tot / n_tot, c_tot / n_tot
        loop.best_acc = max(loop.best_acc, test_acc)
    loop.eval_time += time.perf_counter() - te
    return test_loss, test_acc


def log_epoch(run: Run, rec: dict) -> None:
    """The owner appends the epoch record to metrics.jsonl and prints one line."""
    if not run.owner:
        return
    run.metrics.epoch(**rec)
    test_txt = f" test {100 * rec['test_acc']:5.2f}%" if rec["test_acc"] is not None else ""
    coupling_txt = ""
    if rec.get("residual"):
        coupling_txt = f" beta {rec['beta']:.3g} residual " + "/".join(f"{r:.3g}" for r in rec["residual"])
    msg = (f"epoch {rec['epoch']:>3}/{run_length(run.cfg, len(run.loader))[0]} [{rec['phase']}] loss {rec['train_loss']:.4f} "
           f"train {100 * rec['train_acc']:5.2f}%{test_txt} lr {rec['lr']:.4g}{coupling_txt} "
           f"{rec['epoch_time_s']:.1f}s")
    if run.bar.disable:
        log.info(msg)
    else:
        run.bar.write(msg)


# ---------------------------------------------------------------------------------------- the end

def summarize(run: Run, t_launch: float, n_params: int, train_samples: int) -> tuple[dict, dict | None]:
    """summary.json's record and the whole network's state_dict (on the log rank, else None):
    accounting across ranks, after the loop, off the hot path (every rank calls it)."""
    cfg, info, method, loop = run.cfg, run.info, run.method, run.loop
    comm_total = int(reduce_floats(info, [float(method.comm_bytes())])[0])
    mem_slots = [0.0] * info.world_size
    mem_slots[info.rank] = float(peak_memory_bytes(info.device))
    mem_per_rank = [int(v) for v in reduce_floats(info, mem_slots)]
    state = method.model_state()  # collective for layer-parallel methods
    extras = method.summary_extras()  # collective
    skipped = int(reduce_floats(info, [float(method.skipped_steps)], op="max")[0])
    last = loop.last
    summary = {
        "method": cfg.run.method, "model": cfg.model.name, "dataset": cfg.data.dataset,
        "world_size": info.world_size, "stages": cfg.dist.stages, "dp": cfg.dist.dp, "split": list(cfg.dist.split),
        "epochs": cfg.run.epochs, "max_steps": cfg.run.max_steps or None, "steps": loop.step,
        "epochs_trained": round(loop.step / max(len(run.loader), 1), 3),
        "final_test_acc": last["test_acc"], "best_test_acc": loop.best_acc if loop.best_acc >= 0 else None,
        "final_train_loss": last["train_loss"], "final_train_acc": last["train_acc"],
        "wall_time_s": time.perf_counter() - t_launch, "train_time_s": loop.train_time,
        "eval_time_s": loop.eval_time, "phase_times_s": loop.phase_times, "comm_bytes": comm_total,
        "peak_memory_bytes": max(mem_per_rank), "peak_memory_bytes_per_rank": mem_per_rank,
        "torch_version": torch.__version__, "auxpar_version": auxpar_version, "git_revision": git_revision(),
        "precision": cfg.run.precision, "channels_last": cfg.run.channels_last,
        "host_memory": hostmem.in_force(), "device": str(info.device), "backend": info.backend,
        "threads": torch.get_num_threads(), "seed": cfg.run.seed, "params": n_params,
        "aux_store_bytes": 0, "skipped_steps": skipped,
        "checkpoint_bytes": run.saver.last_bytes, "checkpoint_time_s": run.saver.total_time,
        "resumed_from_step": loop.resumed_from,
        "train_subset": cfg.data.train_subset or None, "train_samples": train_samples,
    }
    summary.update(extras)
    return summary, state


def write_summary(run: Run, summary: dict, state: dict | None, arch: dict, run_dir: Path) -> None:
    """The owner writes model.pt (the whole network, gathered) and summary.json, atomically."""
    if state is not None:
        checkpoint.save_tensors(model_file(arch, run.cfg, state, run.loop.last["test_acc"], run.loop.step),
                                run_dir / "model.pt")
    checkpoint.write_json(summary, run_dir / "summary.json")
    log.info("done: final test %s, best %s, train time %.1fs (of %.1fs wall); wrote %s",
             _pct(summary["final_test_acc"]), _pct(summary["best_test_acc"]), run.loop.train_time,
             summary["wall_time_s"], Path(run_dir) / "summary.json")


def owner_summary(info: DistInfo, summary: dict, owner: int) -> dict:
    """The log rank's summary (the one written to summary.json) on every rank."""
    if not info.distributed:
        return summary
    import torch.distributed as tdist

    box = [summary if info.rank == owner else None]
    tdist.broadcast_object_list(box, src=owner, device=info.device if info.backend == "nccl" else None)
    return box[0]


def git_revision() -> str | None:
    """The git revision of the auxpar source tree that ran (``+dirty`` with uncommitted changes
    to tracked files), or None outside a git checkout (an installed wheel) or without git."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _nan_guard(loss: float, epoch: int, step: int, cfg: Config, every_rank: bool = False) -> None:
    if not math.isfinite(loss):
        err = TrainingError(
            f"training loss became {loss} at epoch {epoch + 1}, step {step}: the run diverged. "
            f"Lower the learning rate (now --lr {cfg.optim.lr}) or clip gradients "
            "(--set optim.grad_clip=1.0); files already written in the run directory are intact"
        )
        err.same_on_every_rank = every_rank
        raise err
