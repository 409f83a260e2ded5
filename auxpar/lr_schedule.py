"""Learning-rate schedules (``optim.lr_schedule``) over the global epoch count.

The schedule is a pure function of the (fractional) global epoch, so it is the same for every
method and every phase: a run that alternates parallel and serial phases (SPH, later) follows
exactly the learning-rate curve of the serial baseline with the same epoch budget, and a
resumed run needs no schedule state beyond the epoch and step counters.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auxpar.config import OptimConfig


def lr_at(opt: "OptimConfig", epoch: float, total_epochs: float) -> float:
    """Learning rate at fractional epoch ``epoch`` (0 <= epoch <= total_epochs; the total is
    fractional when run.max_steps ends the run inside an epoch).

    * constant: ``lr``
    * step: ``lr * gamma ** floor(epoch / step_size)``
    * multistep: ``lr * gamma ** (number of milestones <= epoch)`` (the WRN recipe: x0.2 at 60/120/160)
    * cosine: ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / total)) / 2``

    A linear warm-up from lr/10 over ``warmup_epochs`` multiplies any of them.
    """
    base = opt.lr
    if opt.lr_schedule == "constant":
        lr = base
    elif opt.lr_schedule == "step":
        lr = base * opt.gamma ** math.floor(epoch / opt.step_size)
    elif opt.lr_schedule == "multistep":
        # Milestones are whole epochs: the drop applies from the first step of that epoch.
        lr = base * opt.gamma ** sum(1 for m in opt.milestones if math.floor(epoch + 1e-9) >= m)
    elif opt.lr_schedule == "cosine":
        t = min(max(epoch / total_epochs, 0.0), 1.0) if total_epochs > 0 else 1.0
        lr = opt.min_lr + (base - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # validated in OptimConfig
        raise ValueError(opt.lr_schedule)
    if opt.warmup_epochs > 0 and epoch < opt.warmup_epochs:
        lr *= 0.1 + 0.9 * epoch / opt.warmup_epochs
    return lr
