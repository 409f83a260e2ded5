"""One registry for training methods and one for datasets.

A method is its module plus one :func:`register_method` call; a dataset is its loader plus one
:func:`register_dataset` call. Everything that lists or dispatches on methods or datasets reads
these registries: the CLI choices, config validation and the dataset recipes, ``auxpar study``
expansion, the metrics schema, ``auxpar plan``, the performance model and the experiment
scripts. The built-ins are registered at the bottom of this module; targets are
``"module:attribute"`` strings imported on first use, so listing names imports no torch code.

Your own method or dataset lives in your own module::

    # my_plugin.py
    from auxpar.registry import register_method, register_dataset
    register_method("toy", "my_plugin:ToyMethod", layout="single", description="...")
    register_dataset("toy-data", "my_plugin:load_toy", geometry=(1, 8, 3, 96, 32))

and is loaded by name: ``auxpar train --plugin my_plugin --method toy``, ``[run] plugins =
["my_plugin"]`` in a config or study file (the setting travels to every rank and every study
run), or ``AUXPAR_PLUGINS=my_plugin`` in the environment.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from auxpar.errors import ConfigError

LAYOUTS = ("single", "replicas", "stages")
"""How a method uses processes: ``single`` one process; ``replicas`` K data-parallel ranks
(``dist.stages`` stays 1, K = world size); ``stages`` one process per stage (times
``dist.dp`` replicas where the method supports it), started automatically outside torchrun."""

PLUGINS_ENV = "AUXPAR_PLUGINS"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    target: str
    """``"module:Class"`` of the :class:`auxpar.coupling.base.Method` subclass."""
    layout: str
    description: str = ""
    epoch_keys: tuple[str, ...] = ()
    """Per-epoch metrics fields the method adds (``epoch_metrics()`` keys) beyond the common ones."""
    step_keys: tuple[str, ...] = ()
    """Per-step metrics fields the method adds (``step_metrics()`` keys)."""
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    """``run.precision`` values the method supports."""
    precision_note: str = ""
    """Why a precision is missing (the error message's reason)."""
    phases_key: str = "coupling.phases"
    """The config key the ``--phases`` flag (SPH phase list) sets for this method."""
    perf: str = ""
    """``"module:function"`` of its performance-model predictor (``auxpar model-perf``); empty =
    the model has no formula for it (model-perf lists it as not modelled)."""
    model_step: Callable[[Any], float] | None = None
    """The residual step h of the trained network, from the config (model.pt records it);
    None = 1.0 (the standard ResNet)."""

    def load(self) -> type:
        return load_target(self.target, f"method {self.name!r}")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: str
    """``"module:function"``; called as ``loader(split, data_dir=, download=, seed=, synthetic=)``
    (accept ``**kwargs`` and ignore what you do not need) and returns an
    :class:`auxpar.data.ImageDataset`."""
    geometry: tuple[int, int, int, int, int] | None = None
    """(channels, image size, classes, train samples, test samples), known without loading the
    data (``auxpar plan``); None = it comes from the config (synthetic)."""
    recipe: dict = field(default_factory=dict)
    """Config defaults below the TOML file and the flags, e.g. ``{"run": {"epochs": 15}}``."""
    augment: dict = field(default_factory=lambda: {"crop_pad": 4, "pad_mode": "reflect", "flip": True})
    """Default augmentation: ``crop_pad``, ``pad_mode`` (reflect | zero), ``flip``."""
    description: str = ""

    def load(self) -> Callable:
        return load_target(self.loader, f"dataset {self.name!r}")


_METHODS: dict[str, MethodInfo] = {}
_DATASETS: dict[str, DatasetInfo] = {}
_BUILTIN: set[str] = set()
_plugins_loaded: set[str] = set()


def load_target(target: str, what: str):
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
        return getattr(mod, attr) if attr else mod
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what}: cannot load {target} ({exc}); check the module is importable "
                          "(on PYTHONPATH) and defines that name") from None


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name) or name.startswith("-"):
        raise ConfigError(f"{kind} name {name!r}: use a non-empty name without spaces")


def register_method(name: str, target: str, *, layout: str, replace: bool = False, **info: Any) -> MethodInfo:
    """Register (or with ``replace=True`` re-register) a training method; returns its info."""
    _check_name(name, "method")
    if layout not in LAYOUTS:
        raise ConfigError(f"register_method({name!r}): layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if name in _METHODS and not replace:
        if _METHODS[name].target == target:
            return _METHODS[name]  # the same registration again (a module imported twice)
        raise ConfigError(f"method {name!r} is already registered ({_METHODS[name].target}); pick another "
                          "name or pass replace=True")
    m = MethodInfo(name=name, target=target, layout=layout, **info)
    _METHODS[name] = m
    return m


def register_dataset(name: str, loader: str, *, replace: bool = False, **info: Any) -> DatasetInfo:
    """Register (or with ``replace=True`` re-register) a dataset; returns its info."""
    _check_name(name, "dataset")
    if name in _DATASETS and not replace:
        if _DATASETS[name].loader == loader:
            return _DATASETS[name]
        raise ConfigError(f"dataset {name!r} is already registered ({_DATASETS[name].loader}); pick another "
                          "name or pass replace=True")
    d = DatasetInfo(name=name, loader=loader, **info)
    _DATASETS[name] = d
    return d


def unregister(name: str) -> None:
    """Remove a plugin's method and/or dataset of this name (tests); built-ins stay."""
    if name in _BUILTIN:
        raise ConfigError(f"{name!r} is built in and cannot be unregistered")
    _METHODS.pop(name, None)
    _DATASETS.pop(name, None)


def load_plugins(modules: list[str] | tuple[str, ...] | None = None) -> None:
    """Import plugin modules (their import registers methods/datasets): the given names plus
    those in ``$AUXPAR_PLUGINS`` (comma separated). Each module is imported once."""
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    names += list(modules or [])
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"run.plugins: {name!r} is not a module name; write e.g. plugins = [\"my_plugin\"]")
        if name in _plugins_loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugin {name!r} cannot be imported ({exc}); put its directory on PYTHONPATH "
                              "or fix the name in run.plugins / --plugin / $AUXPAR_PLUGINS") from None
        _plugins_loaded.add(name)


def method_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_METHODS)


def dataset_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_DATASETS)


def method(name: str) -> MethodInfo:
    load_plugins()
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)} (or load the plugin "
                          "that registers it with --plugin / run.plugins)") from None


def dataset(name: str) -> DatasetInfo:
    load_plugins()
    try:
        return _DATASETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown dataset {name!r}: valid names are {', '.join(_DATASETS)} (or load the "
                          "plugin that registers it with --plugin / run.plugins)") from None


def methods_with_layout(*layouts: str) -> tuple[str, ...]:
    return tuple(n for n, m in _METHODS.items() if m.layout in layouts)


def method_available(name: str) -> bool:
    """Whether ``name`` is registered and its class imports (a build may lack an optional method)."""
    try:
        method(name).load()
        return True
    except ConfigError:
        return False


def epoch_keys() -> tuple[str, ...]:
    """Every method's extra per-epoch metrics keys, in registration order, without repeats."""
    return _union("epoch_keys")


def step_keys() -> tuple[str, ...]:
    """Every method's extra per-step metrics keys, in registration order, without repeats."""
    return _union("step_keys")


def _union(attr: str) -> tuple[str, ...]:
    load_plugins()
    out: list[str] = []
    for m in _METHODS.values():
        out += [k for k in getattr(m, attr) if k not in out]
    return tuple(out)


# --------------------------------------------------------------------------- built-ins

_TIME_KEYS = ("time_compute_s", "time_comm_s", "time_wait_s")
_LP_KEYS = ("beta", "residual", "penalty", "mu_norm") + _TIME_KEYS

register_method("serial", "auxpar.coupling.serial:SerialMethod", layout="single",
                description="backprop in one process (the baseline)", perf="auxpar.perfmodel:perf_serial")
register_method("ddp", "auxpar.coupling.serial:DDPMethod", layout="replicas",
                description="data parallel over K ranks (DistributedDataParallel)",
                perf="auxpar.perfmodel:perf_ddp")
register_method("pipeline", "auxpar.coupling.pipeline:PipelineMethod", layout="stages",
                description="pipeline baseline (torch.distributed.pipelining, GPipe or 1F1B)",
                epoch_keys=_TIME_KEYS, perf="auxpar.perfmodel:perf_pipeline")
register_method("penalty", "auxpar.coupling.layer_parallel:PenaltyMethod", layout="stages",
                description="layer-parallel, quadratic-penalty coupling through aux states",
                epoch_keys=_LP_KEYS, perf="auxpar.perfmodel:perf_coupled")
register_method("al", "auxpar.coupling.layer_parallel:AugmentedLagrangianMethod", layout="stages",
                description="layer-parallel, augmented-Lagrangian coupling (multipliers)",
                epoch_keys=_LP_KEYS, perf="auxpar.perfmodel:perf_coupled")
register_method("mgrit", "auxpar.coupling.mgrit:MgritMethod", layout="stages",
                description="multigrid reduction in time over the layer grid",
                epoch_keys=_TIME_KEYS + ("mgrit_iters", "mgrit_residuals"),
                step_keys=("mgrit_iters", "mgrit_residuals"),
                precisions=("fp32", "bf16"),
                precision_note="a loss scale would have to pass through every adjoint relaxation, residual "
                               "norm and warm-start state of the MGRIT solves; use --precision bf16 (no loss "
                               "scaling needed) or fp32",
                phases_key="mgrit.phases", perf="auxpar.perfmodel:perf_mgrit",
                model_step=lambda cfg: cfg.mgrit.step)

# The WRN recipe (Zagoruyko & Komodakis): lr 0.1, Nesterov, wd 5e-4, batch 128, 200 epochs,
# lr x0.2 at 60/120/160; 4-pixel reflect-padded crops and flips.
_WRN_RECIPE = {"run": {"epochs": 200}, "data": {"batch_size": 128},
               "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                         "lr_schedule": "multistep", "milestones": [60, 120, 160], "gamma": 0.2}}
_CIFAR_AUGMENT = {"crop_pad": 4, "pad_mode": "reflect", "flip": True}
for _classes in (10, 100):
    register_dataset(
        f"cifar{_classes}", f"auxpar.data.cifar:load_cifar{_classes}", geometry=(3, 32, _classes, 50_000, 10_000),
        recipe=_WRN_RECIPE, augment=_CIFAR_AUGMENT,
        description=f"CIFAR-{_classes}, 32x32 colour, {_classes} classes (downloaded with a checksum)")
register_dataset(
    "digits", "auxpar.data.datasets:load_digits", geometry=(1, 8, 10, 1_437, 360),
    # Measured on the embedded digits set: 15 epochs of SGD 0.05 cosine at batch 64 gives
    # ResNet-20 ~98-99% test accuracy in well under a minute on a laptop CPU.
    recipe={"run": {"epochs": 15}, "data": {"batch_size": 64},
            "optim": {"lr": 0.05, "lr_schedule": "cosine", "weight_decay": 5e-4}},
    # Flipping a digit changes its meaning (2 vs 5 ...), and 1 pixel is 1/8 of the image.
    augment={"crop_pad": 1, "pad_mode": "zero", "flip": False},
    description="scikit-learn's 8x8 digits, embedded (fast demos and tests)")
register_dataset(
    "synthetic", "auxpar.data.datasets:load_synthetic", geometry=None,
    augment={"crop_pad": 4, "pad_mode": "reflect", "flip": True},
    description="random images and labels (speed measurements only; nothing to learn)")
register_dataset(
    "fashion-mnist", "auxpar.data.fashion:load_fashion", geometry=(1, 28, 10, 60_000, 10_000),
    # The CPU study recipe (experiments/studies/fashion-resnet20.toml): SGD 0.05 cosine at
    # batch 128; 10 epochs fit a 10,000-image subset into minutes per run on one core.
    # Penalty/AL: SPH starting and ending with a serial epoch, whose serial epochs run as a 1F1B
    # pipeline of 4 micro-batches (measured, experiments/studies/fashion-resnet20-tuning.toml:
    # +0.9 points and 1.25x -> 1.57x serial's speed against the package defaults, 3 seeds), and
    # stages that read the true output of the stage below (stage_input = output; on the full
    # training set the aux-state inputs drifted within one parallel epoch: README, Fashion-MNIST).
    recipe={"run": {"epochs": 10}, "data": {"batch_size": 128},
            "optim": {"lr": 0.05, "lr_schedule": "cosine", "weight_decay": 5e-4},
            "coupling": {"phases": "serial:1,parallel:2", "serial_executor": "pipeline",
                         "stage_input": "output"}},
    # The cut stays FLOP-balanced (4, 5 blocks): in the full-set study with the measured cut
    # (3, 6) (fashion-resnet20-full-6ep.toml, which pins dist.balance = "time") the parallel
    # epochs ran 1.64x serial's (1.62x with 4, 5 at commit b762953) and the pipelined serial
    # epochs 1.32x (1.39x): no gain end to end, for a boundary (16x28x28) twice the FLOP cut's
    # (32x14x14) in every message and in the 60,000-row aux stores. Block 3 cut in two
    # (model.split_blocks = [3], 4, 6 units) balanced bench_parallel's ranks to 1% but ran its
    # parallel epochs no faster over the full set, for a 48x14x14 boundary
    # (fashion-resnet20-full-6ep-cut.toml: 1.41x against 1.49x).
    # 28x28 garments on a black background: a 2-pixel zero-padded crop (4 px on 32x32 CIFAR
    # scaled down) and flips (a mirrored shirt is still a shirt).
    augment={"crop_pad": 2, "pad_mode": "zero", "flip": True},
    description="Fashion-MNIST, 28x28 grey, 10 classes (Debian package, --data-dir, or download)")
_BUILTIN.update(_METHODS, _DATASETS)
