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

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError
