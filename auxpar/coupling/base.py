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
    """Base class; see :class:`auxpar.coupling.serial.SerialMethod` for the smallest example."""

    name = "base"
    log_rank = 0
    """The rank that owns the training loss and test accuracy and writes the run directory."""
    reduce_train_stats = False
    """True when every rank holds a share of the batch (data parallel): sum the epoch stats."""

    def __init__(self, cfg: Config, info: DistInfo, net: torch.nn.Module):
        self.cfg, self.info, self.net = cfg, info, net
        self.step_index = 0
        """Global step number (1-based) of the step being run; set by the trainer before each step."""
        self.poison = False
        """Fault injection (AUXPAR_FAULT=nan:RANK:STEP): the trainer sets it for one step on one rank;
        :meth:`finite_guard` then sees a NaN loss on this rank."""
        self.skipped_steps = 0
        """Steps dropped by ``--on-nan skip``."""
        self.amp = Precision(cfg, info.device)
        """Mixed precision / channels_last service (autocast, fp16 loss scaling); see
        :mod:`auxpar.precision` for the call sequence of a step."""

    # -- failure handling ---------------------------------------------------------------
    def stage_name(self, rank: int) -> str:
        """What ``rank`` computes, for error messages (e.g. 'stage 2 of 4 (blocks 5-7)')."""
        return "the whole network"

    def snapshot_buffers(self, module: torch.nn.Module) -> None:
        """Call at the start of a step: remember ``module``'s buffers (BN running statistics), so
        that a step the guard rejects leaves them as they were too (a NaN forward would otherwise
        poison them). One fused copy into preallocated storage; buffers are small."""
        bufs = list(module.buffers())
        saved = getattr(self, "_buf_saved", None)
        if saved is None or len(saved[1]) != len(bufs) or saved[0] is not module:
            self._buf_saved = (module, [b.detach().clone() for b in bufs])
        elif bufs:
            torch._foreach_copy_(self._buf_saved[1], [b.detach() for b in bufs])

    def _restore_buffers(self) -> None:
        saved = getattr(self, "_buf_saved", None)
        if saved is not None and saved[1]:
            with torch.no_grad():
                torch._foreach_copy_([b for b in saved[0].buffers()], saved[1])

    def finite_guard(self, *losses: torch.Tensor) -> bool:
        """Call before the optimizer step (and before any other state update of the step).

        Combines the finiteness of this rank's losses with every other rank's (one all-reduce
        over the whole job, one host read). Returns True when every rank's losses are finite.
        Otherwise, with ``run.on_nan = stop`` it raises one TrainingError (the same on every
        rank) naming the rank(s), their stage and the step; with ``skip`` it returns False and
        the method must drop this step (no optimizer step, no aux/multiplier update).
        ``finite_guard(x)`` is ``guard_wait(guard_post(x))``; post as soon as the loss exists
        and wait right before the step, so the all-reduce overlaps the backward pass.
        """
        return self.guard_wait(self.guard_post(*losses))

    def guard_post(self, *losses: torch.Tensor, overflow: torch.Tensor | None = None):
        """Start the guard's all-reduce for this rank's losses (asynchronous); see finite_guard.

        ``overflow``: this rank's fp16 overflow flag (``self.amp.unscale_(opt)``), or None. With
        one, the all-reduce carries 2W flags (W loss flags, then W overflow flags) and is posted
        even under ``--on-nan off``: an overflow anywhere skips the step on every rank."""
        import torch.distributed as tdist

        info = self.info
        if self.cfg.run.on_nan == "off" and not self.poison and overflow is None:
            return None
        W = info.world_size
        bad = torch.zeros(W if overflow is None else 2 * W, dtype=torch.float32, device=info.device)
        if self.cfg.run.on_nan != "off":
            vals = [torch.as_tensor(v, device=info.device).detach().float().reshape(-1) for v in losses]
            if vals:
                bad[info.rank] = (~torch.isfinite(torch.cat(vals))).any().float()
        if self.poison:
            bad[info.rank] = 1.0
        if overflow is not None:
            bad[W + info.rank] = overflow.detach().float().reshape(())
        work = tdist.all_reduce(bad, async_op=True) if info.distributed else None
        return bad, work

    def guard_wait(self, handle) -> bool:
        """Finish a :meth:`guard_post`; True when every rank's losses were finite."""
        from auxpar.errors import TrainingError

        if handle is None:
            return True
        bad, work = handle
        if work is not None:
            work.wait()
        flags = bad.tolist()  # the one host read of the guard
        W = self.info.world_size
        ranks = [r for r, f in enumerate(flags[:W]) if f > 0]
        if not ranks:
            if any(f > 0 for f in flags[W:]):
                # fp16 overflow on some rank: every rank skips this step (no error; the scale backs off)
                self.amp.overflow_steps += 1
                return False
            return True
        where = "; ".join(f"rank {r} ({self.stage_name(r)})" for r in ranks)
        self._restore_buffers()
        if self.cfg.run.on_nan == "skip":
            self.skipped_steps += 1
            return False
        err = TrainingError(
            f"non-finite loss at step {self.step_index} on {where}: every rank stopped before the "
            f"optimizer step, so the parameters are those of step {self.step_index - 1} and the last "
            f"checkpoint is intact. Lower the learning rate (now --lr {self.cfg.optim.lr}), clip gradients "
            "(--set optim.grad_clip=1.0), or pass --on-nan skip to drop such steps"
        )
        err.same_on_every_rank = True
        raise err

    def step_metrics(self) -> dict:
        """Per-step record fields (e.g. MGRIT iterations and residual norms). When non-empty the
        trainer writes a step record every step with these fields; keep it cheap."""
        return {}

    # -- layout -------------------------------------------------------------------------
    @classmethod
    def check_layout(cls, cfg: Config, info: DistInfo) -> None:
        """Raise DistributedError when the world size does not fit this method and config."""

    def sampler_layout(self) -> tuple[int, int]:
        """(num_replicas, replica_rank) for the training sampler."""
        return 1, 0

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
        raise NotImplementedError

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
        """The whole network's state_dict on ``log_rank`` (None elsewhere), for model.pt / export."""
        raise NotImplementedError

    def epoch_state(self) -> dict | None:
        """Within-epoch state a mid-epoch checkpoint needs (e.g. step counter and epoch
        accumulators that begin_epoch resets); tensors and plain containers only."""
        return None

    def load_epoch_state(self, state: dict | None) -> None:
        """Restore :meth:`epoch_state` after ``begin_epoch`` of a resumed, interrupted epoch."""

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
