"""The training loop: read it top to bottom.

    build data and model (one seed, whole model, then the method slices it)
    for each epoch:
        phase = method.phase(epoch)             # 'serial' here; SPH alternates phases later
        for each batch (sample ids, x, y):      # augmentation on or off per phase
            lr = schedule(global epoch)         # one curve for every method and phase
            method.train_step(batch, phase)     # device tensors only: no host sync
        sum the epoch statistics (one sync), NaN guard, evaluate, log one line
    write summary.json and model.pt (atomically)

The rank that owns the loss (``method.log_rank``) writes the run directory and prints; the
others stay quiet.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from auxpar import checkpoint
from auxpar.config import Config, config_to_toml
from auxpar.coupling import get_method
from auxpar.data import Augment, BatchLoader, IndexSampler, default_augment, eval_batches, load_dataset
from auxpar.distributed import DistInfo, all_reduce_, barrier, reduce_floats
from auxpar.errors import ConfigError, TrainingError
from auxpar.metrics import MetricsWriter, peak_memory_bytes
from auxpar.models import build_model, count_parameters, partition_counts
from auxpar.models.profile import measure_costs
from auxpar.schedule import lr_at

log = logging.getLogger("auxpar")


def load_data(cfg: Config, info: DistInfo):
    """Train and test sets. Local rank 0 downloads/caches first; the others then read the cache."""
    d = cfg.data
    synthetic = {"num_train": d.synthetic_num_train, "num_test": d.synthetic_num_test,
                 "shape": tuple(d.synthetic_shape), "num_classes": d.synthetic_classes}

    def _load():
        kw = dict(data_dir=d.data_dir, download=d.download, seed=cfg.run.seed, synthetic=synthetic)
        return load_dataset(d.dataset, "train", **kw), load_dataset(d.dataset, "test", **kw)

    if info.distributed and info.local_rank != 0:
        barrier(info)  # wait for local rank 0 to download and cache
        return _load()
    sets = _load()
    if info.distributed:
        barrier(info)
    return sets


def make_augment(cfg: Config) -> Augment | None:
    d = cfg.data
    if not d.augment:
        return None
    dflt = default_augment(d.dataset)
    pad = dflt["crop_pad"] if d.crop_pad < 0 else d.crop_pad
    mode = dflt["pad_mode"] if d.pad_mode == "auto" else d.pad_mode
    flip = dflt["flip"] if d.flip == "auto" else d.flip == "on"
    return Augment(crop_pad=pad, pad_mode=mode, flip=flip)


def time_balanced_split(net, cfg: Config, info: DistInfo) -> list[int]:
    """Rank 0 times every block (forward + backward, batch size, this device); all ranks get its cut."""
    counts = torch.zeros(cfg.dist.stages, dtype=torch.float64, device=info.device)
    if info.rank == 0:
        costs = measure_costs(net, cfg.data.batch_size, info.device)
        counts += torch.tensor(partition_counts(costs, cfg.dist.stages), dtype=torch.float64)
    all_reduce_(info, counts)  # the others contributed zeros: everyone now holds rank 0's cut
    split = [int(c) for c in counts.tolist()]
    if info.rank == 0:
        log.info("time-balanced split (measured forward+backward per block): %s", ",".join(map(str, split)))
    return split


def _lookahead(loader):
    """Yield (batch, sample ids of the next batch or None): lets a method post messages early."""
    it = iter(loader)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, (nxt.idx if nxt is not None else None)
        cur = nxt


def _progress_enabled(cfg: Config) -> bool:
    if cfg.run.progress == "on":
        return True
    if cfg.run.progress == "off":
        return False
    return sys.stderr.isatty()


def train(cfg: Config, info: DistInfo, t_launch: float | None = None) -> dict:
    """Run one training job on this rank; returns the summary (on every rank)."""
    t_launch = time.perf_counter() if t_launch is None else t_launch
    method_cls = get_method(cfg.run.method)
    method_cls.check_layout(cfg, info)

    # ---- data and model: the whole model from one seed, so parameters do not depend on K
    train_set, test_set = load_data(cfg, info)
    torch.manual_seed(cfg.run.seed)
    c, h, _ = train_set.shape
    net = build_model(cfg.model.name, in_channels=c, input_size=h, num_classes=train_set.num_classes,
                      dropout=cfg.model.dropout, norm=cfg.model.norm)
    n_params = count_parameters(net)
    if cfg.dist.stages > 1 and not cfg.dist.split and cfg.dist.balance == "time":
        cfg.dist.split = time_balanced_split(net, cfg, info)
    method = method_cls(cfg, info, net)
    method.prepare(train_set)
    del net  # layer-parallel methods keep only their stage
    owner = info.rank == method.log_rank

    replicas, replica = method.sampler_layout()
    sampler = IndexSampler(len(train_set), cfg.data.batch_size, seed=cfg.run.seed, shuffle=True,
                           drop_last=True, num_replicas=replicas, rank=replica)
    # One augmentation stream for the global batch (each replica applies its slice), so DDP
    # sees exactly the crops and flips a single process would.
    loader = BatchLoader(train_set, sampler, device=info.device, augment=make_augment(cfg),
                         generator_seed=cfg.run.seed)

    # ---- run directory (owner rank only)
    run_dir = cfg.run_dir()
    metrics = MetricsWriter(None)
    if owner:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(config_to_toml(cfg.resolved()), run_dir / "config.toml")
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {run_dir} ({exc.strerror}); "
                              "choose a writable --out") from None
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        metrics = MetricsWriter(run_dir / "metrics.jsonl")
        log.info("run %s: %s %s on %s, %s parameters, %d rank(s), device %s, %d thread(s)",
                 run_dir, cfg.run.method, cfg.model.name, cfg.data.dataset, f"{n_params:,}",
                 info.world_size, info.device, torch.get_num_threads())

    epochs, steps_per_epoch = cfg.run.epochs, len(loader)
    step = 0
    train_time = eval_time = 0.0
    phase_times: dict[str, float] = {}
    best_acc = -1.0
    last = {"train_loss": float("nan"), "train_acc": float("nan"), "test_acc": None}
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{cfg.run.method}", unit="step",
               disable=not (owner and _progress_enabled(cfg)), dynamic_ncols=True, leave=False)

    for epoch in range(epochs):
        phase = method.phase(epoch)
        loader.set_epoch(epoch)
        loader.augment_enabled = method.uses_augmentation(phase)
        extra = method.begin_epoch(epoch, phase)  # e.g. aux-state re-initialization (timed inside)
        reinit_time = sum(extra.values())
        for name, secs in extra.items():
            phase_times[name] = phase_times.get(name, 0.0) + secs
        train_time += reinit_time  # part of the training cost (T_reinit in the speedup accounting)
        # Device accumulators: summed here, read once per epoch (no sync per step).
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        correct = torch.zeros((), dtype=torch.float64, device=info.device)
        seen = 0
        t0 = time.perf_counter()
        for i, (batch, next_idx) in enumerate(_lookahead(loader)):
            lr = lr_at(cfg.optim, epoch + i / steps_per_epoch, epochs)
            method.set_lr(lr)
            method.step_index = step + 1
            out = method.train_step(batch, phase, next_idx)
            loss_sum += out.loss.double() * out.count
            correct += out.correct.double()
            seen += out.count
            step += 1
            bar.update(1)
            step_extra = method.step_metrics()  # e.g. MGRIT iterations and residuals, every step
            if (cfg.run.log_every and step % cfg.run.log_every == 0) or step_extra:
                loss_now = float(out.loss)  # the one sync of a logged step
                if owner:
                    metrics.step(epoch=epoch, step=step, phase=phase, lr=lr, loss=loss_now, **step_extra)
                    bar.set_postfix(loss=f"{loss_now:.3f}")
        method.end_epoch(epoch)
        dt = time.perf_counter() - t0
        train_time += dt
        phase_times[phase] = phase_times.get(phase, 0.0) + dt

        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64,
                                                                  device=info.device)])
        if method.reduce_train_stats:
            all_reduce_(info, stats)
        loss_total, correct_total, seen_total = stats.tolist()
        train_loss = loss_total / max(seen_total, 1)
        train_acc = correct_total / max(seen_total, 1)
        # Every rank guards its own loss (CE or penalty); data-parallel ranks share one.
        _nan_guard(train_loss, epoch, step, cfg, every_rank=method.reduce_train_stats)
        extras = method.epoch_metrics()  # collective
        comm_now = int(reduce_floats(info, [float(method.comm_bytes())])[0])  # all ranks, cumulative

        test_loss = test_acc = None
        if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == epochs:
            te = time.perf_counter()
            shards, shard = method.eval_layout()
            l_sum, c_sum, n = method.evaluate(
                eval_batches(test_set, cfg.data.eval_batch_size, info.device, shards=shards, shard=shard))
            ev = torch.stack([l_sum.double(), c_sum.double(),
                              torch.tensor(float(n), dtype=torch.float64, device=info.device)])
            if shards > 1:
                all_reduce_(info, ev)
            l_tot, c_tot, n_tot = ev.tolist()
            if n_tot > 0:
                test_loss, test_acc = l_tot / n_tot, c_tot / n_tot
                best_acc = max(best_acc, test_acc)
            eval_time += time.perf_counter() - te

        last = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
        if owner:
            metrics.epoch(epoch=epoch + 1, step=step, phase=phase, lr=lr, train_loss=train_loss,
                          train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
                          epoch_time_s=dt, train_time_s=train_time, comm_bytes=comm_now,
                          reinit_time_s=reinit_time, **extras)
            test_txt = f" test {100 * test_acc:5.2f}%" if test_acc is not None else ""
            coupling_txt = ""
            if extras.get("residual"):
                coupling_txt = (f" beta {extras['beta']:.3g} residual "
                                + "/".join(f"{r:.3g}" for r in extras["residual"]))
            msg = (f"epoch {epoch + 1:>3}/{epochs} [{phase}] loss {train_loss:.4f} "
                   f"train {100 * train_acc:5.2f}%{test_txt} lr {lr:.4g}{coupling_txt} {dt:.1f}s")
            if bar.disable:
                log.info(msg)
            else:
                bar.write(msg)
    bar.close()
    metrics.close()

    # ---- accounting across ranks (after the loop, off the hot path)
    comm_total = int(reduce_floats(info, [float(method.comm_bytes())])[0])
    mem_slots = [0.0] * info.world_size
    mem_slots[info.rank] = float(peak_memory_bytes(info.device))
    mem_per_rank = [int(v) for v in reduce_floats(info, mem_slots)]
    state = method.model_state()  # collective for layer-parallel methods
    extras = method.summary_extras()  # collective
    summary = {
        "method": cfg.run.method, "model": cfg.model.name, "dataset": cfg.data.dataset,
        "world_size": info.world_size, "stages": cfg.dist.stages, "split": list(cfg.dist.split),
        "epochs": epochs, "steps": step,
        "final_test_acc": last["test_acc"], "best_test_acc": best_acc if best_acc >= 0 else None,
        "final_train_loss": last["train_loss"], "final_train_acc": last["train_acc"],
        "wall_time_s": time.perf_counter() - t_launch, "train_time_s": train_time,
        "eval_time_s": eval_time, "phase_times_s": phase_times, "comm_bytes": comm_total,
        "peak_memory_bytes": max(mem_per_rank), "peak_memory_bytes_per_rank": mem_per_rank,
        "torch_version": torch.__version__, "device": str(info.device), "backend": info.backend,
        "threads": torch.get_num_threads(), "seed": cfg.run.seed, "params": n_params,
        "aux_store_bytes": 0,
    }
    summary.update(extras)
    if owner:
        if state is not None:
            checkpoint.save_tensors(state, run_dir / "model.pt")
        checkpoint.write_json(summary, run_dir / "summary.json")
        log.info("done: final test %s, best %s, train time %.1fs (of %.1fs wall); wrote %s",
                 _pct(summary["final_test_acc"]), _pct(summary["best_test_acc"]), train_time,
                 summary["wall_time_s"], Path(run_dir) / "summary.json")
    return summary


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
