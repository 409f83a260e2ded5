"""The interface every training method implements.

The trainer owns the loop (epochs, batches, learning rate, evaluation, logging); a method owns
the parameters on this rank and what one training step means. Data flows one way::

    Batch(idx, x, y) on device -> method.train_step(batch, phase) -> StepOut(loss, correct, count)

``idx`` are dataset sample ids; layer-parallel methods key their per-sample auxiliary states on
them. ``StepOut`` holds device tensors and is never read on the host inside the loop, so a step
costs no host-device synchronization; the trainer sums them and reads the sums once per epoch
(or every ``log_every`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from auxpar.config import Config
from auxpar.coupling.guard import NanGuard
from auxpar.distributed import DistInfo
from auxpar.precision import Precision


@dataclass
class StepOut:
    loss: torch.Tensor
    """Mean training loss over this rank's batch (0-dim, detached, on device)."""
    correct: torch.Tensor
    """Number of correct predictions in this rank's batch (0-dim, on device)."""
    count: int
    """Samples in this rank's batch."""


class Method:
    """The hooks the trainer calls; see :class:`auxpar.coupling.serial.SerialMethod` for the smallest example.

    Services a method *has* (composed, not inherited): ``self.amp`` (mixed precision,
    :mod:`auxpar.precision`), ``self.guard`` (the cross-rank NaN guard and the BN snapshot it
    restores, :mod:`auxpar.coupling.guard`), and, for methods with stages, a ``Clock``
    (:mod:`auxpar.timing`) and the ``P2P`` primitive that counts the bytes it sends
    (:mod:`auxpar.coupling.comm`). Gradient clipping and the optimizer are
    :mod:`auxpar.coupling.optim`. What every staged method does alike (layer-serial evaluation,
    the model.pt gather, the epoch-end barrier) is :class:`auxpar.coupling.stages.StagedMethod`.
    """

    name = "base"
    log_rank = 0
    """The rank that owns the training loss and test accuracy and writes the run directory."""

    def __init__(self, cfg: Config, info: DistInfo, net: torch.nn.Module):
        self.cfg, self.info, self.net = cfg, info, net
        self.amp = Precision(cfg, info.device)
        """Mixed precision / channels_last service (autocast, fp16 loss scaling); see
        :mod:`auxpar.precision` for the call sequence of a step."""
        self.guard = NanGuard(cfg, info, self.amp, self.stage_name)
        """The NaN guard (post / wait / check) and the BN buffer snapshot; see :mod:`auxpar.coupling.guard`."""
        self.opt: torch.optim.Optimizer | None = None
        """This rank's optimizer (the subclass builds it); :meth:`set_lr` drives it."""

    # -- what the trainer sets and reads around a step (kept by the guard) ------------------
    @property
    def step_index(self) -> int:
        """Global step number (1-based) of the step being run; set by the trainer before each step."""
        return self.guard.step_index

    @step_index.setter
    def step_index(self, value: int) -> None:
        self.guard.step_index = value

    @property
    def poison(self) -> bool:
        """Fault injection (AUXPAR_FAULT=nan:RANK:STEP): the trainer sets it for one step on one
        rank; the guard then sees a NaN loss on this rank."""
        return self.guard.poison

    @poison.setter
    def poison(self, value: bool) -> None:
        self.guard.poison = value

    @property
    def skipped_steps(self) -> int:
        """Steps dropped by ``--on-nan skip``."""
        return self.guard.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.guard.skipped_steps = value

    # -- layout -------------------------------------------------------------------------
    @classmethod
    def check_layout(cls, cfg: Config, info: DistInfo) -> None:
        """Raise DistributedError when the world size does not fit this method and config."""

    def stage_name(self, rank: int) -> str:
        """What ``rank`` computes, for error messages (e.g. 'stage 2 of 4 (blocks 5-7)')."""
        return "the whole network"

    def sampler_layout(self) -> tuple[int, int]:
        """(num_replicas, replica_rank) for the training sampler."""
        return 1, 0

    def sampler_strata(self) -> int:
        """The training sampler's strata (``data.strata``; auxpar/data/loader.py); 1 by default."""
        return self.cfg.data.strata or 1

    def eval_layout(self) -> tuple[int, int]:
        """(num_shards, shard) of the test set this rank evaluates."""
        return 1, 0

    def phase(self, epoch: int) -> str:
        """Phase name of this epoch ('serial' or 'parallel'); decides augmentation too."""
        return "serial"

    def uses_augmentation(self, phase: str) -> bool:
        return True

    # -- set-up and per-epoch hooks -------------------------------------------------------
    def prepare(self, train_set) -> None:
        """Called once with the training set (layer-parallel methods size their aux store here)."""

    def begin_epoch(self, epoch: int, phase: str) -> dict[str, float]:
        """Called before an epoch's first step; returns {phase_name: seconds} of extra work done
        (e.g. {"reinit": 1.2} for an aux-state re-initialization), which counts as training time."""
        return {}

    # -- training -----------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group of ``self.opt``."""
        for g in self.opt.param_groups:
            g["lr"] = lr

    def train_step(self, batch, phase: str, next_idx=None) -> StepOut:
        """One step on ``batch``; ``next_idx`` (sample ids of the next batch of this epoch, or None)
        lets a method post communication for the next step early."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        """Called after the last step of an epoch (flush pending communication, sync the device)."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss_sum, correct, count) over ``batches`` on this rank."""
        raise NotImplementedError

    def reduce_epoch_stats(self, stats: torch.Tensor) -> bool:
        """Combine the epoch sums of the ranks in place (``stats``: loss x count, correct, count,
        first step's loss x count, its count) so that ``log_rank`` holds the job's; True when
        every rank then holds them. Default: left alone (the log rank's own numbers are the
        job's); data-parallel methods sum them over their replicas."""
        return False

    def logged_loss(self, out: StepOut) -> float:
        """The training loss a step record shows (read on every rank at logged steps only; a
        collective where the step's loss is spread over data-parallel replicas)."""
        return float(out.loss)

    def step_metrics(self) -> dict:
        """Per-step record fields (e.g. MGRIT iterations and residual norms). When non-empty the
        trainer writes a step record every step with these fields; keep it cheap."""
        return {}

    # -- accounting and state -----------------------------------------------------------
    def comm_bytes(self) -> int:
        """Bytes this rank sent to other ranks so far."""
        return 0

    def epoch_metrics(self) -> dict:
        """Extra per-epoch record fields (a collective: every rank calls it)."""
        return {}

    def summary_extras(self) -> dict:
        """Extra summary.json fields (a collective: every rank calls it)."""
        return {}

    def model_state(self) -> dict | None:
        """The whole network's state_dict on ``log_rank`` (None elsewhere), for model.pt / export.
        A collective where the network is split over ranks. Default: one rank holds it all."""
        return self.local_model_state() if self.info.rank == self.log_rank else None

    def local_model_state(self) -> dict:
        """This rank's share of the whole network's state_dict, with the whole network's key
        names (``blocks.<global index>...``), on CPU; {} when another rank holds the same tensors
        (data-parallel replicas). Merging every rank's dict gives the full model (export)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything this rank needs to continue bitwise-identically: parameters and buffers,
        optimizer state, and method state (aux states, multipliers, beta, warm-start states,
        counters). Tensors and plain containers only (loaded with weights_only=True)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def epoch_state(self) -> dict | None:
        """Within-epoch state a mid-epoch checkpoint needs (e.g. step counter and epoch
        accumulators that begin_epoch resets); tensors and plain containers only."""
        return None

    def load_epoch_state(self, state: dict | None) -> None:
        """Restore :meth:`epoch_state` after ``begin_epoch`` of a resumed, interrupted epoch."""
