"""CIFAR ResNets (He et al. 2016) in the staged form, post- and pre-activation.

``resnet<6n+2>`` (He et al., "Deep Residual Learning", section 4.2): stem conv3x3(C_in->16)+BN+ReLU,
three groups of n BasicBlocks at 16, 32, 64 channels (the first block of groups 2 and 3 has
stride 2), head = global average pool + Linear(64, classes). The shortcut is "option A":
parameter-free (spatial subsample ``x[:, :, ::2, ::2]`` and zero-padded channels), which is what
gives the paper's parameter counts (ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M).

``preact-resnet<6n+2>`` (He et al., "Identity Mappings in Deep Residual Networks"): the same
layout with pre-activation blocks ``x -> shortcut(x) + conv2(relu(bn2(conv1(relu(bn1(x))))))``,
stem = conv3x3 only, head = BN + ReLU + pool + Linear. The option-A shortcut is applied to the
raw x so the identity path stays free of any nonlinearity.

Every block carries ``step`` (h, default 1.0), the scaling of its residual branch used by the
ODE/MGRIT view ``x -> x + h f(x)`` (algorithms.md, sections 1 and 6). With h = 1.0 the
multiplication is skipped, so outputs are bitwise the ordinary ResNet's.

The layer helpers here (conv3x3, make_norm, init_weights_, Stem, Head) are shared with wrn.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from auxpar.errors import ConfigError
from auxpar.models.staged import StagedNet

NORMS = ("bn", "none")


# ---------------------------------------------------------------------- shared helpers
def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 conv, padding 1; no bias by default (a norm follows, or it feeds an addition)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def make_norm(channels: int, norm: str) -> nn.Module:
    """BatchNorm2d for ``norm="bn"``; ``nn.Identity`` for ``norm="none"``.

    ``"none"`` removes every batch-dependent statistic so that DDP, MGRIT and serial runs can
    be compared for exact equality. The convs keep no bias in that case: the nets are then
    purely linear-plus-ReLU, which is all the equality tests need.
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")  # registry validates first


def init_weights_(module: nn.Module) -> None:
    """Standard ResNet init, deterministic given torch's RNG state.

    Convs: kaiming_normal_(fan_out, relu) (He et al. 2015, as in torchvision's ResNet);
    BN: weight 1, bias 0; Linear: PyTorch's default weight init, bias 0. Modules are visited
    in registration order, so the RNG draws depend only on the architecture, never on K.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def option_a_shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad channels to ``out_channels``.

    (B, C_in, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride)); the spatial size
    matches a 3x3/pad-1 conv with the same stride. Padding is split evenly on both sides of
    the channel axis (the common CIFAR implementation).
    """
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return x


class Stem(nn.Module):
    """conv3x3(C_in -> C) [+ norm + ReLU]: (B, C_in, S, S) -> (B, C, S, S)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, post_act: bool, bias: bool = False
    ) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, bias=bias)
        self.post_act = post_act
        if post_act:
            self.bn = make_norm(out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.post_act:
            x = F.relu(self.bn(x))
        return x


class Head(nn.Module):
    """[norm + ReLU +] global average pool + Linear: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, channels: int, num_classes: int, norm: str, pre_act: bool) -> None:
        super().__init__()
        self.pre_act = pre_act
        if pre_act:
            self.bn = make_norm(channels, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_act:
            x = F.relu(self.bn(x))
        x = torch.flatten(self.pool(x), 1)  # (B, C)
        return self.fc(x)


# ---------------------------------------------------------------------- blocks
class _OptionABlock(nn.Module):
    """Shared part of the CIFAR ResNet blocks: option-A shortcut, step h, ``merge(shortcut + h r)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.is_transition = stride != 1 or in_channels != out_channels
        self.step: float = 1.0

    def residual(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return option_a_shortcut(x, self.out_channels, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        r = self.residual(x)
        if self.step != 1.0:
            r = self.step * r
        return self.merge(self.shortcut(x) + r)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, step={self.step}"

    def _check_unit_step(self) -> None:
        if self.step != 1.0:
            raise ConfigError(f"a {type(self).__name__} with step {self.step} cannot be cut in two: the halves "
                              "run the standard block (step 1.0)")


class _OptionAHalf(nn.Module):
    """One half of an option-A block cut in two at a stage boundary (``block.split()``).

    The head maps ``x`` to ``cat([a, x_s], 1)``: ``a`` the activation after the first convolution
    (C_out channels) and ``x_s`` the shortcut's input subsampled by the stride (C_in channels;
    the zero channels of option A are added by the tail, they would travel as zeros). The tail
    maps that state to the block's output. ``tail(head(x)) == block(x)`` op for op, and each half
    owns its convolutions and norms under the block's own attribute names (so the whole net's
    state_dict keys do not change: :meth:`StagedNet.original_key`).
    """

    is_transition = True  # the state between the halves has neither the block's input nor output shape

    def __init__(self, block: "_OptionABlock", names: tuple[str, ...]) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = block.in_channels, block.out_channels, block.stride
        self.block_type = type(block).__name__
        for n in names:
            setattr(self, n, getattr(block, n))

    def extra_repr(self) -> str:
        return f"{self.block_type} {self.in_channels}->{self.out_channels}, stride={self.stride}"


class _OptionAHead(_OptionAHalf):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        return torch.cat([self.first(x), xs], 1)


class _OptionATail(_OptionAHalf):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        a, xs = y[:, :self.out_channels], y[:, self.out_channels:]
        return self.merge(option_a_shortcut(xs, self.out_channels, 1) + self.second(a))


class _BasicHead(_OptionAHead):
    def first(self, x):
        return F.relu(self.bn1(self.conv1(x)))


class _BasicTail(_OptionATail):
    def second(self, a):
        return self.bn2(self.conv2(a))

    def merge(self, y):
        return F.relu(y)


class _PreActHead(_OptionAHead):
    def first(self, x):
        return self.conv1(F.relu(self.bn1(x)))


class _PreActTail(_OptionATail):
    def second(self, a):
        return self.conv2(F.relu(self.bn2(a)))

    def merge(self, y):
        return y


class BasicBlock(_OptionABlock):
    """Post-activation ("v1") block: ``relu(shortcut(x) + h * bn2(conv2(relu(bn1(conv1(x))))))``.

    Because of the outer ReLU this block is not exactly ``x + h f(x)``; ``residual`` and
    ``shortcut`` still expose the two branches for the ODE view.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = make_norm(out_channels, norm)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = make_norm(out_channels, norm)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        return F.relu(y)

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(head, tail) with ``tail(head(x)) == self(x)``, cut after the first conv + BN + ReLU
        (the state between them: C_out + C_in channels at the output resolution)."""
        self._check_unit_step()
        return _BasicHead(self, ("conv1", "bn1")), _BasicTail(self, ("conv2", "bn2"))


class PreActBlock(_OptionABlock):
    """Pre-activation block: ``shortcut(x) + h * conv2(relu(bn2(conv1(relu(bn1(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.bn1 = make_norm(in_channels, norm)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = make_norm(out_channels, norm)
        self.conv2 = conv3x3(out_channels, out_channels)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(head, tail) with ``tail(head(x)) == self(x)``, cut after the first convolution."""
        self._check_unit_step()
        return _PreActHead(self, ("bn1", "conv1")), _PreActTail(self, ("bn2", "conv2"))


# ---------------------------------------------------------------------- builders
GROUP_WIDTHS = (16, 32, 64)


def resnet_blocks_per_group(depth: int) -> int:
    """n for depth 6n+2; the registry has already checked the depth."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    return (depth - 2) // 6


def build_resnet(
    depth: int,
    *,
    preact: bool = False,
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    norm: str = "bn",
    name: str | None = None,
) -> StagedNet:
    """Build a CIFAR ResNet (``preact=False``) or pre-activation ResNet of depth 6n+2.

    All modules are created, then initialized, in one pass from torch's current RNG state;
    the caller seeds. Returns a :class:`StagedNet` with 3n blocks (transitions at n and 2n).
    """
    n = resnet_blocks_per_group(depth)
    block_cls = PreActBlock if preact else BasicBlock
    stem = Stem(in_channels, GROUP_WIDTHS[0], norm, post_act=not preact)
    blocks = []
    channels = GROUP_WIDTHS[0]
    for g, width in enumerate(GROUP_WIDTHS):
        for i in range(n):
            stride = 2 if (g > 0 and i == 0) else 1
            blocks.append(block_cls(channels, width, stride, norm))
            channels = width
    head = Head(channels, num_classes, norm, pre_act=preact)
    net = StagedNet(
        stem,
        blocks,
        head,
        name=name or (f"preact-resnet{depth}" if preact else f"resnet{depth}"),
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
    )
    init_weights_(net)
    return net
