"""Downsampling (DS) filters for boundary tensors (algorithms.md §4).

Aux states, multipliers and both exchanged tensors live at 1/s of the boundary's spatial
resolution: ``D`` pools with kernel = stride = s (average or max), ``U`` upsamples back to the
boundary shape (nearest or bilinear). With s = 1 both are the identity: no filter is applied
at all, so the coupling is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from auxpar.errors import ConfigError


class DSFilter:
    def __init__(self, shape: tuple[int, ...], factor: int = 1, mode: str = "avg",
                 upsample: str = "nearest", where: str = "boundary"):
        self.full_shape = tuple(shape)
        self.factor = int(factor)
        self.mode = mode
        self.upsample = upsample
        if self.factor == 1:
            self.shape = self.full_shape
            return
        if len(shape) != 3:
            raise ConfigError(f"--ds-factor {factor}: {where} has shape {tuple(shape)}, not C x H x W; use --ds-factor 1")
        c, h, w = shape
        if h % self.factor or w % self.factor:
            raise ConfigError(
                f"--ds-factor {factor} does not divide the {where} resolution {h}x{w}; "
                f"choose a factor that divides every boundary (see `auxpar plan`), e.g. --ds-factor 1"
            )
        self.shape = (c, h // self.factor, w // self.factor)

    @property
    def numel(self) -> int:
        n = 1
        for v in self.shape:
            n *= v
        return n

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """D: N x C x H x W -> N x C x H/s x W/s."""
        if self.factor == 1:
            return x
        if self.mode == "avg":
            return F.avg_pool2d(x, self.factor)
        return F.max_pool2d(x, self.factor)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        """U: N x C x H/s x W/s -> N x C x H x W."""
        if self.factor == 1:
            return z
        size = self.full_shape[1:]
        if self.upsample == "nearest":
            return F.interpolate(z, size=size, mode="nearest")
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)
