"""Fault injection for the reliability tests: ``AUXPAR_FAULT=KIND:RANK:STEP[:always]``.

Kinds (``RANK:STEP`` alone means ``kill``):

* ``kill``  - the rank SIGKILLs itself right after finishing step STEP (a preempted node);
* ``raise`` - the rank raises an ordinary exception after step STEP (a bug on one rank);
* ``stall`` - the rank sleeps for an hour after step STEP (a hung rank: peers must time out);
* ``nan``   - the rank's loss is non-finite at step STEP (the NaN guard must stop every rank);
* ``ckpt``  - the rank that writes the checkpoint manifest dies between the data files and the
  manifest of the checkpoint taken at step STEP (atomicity).

A fault fires only in the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0 or
unset), so an elastic restart can get past it, unless ``:always`` is appended. Nothing here is
active unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from auxpar.errors import ConfigError

KINDS = ("kill", "raise", "stall", "nan", "ckpt")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int

    def hits(self, kind: str, rank: int, step: int) -> bool:
        return self.kind == kind and self.rank == rank and self.step == step


def parse(text: str | None) -> Fault | None:
    if not text:
        return None
    parts = text.strip().split(":")
    always = parts[-1] == "always"
    if always:
        parts = parts[:-1]
    if len(parts) == 2:
        parts = ["kill", *parts]
    if len(parts) != 3 or parts[0] not in KINDS or not parts[1].isdigit() or not parts[2].isdigit():
        raise ConfigError(f"AUXPAR_FAULT={text!r}: write KIND:RANK:STEP[:always] with KIND one of "
                          f"{', '.join(KINDS)} (or RANK:STEP for kill), e.g. AUXPAR_FAULT=kill:1:30")
    if not always and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return None
    return Fault(parts[0], int(parts[1]), int(parts[2]))


def from_env() -> Fault | None:
    return parse(os.environ.get("AUXPAR_FAULT"))


def after_step(fault: Fault | None, rank: int, step: int) -> None:
    """Fire a kill/raise/stall fault scheduled for (rank, step)."""
    if fault is None or fault.rank != rank or fault.step != step:
        return
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "raise":
        raise RuntimeError(f"injected failure (AUXPAR_FAULT) on rank {rank} after step {step}")
    if fault.kind == "stall":
        time.sleep(3600)
