"""Checkpoints of a training run and exact resume.

What a checkpoint holds, per rank (``RUN/checkpoints/step-N/rank-R.pt``):

* ``method``: the method's state_dict: this rank's parameters and buffers, optimizer state
  (momentum), and method state (aux states and multipliers in their storage dtype, beta,
  MGRIT warm-start states...);
* ``loop``: the trainer's counters: epoch and position in it (the sampler position), global
  step, the partial epoch's loss/accuracy accumulators, train/eval time, phase times, best
  accuracy, and the method's within-epoch state;
* ``rng``: torch (and CUDA), numpy and Python RNG states of this rank;
* ``model``: this rank's share of the whole network's state_dict with global key names, so
  ``auxpar export`` can assemble an ordinary model file from the checkpoint alone.

The learning rate is a function of (epoch, position), and the augmentation stream is seeded
by (seed, epoch, batch position), so neither needs state. ``manifest.json`` is written last by
rank 0, after every rank has written and fsync'ed its file (and reported its size and SHA-256):
its presence marks the checkpoint complete. Resuming checks the manifest against this run
(method, model, dataset, stages, data-parallel degree, world size) and each file's checksum
before anything in the run directory is touched.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from auxpar import checkpoint, faults
from auxpar.config import Config, parse_every
from auxpar.distributed import DistInfo, barrier, reduce_floats
from auxpar.errors import ConfigError

log = logging.getLogger("auxpar")

MODEL_FORMAT = "auxpar-model/1"


# --------------------------------------------------------------------------- loop state

@dataclass
class LoopState:
    epoch: int = 0
    """Epoch of the next step."""
    position: int = 0
    """Batches of ``epoch`` already done."""
    step: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0
    reinit_time: float = 0.0
    epoch_time: float = 0.0
    """Seconds of this epoch's steps already done (before a mid-epoch checkpoint)."""
    phase_times: dict = field(default_factory=dict)
    best_acc: float = -1.0
    last: dict = field(default_factory=lambda: {"train_loss": float("nan"), "train_acc": float("nan"),
                                                "test_acc": None})
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    first: torch.Tensor | None = None
    """(loss * count, count) of the epoch's first step, on the device: read with the epoch sums."""
    seen: int = 0
    method_epoch_state: dict | None = None
    resumed_from: int | None = None

    def new_epoch(self, device, reinit_time: float) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.first = torch.zeros(2, dtype=torch.float64, device=device)
        self.seen = 0
        self.reinit_time = reinit_time
        self.epoch_time = 0.0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "position": self.position, "step": self.step,
            "train_time": self.train_time, "eval_time": self.eval_time, "reinit_time": self.reinit_time,
            "epoch_time": self.epoch_time,
            "phase_times": dict(self.phase_times), "best_acc": self.best_acc, "last": dict(self.last),
            "loss_sum": None if self.loss_sum is None else self.loss_sum.detach().cpu(),
            "correct": None if self.correct is None else self.correct.detach().cpu(),
            "first": None if self.first is None else self.first.detach().cpu(),
            "seen": self.seen, "method_epoch_state": self.method_epoch_state,
        }

    def load(self, s: dict, device) -> None:
        self.epoch, self.position, self.step = int(s["epoch"]), int(s["position"]), int(s["step"])
        self.train_time, self.eval_time = float(s["train_time"]), float(s["eval_time"])
        self.reinit_time = float(s["reinit_time"])
        self.epoch_time = float(s["epoch_time"])
        self.phase_times, self.best_acc, self.last = dict(s["phase_times"]), float(s["best_acc"]), dict(s["last"])
        self.loss_sum = None if s["loss_sum"] is None else s["loss_sum"].to(device)
        self.correct = None if s["correct"] is None else s["correct"].to(device)
        first = s.get("first")  # absent in checkpoints of auxpar before 0.x: the epoch's first step is lost
        self.first = first.to(device) if first is not None else torch.zeros(2, dtype=torch.float64, device=device)
        self.seen = int(s["seen"])
        self.method_epoch_state = s["method_epoch_state"]
        self.resumed_from = self.step


# --------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    version, inner, gauss = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": version, "state": list(inner), "gauss": gauss},
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`. The generator states must be CPU ByteTensors (``.cpu()`` is a
    no-op for a checkpoint loaded with map_location="cpu", as :func:`load_rank_state` does).
    The CUDA generator of ``device`` is restored when the checkpoint has it (written on CUDA)."""
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


# --------------------------------------------------------------------------- finding a checkpoint

@dataclass
class Resume:
    path: Path
    manifest: dict


def _restart_count() -> int:
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def resolve_resume(cfg: Config, run_dir: Path, info: DistInfo) -> Resume | None:
    """The checkpoint this run continues from, or None to start fresh.

    ``run.resume``: "" (fresh; but under a torchrun restart the run's latest checkpoint is
    resumed automatically), "latest" (the run directory's latest complete checkpoint; fresh if
    there is none yet), or a checkpoint directory / another run directory."""
    want = cfg.run.resume
    if not want and _restart_count() > 0:
        want = "latest"
        if info.rank == 0:
            log.info("torchrun restart %d: resuming from the latest complete checkpoint", _restart_count())
    if not want:
        return None
    if want == "latest":
        path = checkpoint.latest_checkpoint(run_dir)
        if path is None:
            if info.rank == 0:
                log.info("--resume latest: %s has no complete checkpoint yet; starting from the beginning",
                         checkpoint.ckpt_root(run_dir))
            return None
    else:
        path = Path(want)
        if not path.exists():
            raise ConfigError(f"--resume {want}: no such checkpoint or run directory; give a checkpoint "
                              f"directory (RUN/checkpoints/step-N) or a run directory, or 'latest'")
        if (path / "checkpoints").is_dir() or (path / "config.toml").is_file():
            found = checkpoint.latest_checkpoint(path)
            if found is None:
                raise ConfigError(f"--resume {want}: the run directory has no complete checkpoint "
                                  "(train with --checkpoint-every N to write them)")
            path = found
    man = checkpoint.read_manifest(path)
    if man is None:
        raise ConfigError(
            f"--resume: {path} is not a complete auxpar checkpoint (manifest.json missing, unreadable, "
            "or a listed file is missing or has the wrong size); use --resume latest to pick the newest "
            "complete one")
    return Resume(path, man)


def run_meta(cfg: Config, info: DistInfo) -> dict:
    return {"method": cfg.run.method, "model": cfg.model.name, "dataset": cfg.data.dataset,
            "stages": cfg.dist.stages, "dp": cfg.dist.dp, "world_size": info.world_size,
            "split": list(cfg.dist.split), "batch_size": cfg.data.batch_size, "seed": cfg.run.seed,
            "norm": cfg.model.norm, "stage_input": cfg.coupling.stage_input,
            "split_blocks": sorted(cfg.model.split_blocks)}


def check_compatible(man: dict, cfg: Config, info: DistInfo, path: Path) -> None:
    have = man.get("meta", {})
    now = run_meta(cfg, info)
    diffs = []
    for key, flag in (("method", "--method"), ("model", "--model"), ("dataset", "--dataset"),
                      ("stages", "--stages"), ("dp", "--dp"), ("world_size", "processes"),
                      ("batch_size", "--batch-size"), ("norm", "--norm")):
        if have.get(key) != now[key]:
            diffs.append(f"{flag} {have.get(key)} (checkpoint) vs {now[key]} (this run)")
    if cfg.run.method in ("penalty", "al") and have.get("stage_input", "aux") != now["stage_input"]:
        diffs.append(f"--stage-input {have.get('stage_input', 'aux')} (checkpoint) vs {now['stage_input']} (this run)")
    if list(have.get("split_blocks", [])) != now["split_blocks"]:
        diffs.append(f"--split-blocks {have.get('split_blocks', [])} (checkpoint) vs {now['split_blocks']} (this run)")
    if now["split"] and have.get("split") and list(have["split"]) != now["split"]:
        diffs.append(f"--split {have['split']} (checkpoint) vs {now['split']} (this run)")
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: it was written by a different run ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another --out")


def load_rank_state(res: Resume, info: DistInfo) -> dict:
    name = checkpoint.rank_file(res.path, info.rank).name
    meta = res.manifest["files"].get(name)
    f = res.path / name
    if meta is None:
        raise ConfigError(f"checkpoint {res.path} has no file for rank {info.rank}; it is not from this run")
    digest = checkpoint.sha256_file(f)
    if digest != meta.get("sha256"):
        raise ConfigError(
            f"checkpoint file {f} does not match its manifest (SHA-256 {digest[:12]}... vs "
            f"{str(meta.get('sha256'))[:12]}...): it is corrupt or was replaced. Resume from an older "
            "checkpoint (--resume RUN/checkpoints/step-N) or start over with --overwrite")
    # Always to the CPU first: the RNG states must stay CPU ByteTensors (torch.set_rng_state and
    # torch.cuda.set_rng_state reject anything else), and the method's load_state_dict copies or
    # moves the rest onto its device itself (module/optimizer load_state_dict, AuxStore.copy_,
    # .to(device) for the accumulators).
    state = checkpoint.load_tensors(f, map_location="cpu")
    if not isinstance(state, dict) or state.get("rank") != info.rank or "method" not in state:
        raise ConfigError(f"checkpoint file {f} is not an auxpar rank-{info.rank} checkpoint")
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records written after ``step`` (the crashed attempt's tail), atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed writer
        if rec.get("step") is not None and rec["step"] <= step:
            keep.append(line)
    checkpoint.write_text("".join(x + "\n" for x in keep), path)


# --------------------------------------------------------------------------- saving

class CheckpointSaver:
    """Writes checkpoints at the configured cadence (a collective: every rank calls save)."""

    def __init__(self, cfg: Config, info: DistInfo, method, run_dir: Path, steps_per_epoch: int,
                 fault: faults.Fault | None = None, arch: dict | None = None):
        self.cfg, self.info, self.method, self.run_dir = cfg, info, method, Path(run_dir)
        self.arch = dict(arch or {})
        self.unit, self.every = parse_every(cfg.run.checkpoint_every)
        self.steps_per_epoch = steps_per_epoch
        self.fault = fault
        self.last_bytes = 0
        self.total_time = 0.0

    def due_step(self, step: int) -> bool:
        return self.unit == "steps" and step % self.every == 0

    def due_epoch(self, epochs_done: int, step: int) -> bool:
        if self.unit == "epochs":
            return epochs_done % self.every == 0
        # step cadence: a due step that fell on the epoch's last batch is saved after evaluation
        return self.unit == "steps" and step % self.every == 0

    def save(self, loop: LoopState) -> Path:
        t0 = time.perf_counter()
        info = self.info
        d = checkpoint.ckpt_dir(self.run_dir, loop.step)
        state = {"rank": info.rank, "method": self.method.state_dict(), "loop": loop.state_dict(),
                 "rng": rng_state(info.device), "model": self.method.local_model_state()}
        f = checkpoint.rank_file(d, info.rank)
        checkpoint.save_tensors(state, f)
        size = f.stat().st_size
        digest = checkpoint.sha256_file(f)
        # Every rank reports its file (size, and the checksum as 8 float64 words of 32 bits each).
        w = info.world_size
        slots = [0.0] * (w * 9)
        slots[info.rank * 9] = float(size)
        for i in range(8):
            slots[info.rank * 9 + 1 + i] = float(int(digest[8 * i: 8 * i + 8], 16))
        allv = reduce_floats(info, slots)  # also the barrier: every rank's file is complete
        if self.fault is not None and self.fault.hits("ckpt", info.rank, loop.step):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # die between the data files and the manifest
        if info.rank == 0:
            files = {}
            for r in range(w):
                words = allv[r * 9 + 1: r * 9 + 9]
                files[checkpoint.rank_file(d, r).name] = {
                    "bytes": int(allv[r * 9]), "sha256": "".join(f"{int(x):08x}" for x in words)}
            man = {"format": checkpoint.CKPT_FORMAT, "step": loop.step, "epoch": loop.epoch,
                   "position": loop.position, "meta": run_meta(self.cfg, info), "files": files,
                   "arch": self.arch, "test_acc": loop.last.get("test_acc"),
                   "residual_step": residual_step(self.cfg),
                   "bytes": int(sum(allv[r * 9] for r in range(w))),
                   "torch_version": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            checkpoint.write_json(man, d / checkpoint.MANIFEST)
            checkpoint.prune_checkpoints(self.run_dir, self.cfg.run.keep)
        barrier(info)  # the manifest exists before anyone moves on
        self.last_bytes = int(sum(allv[r * 9] for r in range(w)))
        self.total_time += time.perf_counter() - t0
        if info.rank == self.method.log_rank:
            log.info("checkpoint %s: %.1f MB on %d rank(s) in %.2fs", d, self.last_bytes / 1e6, w,
                     time.perf_counter() - t0)
        return d


# --------------------------------------------------------------------------- model file

def residual_step(cfg: Config) -> float:
    """The residual step h the method trained the network with (its registry ``model_step``;
    1.0, the standard ResNet, for every built-in method but MGRIT with mgrit.step != 1)."""
    from auxpar import registry

    f = registry.method(cfg.run.method).model_step
    return float(f(cfg)) if f is not None else 1.0


def model_file(arch: dict, cfg: Config, state_dict: dict, test_acc, step: int) -> dict:
    """An ordinary model file: load with ``torch.load(f, weights_only=True)`` and
    ``auxpar.models.build_model(**arch)`` (see :func:`auxpar.export.load_model`)."""
    return {"format": MODEL_FORMAT, "arch": dict(arch), "residual_step": residual_step(cfg), "dataset": cfg.data.dataset,
            "method": cfg.run.method, "stages": cfg.dist.stages, "step": step,
            "test_acc": test_acc, "state_dict": state_dict}
