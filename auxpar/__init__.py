"""auxpar: layer-parallel training of deep residual networks.

The network is cut into K stages, one per rank; stages are coupled through per-sample
auxiliary states (penalty / augmented Lagrangian) or solved by MGRIT over the layer grid.
Serial backprop and DDP live in the same tool so every speedup has its baseline.
"""

__version__ = "0.1.0"

from auxpar.errors import AuxparError, ConfigError, DataError  # noqa: E402,F401
