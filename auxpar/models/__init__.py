"""Model registry: names -> :class:`StagedNet` builders, plus the staged/partition API.

    torch.manual_seed(seed)                      # the registry never seeds
    net = build_model("resnet56", num_classes=10)
    stage = net.partition(K)[rank]               # what one rank of a K-stage run keeps

Names (case-insensitive): ``resnet<6n+2>``, ``preact-resnet<6n+2>``, ``wrn-<6n+4>-<k>``, or a
user's factory ``package.module:function`` (see :func:`call_factory`), which CLI, study and plan
all reach through :func:`build_model`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

from auxpar.errors import ConfigError
from auxpar.models.resnet import build_resnet
from auxpar.models.staged import (
    ResidualBlock,
    Stage,
    StagedNet,
    check_staged_net,
    count_parameters,
    describe_partition,
    dry_forward,
    parse_split,
    partition_counts,
    staged_net,
)
from auxpar.models.wrn import build_wrn

__all__ = [
    "MODEL_NAMES_HELP",
    "ResidualBlock",
    "Stage",
    "StagedNet",
    "build_model",
    "build_user_model",
    "call_factory",
    "check_staged_net",
    "count_parameters",
    "dry_forward",
    "load_factory",
    "staged_net",
    "describe_partition",
    "parse_model_name",
    "parse_split",
    "partition_counts",
]

MODEL_NAMES_HELP = (
    "valid model names (case-insensitive): "
    "resnet<D> with D = 6n+2 (resnet20, resnet32, resnet44, resnet56, resnet110, ...; "
    "post-activation CIFAR ResNet, option-A shortcuts); "
    "preact-resnet<D> with D = 6n+2 (preact-resnet20, preact-resnet110, ...); "
    "wrn-<D>-<k> with D = 6n+4 and width k >= 1 (wrn-28-10, wrn-16-4, wrn-10-1, ...); "
    "or your own network as package.module:factory (a function returning an auxpar.StagedNet or "
    "(stem, blocks, head))"
)

_RESNET = re.compile(r"^(preact-)?resnet(\d+)$")
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def parse_model_name(name: str) -> tuple[str, int, int | None]:
    """``"WRN-28-10"`` -> ``("wrn", 28, 10)``; ``"resnet56"`` -> ``("resnet", 56, None)``.

    family is ``"resnet"``, ``"preact-resnet"`` or ``"wrn"``; width is None for the ResNets.
    Raises ConfigError for unknown names and illegal depths or widths.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be text, got {name!r}; {MODEL_NAMES_HELP}")
    key = name.strip().lower()
    m = _RESNET.match(key)
    if m:
        family = "preact-resnet" if m.group(1) else "resnet"
        depth = int(m.group(2))
        if depth < 8 or (depth - 2) % 6:
            lo = max(8, depth - (depth - 2) % 6)
            raise ConfigError(
                f"model {name!r}: {family} depth must be 6n+2 (8, 14, 20, 26, 32, ...), "
                f"got {depth}; use e.g. {family}{lo} or {family}{lo + 6}. {MODEL_NAMES_HELP}"
            )
        return family, depth, None
    m = _WRN.match(key)
    if m:
        depth, width = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6:
            lo = max(10, depth - (depth - 4) % 6)
            raise ConfigError(
                f"model {name!r}: WRN depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), "
                f"got {depth}; use e.g. wrn-{lo}-{width} or wrn-{lo + 6}-{width}. "
                f"{MODEL_NAMES_HELP}"
            )
        if width < 1:
            raise ConfigError(
                f"model {name!r}: WRN width k must be >= 1, got {width}; "
                f"use e.g. wrn-{depth}-1. {MODEL_NAMES_HELP}"
            )
        return "wrn", depth, width
    raise ConfigError(f"unknown model {name!r}; {MODEL_NAMES_HELP}")


def _check_positive_int(value, what: str, example: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}; e.g. {example}")
    return value


def build_model(
    name: str,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    dropout: float = 0.0,
    norm: str = "bn",
) -> StagedNet:
    """Build a model by name from torch's current RNG state (callers seed first).

    Args:
        name: see :data:`MODEL_NAMES_HELP`; ``package.module:factory`` imports and calls a
            user's factory (:func:`call_factory`).
        in_channels, input_size: the input is ``(B, in_channels, input_size, input_size)``;
            input_size only affects the measured costs and boundary shapes.
        num_classes: width of the classifier.
        dropout: WRN only (between the two convs of each block); must be 0 for ResNets.
        norm: ``"bn"`` (BatchNorm2d) or ``"none"`` (identity in place of every BN, for exact
            equality tests between training backends).
    """
    if isinstance(name, str) and ":" in name:
        return call_factory(load_factory(name), in_channels=in_channels, input_size=input_size,
                            num_classes=num_classes, dropout=dropout, norm=norm, name=name.strip())
    family, depth, width = parse_model_name(name)
    _check_positive_int(in_channels, "in_channels", "3 for CIFAR, 1 for digits")
    _check_positive_int(input_size, "input_size", "32 for CIFAR, 8 for digits")
    _check_positive_int(num_classes, "num_classes", "10 for CIFAR-10, 100 for CIFAR-100")
    norm_key = norm.strip().lower() if isinstance(norm, str) else norm
    if norm_key not in ("bn", "none"):
        raise ConfigError(
            f"norm {norm!r} is not supported; use 'bn' (BatchNorm) or 'none' (no normalization)"
        )
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}") from None
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}; e.g. 0.3 for WRN")
    if family == "wrn":
        return build_wrn(
            depth,
            width,
            in_channels=in_channels,
            input_size=input_size,
            num_classes=num_classes,
            dropout=dropout,
            norm=norm_key,
        )
    if dropout != 0.0:
        raise ConfigError(
            f"dropout={dropout} was given for {family}{depth}, but only WRN models have dropout; "
            f"set dropout = 0 or use a wrn-<D>-<k> model"
        )
    return build_resnet(
        depth,
        preact=family == "preact-resnet",
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        norm=norm_key,
    )


# ---------------------------------------------------------------------- user networks
_FACTORY_HELP = ("a factory is a module-level function, e.g. def make_net(in_channels, num_classes): "
                 "... return auxpar.staged_net(stem, blocks, head, input_shape=...) or (stem, blocks, head)")


def load_factory(spec: str) -> Callable[..., Any]:
    """The function named by ``package.module:function`` (``--model``), imported."""
    mod_name, _, attr = spec.strip().partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--model {spec!r}: write a user model as package.module:function, "
                          f"e.g. experiments.custom_network:make_net; {_FACTORY_HELP}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(
            f"--model {spec}: cannot import module {mod_name!r} ({exc}); run auxpar from the directory "
            "that holds the package, or add that directory to PYTHONPATH") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: say so
        raise ConfigError(f"--model {spec}: importing {mod_name} raised {type(exc).__name__}: "
                          f"{str(exc)[:300]}; fix the module (--debug shows the traceback)") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--model {spec}: module {mod_name} has no attribute {attr!r}; "
                              f"check the name after the colon ({_FACTORY_HELP})") from None
    if not callable(obj):
        raise ConfigError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a function; {_FACTORY_HELP}")
    return obj


def factory_name(factory: Callable[..., Any]) -> str:
    """``module:qualname`` of a function (what ``--model`` would name it)."""
    mod = getattr(factory, "__module__", None) or "?"
    return f"{mod}:{getattr(factory, '__qualname__', type(factory).__name__)}"


def call_factory(
    factory: Callable[..., Any],
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    dropout: float = 0.0,
    norm: str = "bn",
    name: str | None = None,
) -> StagedNet:
    """Call a user's model factory and return its network as a checked :class:`StagedNet`.

    The factory gets the keyword arguments ``in_channels``, ``num_classes`` and ``input_size``
    that its signature accepts (all three if it takes ``**kwargs``), and ``dropout`` / ``norm``
    only if it names them (a non-default ``model.dropout`` or ``model.norm`` for a factory
    without that parameter is an error, never silently dropped). It returns a StagedNet or a
    tuple ``(stem, blocks, head)`` of modules (shapes measured by :func:`staged_net`). Every rank
    builds the model from the run's seed, so the factory must be deterministic given torch's RNG.
    """
    name = name or factory_name(factory)
    offered = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: offer what it gets by keyword
        params = None
    if params is None:
        kwargs = dict(offered)
    else:
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if var_kw or k in params}
        missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
                   and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                   and p.name not in kwargs and p.name not in ("dropout", "norm")]
        if missing:
            raise ConfigError(f"model factory {name} requires {', '.join(map(repr, missing))}, which auxpar does "
                              "not pass (it passes in_channels, num_classes, input_size); give "
                              f"{'them' if len(missing) > 1 else 'it'} a default value")
    for key, value, default in (("dropout", dropout, 0.0), ("norm", norm, "bn")):
        if params is not None and key in params:
            kwargs[key] = value
        elif value != default:
            raise ConfigError(f"model.{key} = {value!r} was given, but the model factory {name} has no '{key}' "
                              f"parameter; add one to the factory or leave model.{key} at {default!r}")
    try:
        out = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: one clear line, traceback with --debug
        raise ConfigError(f"model factory {name}({', '.join(kwargs)}) raised {type(exc).__name__}: "
                          f"{str(exc)[:300]}; fix the factory (--debug shows the traceback)") from exc
    source = f"the network of model factory {name}"
    if isinstance(out, StagedNet):
        return check_staged_net(out, in_channels, input_size, num_classes, source)
    if isinstance(out, (tuple, list)) and len(out) == 3:
        stem, blocks, head = out
        return staged_net(stem, blocks, head, input_shape=(in_channels, input_size, input_size),
                          num_classes=num_classes, name=name)
    raise ConfigError(f"model factory {name} returned {_what(out)}; it must return an auxpar.StagedNet "
                      "(auxpar.staged_net(stem, blocks, head, input_shape=...)) or a tuple (stem, blocks, head) "
                      "of nn.Modules")


def _what(obj: Any) -> str:
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(obj, (tuple, list)):
        return f"{article} {name} of {len(obj)} item(s)"
    return f"{article} {name}"


def build_user_model(
    model: Any,
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    dropout: float = 0.0,
    norm: str = "bn",
    name: str | None = None,
) -> StagedNet:
    """The network for ``auxpar.train(model=...)``: a name or ``module:factory`` text, a factory
    function, a :class:`StagedNet`, or a tuple ``(stem, blocks, head)``; checked against the data."""
    from torch import nn

    if isinstance(model, str):
        return build_model(model, in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                           dropout=dropout, norm=norm)
    if isinstance(model, StagedNet):
        return check_staged_net(model, in_channels, input_size, num_classes, f"model {model.name!r}")
    if isinstance(model, (tuple, list)) and len(model) == 3:
        return staged_net(*model, input_shape=(in_channels, input_size, input_size), num_classes=num_classes,
                          name=name or "custom")
    if isinstance(model, nn.Module):
        raise ConfigError(f"model is a plain {type(model).__name__}: auxpar cuts a network into stages between "
                          "residual blocks, so give auxpar.staged_net(stem, blocks, head, input_shape=...), a tuple "
                          "(stem, blocks, head), or a factory function returning one")
    if callable(model):
        return call_factory(model, in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                            dropout=dropout, norm=norm, name=name)
    raise ConfigError(f"model must be a model name, a factory function, an auxpar.StagedNet or (stem, blocks, "
                      f"head), got {_what(model)}")
