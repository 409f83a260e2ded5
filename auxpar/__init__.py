"""auxpar: layer-parallel training of deep residual networks.

The network is cut into K stages, one per rank; stages are coupled through per-sample
auxiliary states (penalty / augmented Lagrangian) or solved by MGRIT over the layer grid.
Serial backprop and DDP live in the same tool so every speedup has its baseline.

Python API (docs/api.md)::

    import auxpar

    net = auxpar.staged_net(stem, blocks, head, input_shape=(1, 8, 8))   # or a factory function
    data = auxpar.TensorData(x_train, y_train, x_test, y_test)
    summary = auxpar.train(model=net, data=data, method="penalty", stages=2, epochs=5, out="runs/x")
"""

__version__ = "0.1.0"

from auxpar.errors import AuxparError, ConfigError, DataError, DistributedError, TrainingError  # noqa: E402,F401

# The public API, imported on first use: `import auxpar` (and so the CLI) stays free of torch.
_LAZY = {
    "train": ("auxpar.api", "train"),
    "load_run": ("auxpar.api", "load_run"),
    "staged_net": ("auxpar.models.staged", "staged_net"),
    "StagedNet": ("auxpar.models.staged", "StagedNet"),
    "ResidualBlock": ("auxpar.models.staged", "ResidualBlock"),
    "TensorData": ("auxpar.data.tensors", "TensorData"),
    "build_model": ("auxpar.models", "build_model"),
    "load_model": ("auxpar.export", "load_model"),
}

__all__ = ["__version__", "AuxparError", "ConfigError", "DataError", "DistributedError", "TrainingError",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'auxpar' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
