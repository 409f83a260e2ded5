"""Training methods behind one small interface (:class:`auxpar.coupling.base.Method`).

One file per method; each is registered once in :mod:`auxpar.registry` (name, class, process
layout, metrics keys, performance model), and ``get_method(name)`` maps ``--method`` to its
class through that registry, so a plugin's method is found the same way as a built-in one.
"""

from __future__ import annotations

from auxpar import registry
from auxpar.coupling.base import Method, StepOut


def get_method(name: str) -> type[Method]:
    """The class of a registered method (imported on first use)."""
    cls = registry.method(name).load()
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        from auxpar.errors import ConfigError

        raise ConfigError(f"method {name!r}: {registry.method(name).target} is not a subclass of "
                          "auxpar.coupling.base.Method")
    return cls


__all__ = ["Method", "StepOut", "get_method"]
