"""The cross-rank NaN guard of a training step, and the BN buffer snapshot it restores.

A service every method *has* (``method.guard``), not part of the method interface. Call
sequence of one step (see :mod:`auxpar.precision` for the fp16 variant)::

    guard.snapshot(stage)                      # start of the step: BN running statistics
    ...forward, loss...
    handle = guard.post(loss)                  # async all-reduce of W flags, overlaps backward
    ...backward...
    if guard.wait(handle):                     # one host read; the same verdict on every rank
        clip, optimizer step, aux / multiplier updates
    # else: the step is dropped on every rank (BN buffers restored); or TrainingError was raised

``guard.check(*losses)`` is ``wait(post(*losses))``.

Inputs the trainer sets through the method (``method.step_index``, ``method.poison``; the
method forwards them here): the step number for the message, and the fault injection
``AUXPAR_FAULT=nan:RANK:STEP``, which makes this rank's loss read as non-finite for one step.
Output: ``skipped_steps``, the steps dropped by ``--on-nan skip``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as tdist

from auxpar.config import Config
from auxpar.distributed import DistInfo
from auxpar.errors import TrainingError
from auxpar.precision import Precision


class NanGuard:
    """``describe(rank)`` names what a rank computes, for the error message (the method's
    ``stage_name``)."""

    def __init__(self, cfg: Config, info: DistInfo, amp: Precision, describe: Callable[[int], str]):
        self.cfg, self.info, self.amp, self.describe = cfg, info, amp, describe
        self.step_index = 0
        """Global step number (1-based) of the step being run; set by the trainer before each step."""
        self.poison = False
        """Fault injection (AUXPAR_FAULT=nan:RANK:STEP): set for one step on one rank; :meth:`post`
        then sees a NaN loss on this rank."""
        self.skipped_steps = 0
        """Steps dropped by ``--on-nan skip``."""
        self._saved: tuple[torch.nn.Module, list[torch.Tensor]] | None = None

    # ---- the BN snapshot ------------------------------------------------------------------
    def snapshot(self, module: torch.nn.Module) -> None:
        """Call at the start of a step: remember ``module``'s buffers (BN running statistics), so
        that a step the guard rejects leaves them as they were too (a NaN forward would otherwise
        poison them). One fused copy into preallocated storage; buffers are small."""
        bufs = list(module.buffers())
        saved = self._saved
        if saved is None or len(saved[1]) != len(bufs) or saved[0] is not module:
            self._saved = (module, [b.detach().clone() for b in bufs])
        elif bufs:
            torch._foreach_copy_(saved[1], [b.detach() for b in bufs])

    def restore(self) -> None:
        """Put back the buffers of the last :meth:`snapshot` (the guard does it on a rejected step)."""
        saved = self._saved
        if saved is not None and saved[1]:
            with torch.no_grad():
                torch._foreach_copy_([b for b in saved[0].buffers()], saved[1])

    # ---- the guard --------------------------------------------------------------------------
    def check(self, *losses: torch.Tensor) -> bool:
        """Call before the optimizer step (and before any other state update of the step).

        Combines the finiteness of this rank's losses with every other rank's (one all-reduce
        over the whole job, one host read). Returns True when every rank's losses are finite.
        Otherwise, with ``run.on_nan = stop`` it raises one TrainingError (the same on every
        rank) naming the rank(s), their stage and the step; with ``skip`` it returns False and
        the method must drop this step (no optimizer step, no aux/multiplier update).
        ``check(x)`` is ``wait(post(x))``; post as soon as the loss exists and wait right
        before the step, so the all-reduce overlaps the backward pass.
        """
        return self.wait(self.post(*losses))

    def post(self, *losses: torch.Tensor, overflow: torch.Tensor | None = None):
        """Start the guard's all-reduce for this rank's losses (asynchronous); see :meth:`check`.

        ``overflow``: this rank's fp16 overflow flag (``amp.unscale_(opt)``), or None. With
        one, the all-reduce carries 2W flags (W loss flags, then W overflow flags) and is posted
        even under ``--on-nan off``: an overflow anywhere skips the step on every rank."""
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

    def wait(self, handle) -> bool:
        """Finish a :meth:`post`; True when every rank's losses were finite."""
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
        where = "; ".join(f"rank {r} ({self.describe(r)})" for r in ranks)
        self.restore()
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
