"""Model registry: names -> :class:`StagedNet` builders, plus the staged/partition API.

    torch.manual_seed(seed)                      # the registry never seeds
    net = build_model("resnet56", num_classes=10)
    stage = net.partition(K)[rank]               # what one rank of a K-stage run keeps

Names (case-insensitive): ``resnet<6n+2>``, ``preact-resnet<6n+2>``, ``wrn-<6n+4>-<k>``.
"""

from __future__ import annotations

import re

from auxpar.errors import ConfigError
from auxpar.models.resnet import build_resnet
from auxpar.models.staged import (
    Stage,
    StagedNet,
    count_parameters,
    describe_partition,
    parse_split,
    partition_counts,
)
from auxpar.models.wrn import build_wrn

__all__ = [
    "MODEL_NAMES_HELP",
    "Stage",
    "StagedNet",
    "build_model",
    "count_parameters",
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
    "wrn-<D>-<k> with D = 6n+4 and width k >= 1 (wrn-28-10, wrn-16-4, wrn-10-1, ...)"
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
        name: see :data:`MODEL_NAMES_HELP`.
        in_channels, input_size: the input is ``(B, in_channels, input_size, input_size)``;
            input_size only affects the measured costs and boundary shapes.
        num_classes: width of the classifier.
        dropout: WRN only (between the two convs of each block); must be 0 for ResNets.
        norm: ``"bn"`` (BatchNorm2d) or ``"none"`` (identity in place of every BN, for exact
            equality tests between training backends).
    """
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
