"""Downsampling (DS) filters for boundary tensors (algorithms.md §4).

Aux states, multipliers and both exchanged tensors live at 1/s of the boundary's spatial
resolution: ``D`` pools with kernel = stride = s (average or max), ``U`` upsamples back to the
boundary shape (nearest or bilinear). With s = 1 both are the identity: no filter is applied
at all, so the coupling is exact.

Sizes that a power-of-two s does not divide (the 7x7 boundaries of a 28x28 input with s = 2,
or 14x14 and 7x7 with s = 4) are rounded *up*: an ``H x W`` boundary is stored at
``ceil(H/s) x ceil(W/s)``. The last row/column of cells then covers fewer than s pixels: ``D``
averages (or maxes) only the pixels that exist, and ``U`` upsamples by exactly s and crops back
to ``H x W``, so every pixel reads the cell it was pooled into. As in the divisible case,
``D(U(z)) == z`` for average pooling with nearest upsampling. For divisible sizes the filters
are unchanged.

Other factors (3, 5, ...) must divide the boundary, else the filter refuses with a ConfigError
naming the fix: the networks halve their resolution, so only power-of-two cells line up with
their grids, and a factor like 3 that does not divide is most likely a mistake.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from auxpar.errors import ConfigError


def rounds_up(factor: int) -> bool:
    """Whether sizes ``factor`` does not divide are rounded up (powers of two) or refused."""
    return factor >= 1 and factor & (factor - 1) == 0


def reduced_size(n: int, factor: int) -> int:
    """Side length of a boundary side of ``n`` pixels stored at DS factor ``factor``: ``ceil(n / s)``."""
    return -(-int(n) // int(factor))


class DSFilter:
    def __init__(self, shape: tuple[int, ...], factor: int = 1, mode: str = "avg",
                 upsample: str = "nearest", where: str = "boundary"):
        self.full_shape = tuple(shape)
        self.factor = int(factor)
        self.mode = mode
        self.upsample = upsample
        if self.factor == 1:
            self.shape = self.full_shape
            self.exact = True
            return
        if len(shape) != 3:
            raise ConfigError(f"--ds-factor {factor}: {where} has shape {tuple(shape)}, not C x H x W; use --ds-factor 1")
        c, h, w = shape
        self.exact = not (h % self.factor or w % self.factor)  # s divides both sides
        if not self.exact and not rounds_up(self.factor):
            raise ConfigError(
                f"--ds-factor {factor} does not divide the {where} resolution {h}x{w}; a power-of-two "
                f"factor is rounded up where it does not divide (e.g. 7x7 is stored at 4x4 with "
                f"--ds-factor 2), any other factor must divide every boundary (see `auxpar plan`): "
                f"use e.g. --ds-factor 1 or 2"
            )
        self.shape = (c, reduced_size(h, self.factor), reduced_size(w, self.factor))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _pads(self) -> tuple[int, int]:
        _, h, w = self.full_shape
        return self.shape[1] * self.factor - h, self.shape[2] * self.factor - w

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """D: N x C x H x W -> N x C x ceil(H/s) x ceil(W/s)."""
        if self.factor == 1:
            return x
        s = self.factor
        if self.exact:
            return F.avg_pool2d(x, s) if self.mode == "avg" else F.max_pool2d(x, s)
        ph, pw = self._pads()
        if self.mode == "max":  # -inf never wins: every cell holds at least one real pixel
            return F.max_pool2d(F.pad(x, (0, pw, 0, ph), value=float("-inf")), s)
        # Mean over the pixels that exist: zero-pad, pool, divide by the fraction of real pixels.
        pooled = F.avg_pool2d(F.pad(x, (0, pw, 0, ph)), s)
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        frac = F.avg_pool2d(F.pad(ones, (0, pw, 0, ph)), s)
        return pooled / frac

    def up(self, z: torch.Tensor) -> torch.Tensor:
        """U: N x C x ceil(H/s) x ceil(W/s) -> N x C x H x W."""
        if self.factor == 1:
            return z
        size = self.full_shape[1:]
        if self.exact:
            if self.upsample == "nearest":
                return F.interpolate(z, size=size, mode="nearest")
            return F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        h, w = size
        if self.upsample == "nearest":
            big = z.repeat_interleave(self.factor, dim=2).repeat_interleave(self.factor, dim=3)
        else:
            big = F.interpolate(z, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return big[:, :, :h, :w]
