"""Learning-rate schedules over the global epoch count.

The schedule is a pure function of the (fractional) global epoch, so it is the same for every
method and every phase: a run that alternates parallel and serial phases (SPH, later) follows
exactly the learning-rate curve of the serial baseline with the same epoch budget, and a
resumed run needs no schedule state beyond the epoch and step counters.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from auxpar.errors import ConfigError

if TYPE_CHECKING:
    from auxpar.config import CouplingConfig, OptimConfig

PHASES = ("parallel", "serial")


def lr_at(opt: "OptimConfig", epoch: float, total_epochs: int) -> float:
    """Learning rate at fractional epoch ``epoch`` (0 <= epoch <= total_epochs).

    * constant: ``lr``
    * step: ``lr * gamma ** floor(epoch / step_size)``
    * multistep: ``lr * gamma ** (number of milestones <= epoch)`` (the WRN recipe: x0.2 at 60/120/160)
    * cosine: ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / total)) / 2``

    A linear warm-up from lr/10 over ``warmup_epochs`` multiplies any of them.
    """
    base = opt.lr
    if opt.schedule == "constant":
        lr = base
    elif opt.schedule == "step":
        lr = base * opt.gamma ** math.floor(epoch / opt.step_size)
    elif opt.schedule == "multistep":
        # Milestones are whole epochs: the drop applies from the first step of that epoch.
        lr = base * opt.gamma ** sum(1 for m in opt.milestones if math.floor(epoch + 1e-9) >= m)
    elif opt.schedule == "cosine":
        t = min(max(epoch / max(total_epochs, 1), 0.0), 1.0)
        lr = opt.min_lr + (base - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # validated in OptimConfig
        raise ValueError(opt.schedule)
    if opt.warmup_epochs > 0 and epoch < opt.warmup_epochs:
        lr *= 0.1 + 0.9 * epoch / opt.warmup_epochs
    return lr


def parse_phases(text: str) -> list[tuple[str, int]]:
    """Parse an SPH schedule such as ``"parallel:8,serial:2"`` into [("parallel", 8), ("serial", 2)].

    A bare phase name means one epoch of it. The list repeats until the run's epochs are used.
    """
    phases = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        name = name.strip()
        if name not in PHASES:
            raise ConfigError(
                f"coupling.schedule {text!r}: unknown phase {name!r}; write phases as parallel:N,serial:M"
            )
        try:
            n = int(count) if count.strip() else 1
        except ValueError:
            raise ConfigError(f"coupling.schedule {text!r}: {item!r} needs a whole number of epochs, e.g. parallel:8") from None
        if n < 1:
            raise ConfigError(f"coupling.schedule {text!r}: {item!r} must last at least 1 epoch")
        phases.append((name, n))
    if not phases:
        raise ConfigError("coupling.schedule is empty; give phases such as parallel:8,serial:2")
    return phases


def phase_at(phases: list[tuple[str, int]], epoch: int) -> str:
    """Phase of global epoch ``epoch`` (0-based) when ``phases`` repeats forever."""
    cycle = sum(n for _, n in phases)
    pos = epoch % cycle
    for name, n in phases:
        if pos < n:
            return name
        pos -= n
    raise AssertionError("unreachable")  # pragma: no cover


def beta_at(c: "CouplingConfig", epoch: int) -> float:
    """beta of global epoch ``epoch``: rho * rho_growth**epoch, capped at rho_max."""
    return min(c.rho * c.rho_growth ** epoch, c.rho_max)
