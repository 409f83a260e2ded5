"""Training methods behind one small interface (:class:`auxpar.coupling.base.Method`).

One file per method. ``get_method(name)`` maps ``--method`` to its class; a new method
(penalty, al, mgrit, pipeline) registers itself in ``_REGISTRY`` and in ``config.METHODS``.
"""

from __future__ import annotations

from auxpar.coupling.base import Method, StepOut
from auxpar.coupling.layer_parallel import AugmentedLagrangianMethod, PenaltyMethod
from auxpar.coupling.mgrit import MgritMethod
from auxpar.coupling.pipeline import PipelineMethod
from auxpar.coupling.serial import DDPMethod, SerialMethod
from auxpar.errors import ConfigError

_REGISTRY: dict[str, type[Method]] = {
    "serial": SerialMethod,
    "ddp": DDPMethod,
    "penalty": PenaltyMethod,
    "al": AugmentedLagrangianMethod,
    "mgrit": MgritMethod,
    "pipeline": PipelineMethod,
}


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


__all__ = ["Method", "StepOut", "SerialMethod", "DDPMethod", "PenaltyMethod", "AugmentedLagrangianMethod",
           "PipelineMethod", "MgritMethod", "get_method"]
