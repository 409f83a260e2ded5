"""SPH phases (``coupling.phases`` / ``mgrit.phases``): which epochs train the stages in
parallel and which run ordinary serial backprop over the ranks, and the penalty's beta per
epoch. Imports nothing of auxpar but its errors, so the config can validate phase lists
without an import circle."""

from __future__ import annotations

from typing import Any

from auxpar.errors import ConfigError

PHASES = ("parallel", "serial")


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
                f"coupling.phases {text!r}: unknown phase {name!r}; write phases as parallel:N,serial:M"
            )
        try:
            n = int(count) if count.strip() else 1
        except ValueError:
            raise ConfigError(f"coupling.phases {text!r}: {item!r} needs a whole number of epochs, e.g. parallel:8") from None
        if n < 1:
            raise ConfigError(f"coupling.phases {text!r}: {item!r} must last at least 1 epoch")
        phases.append((name, n))
    if not phases:
        raise ConfigError("coupling.phases is empty; give phases such as parallel:8,serial:2")
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


def beta_at(c: Any, epoch: int) -> float:
    """beta of global epoch ``epoch`` for a CouplingConfig ``c``: rho * rho_growth**epoch, capped at rho_max."""
    return min(c.rho * c.rho_growth ** epoch, c.rho_max)
