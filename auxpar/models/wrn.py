"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis 2016) in the staged form.

Depth d = 6n+4: stem conv3x3(C_in -> 16), three groups of n pre-activation basic blocks at
widths 16k, 32k, 64k with strides 1, 2, 2, head = BN + ReLU + global average pool + Linear.
Convs have no bias. This follows the widely used reference code (xternalz/WideResNet-pytorch):
WRN-28-10 has 36,479,194 parameters for 10 classes and 36,536,884 for 100 classes (the paper's
"36.5M"). The often quoted 36,546,980 (100 classes) comes from implementations that give all 29
convs a bias (+10,096 parameters, redundant where a BN follows); ``conv_bias=True`` reproduces
that count for comparison, but it is not the default.

* when the block changes shape, BN-ReLU is applied to x once and the result feeds both conv1
  and the 1x1 shortcut conv (so the shortcut sees the normalized input);
* otherwise the shortcut is the identity on the raw x.

Dropout (optional) sits between the two convs, after the second BN-ReLU, as in the paper
("between convolutions and after ReLU"). With ``dropout == 0`` no dropout module is created,
so no RNG is consumed in training.

Blocks carry ``step`` (h, default 1.0): ``out = shortcut(x) + h * residual(x)``; with h = 1.0
the multiplication is skipped and outputs are bitwise the ordinary WRN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from auxpar.models.resnet import Head, Stem, conv3x3, init_weights_, make_norm
from auxpar.errors import ConfigError
from auxpar.models.staged import StagedNet


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 with identity or 1x1-conv shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dropout: float,
        norm: str,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.is_transition = stride != 1 or in_channels != out_channels
        self.step: float = 1.0
        self.bn1 = make_norm(in_channels, norm)
        self.conv1 = conv3x3(in_channels, out_channels, stride, bias=conv_bias)
        self.bn2 = make_norm(out_channels, norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels, bias=conv_bias)
        self.shortcut_conv = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=conv_bias)
            if self.is_transition
            else None
        )

    def _preact(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(x))

    def _residual_from(self, a: torch.Tensor) -> torch.Tensor:
        # a = relu(bn1(x)): (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        return self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))

    def _shortcut_from(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x if self.shortcut_conv is None else self.shortcut_conv(a)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual_from(self._preact(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_conv is None:
            return x
        return self.shortcut_conv(self._preact(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute the pre-activation once; it feeds conv1 and (for transitions) the 1x1 conv.
        a = self._preact(x)
        r = self._residual_from(a)
        if self.step != 1.0:
            r = self.step * r
        return self._shortcut_from(x, a) + r

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, step={self.step}"

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(head, tail) with ``tail(head(x)) == self(x)``, cut after the first convolution: the
        state between them is ``cat([conv1(a), shortcut], 1)`` (2 C_out channels at the output
        resolution; a transition's 1x1 shortcut conv runs in the head)."""
        if self.step != 1.0:
            raise ConfigError(f"a WideBasicBlock with step {self.step} cannot be cut in two: the halves run "
                              "the standard block (step 1.0)")
        return _WideHead(self), _WideTail(self)


class _WideHalf(nn.Module):
    is_transition = True

    def __init__(self, block: WideBasicBlock, names: tuple[str, ...]) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = block.in_channels, block.out_channels, block.stride
        for n in names:
            setattr(self, n, getattr(block, n))

    def extra_repr(self) -> str:
        return f"WideBasicBlock {self.in_channels}->{self.out_channels}, stride={self.stride}"


class _WideHead(_WideHalf):
    def __init__(self, block: WideBasicBlock) -> None:
        super().__init__(block, ("bn1", "conv1", "shortcut_conv"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        s = x if self.shortcut_conv is None else self.shortcut_conv(a)
        return torch.cat([self.conv1(a), s], 1)


class _WideTail(_WideHalf):
    def __init__(self, block: WideBasicBlock) -> None:
        super().__init__(block, ("bn2", "dropout", "conv2"))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c, s = y[:, :self.out_channels], y[:, self.out_channels:]
        return s + self.conv2(self.dropout(F.relu(self.bn2(c))))


def wrn_blocks_per_group(depth: int) -> int:
    """n for depth 6n+4; the registry has already checked the depth."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
    return (depth - 4) // 6


def build_wrn(
    depth: int,
    width: int,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    dropout: float = 0.0,
    norm: str = "bn",
    conv_bias: bool = False,
    name: str | None = None,
) -> StagedNet:
    """Build WRN-depth-width as a :class:`StagedNet` with 3n blocks.

    ``conv_bias=True`` gives every conv a (zero-initialized) bias, only to reproduce the
    parameter count of implementations that do so; the registry never sets it.

    Transitions: block 0 when 16 != 16*width (any width > 1), and blocks n and 2n (stride 2).
    All modules are created, then initialized, in one pass from torch's current RNG state.
    """
    n = wrn_blocks_per_group(depth)
    widths = (16 * width, 32 * width, 64 * width)
    stem = Stem(in_channels, 16, norm, post_act=False, bias=conv_bias)
    blocks = []
    channels = 16
    for g, w in enumerate(widths):
        for i in range(n):
            stride = 2 if (g > 0 and i == 0) else 1
            blocks.append(WideBasicBlock(channels, w, stride, dropout, norm, conv_bias))
            channels = w
    head = Head(channels, num_classes, norm, pre_act=True)
    net = StagedNet(
        stem,
        blocks,
        head,
        name=name or f"wrn-{depth}-{width}",
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
    )
    init_weights_(net)
    return net
