"""Batched, on-device data augmentation in plain torch (no torchvision).

:class:`Augment` does a random crop from a padded image and a random horizontal flip for a whole
``N x C x H x W`` batch at once: the batch is padded once, and all crops (and flips, which are
folded into the column index) are gathered with a single advanced-indexing op. No Python loop
over samples. Works for ``uint8`` and floating batches on any device; the dtype is kept.

Randomness comes only from the ``torch.Generator`` passed in (random parameters are drawn on
the generator's device and moved to the batch's device), so a given generator state always
gives the same augmentation. :meth:`Augment.sample` / :meth:`Augment.apply` split drawing from
applying, so the loader can draw parameters for a whole *global* batch and apply only a
replica's slice (DDP then augments exactly like a single process).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from auxpar.errors import ConfigError

PAD_MODES = ("reflect", "zero")


class AugmentParams(NamedTuple):
    """Per-sample random parameters: crop offsets in ``[0, 2*crop_pad]`` and a flip mask.

    ``dy``/``dx`` are ``None`` when there is no crop, ``flip`` is ``None`` when flipping is off.
    """

    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flip: torch.Tensor | None

    def select(self, item: slice | torch.Tensor) -> "AugmentParams":
        """The parameters of a subset of samples (a slice or an index tensor)."""
        return AugmentParams(*(None if t is None else t[item] for t in self))


class Augment:
    """Random crop (``crop_pad`` pixels of ``pad_mode`` padding) + random horizontal flip.

    ``crop_pad=0`` disables the crop; ``pad_mode`` is ``"reflect"`` (mirror without repeating
    the edge, like ``torch.nn.functional.pad(mode="reflect")``) or ``"zero"``; ``flip`` flips
    each sample with probability 0.5.
    """

    def __init__(self, crop_pad: int = 0, pad_mode: str = "reflect", flip: bool = False) -> None:
        if isinstance(crop_pad, bool) or not isinstance(crop_pad, int) or crop_pad < 0:
            raise ConfigError(
                f"augment crop_pad must be a non-negative integer (0 = no crop), got {crop_pad!r}"
            )
        if pad_mode not in PAD_MODES:
            raise ConfigError(
                f"unknown augment pad_mode {pad_mode!r}: use one of {', '.join(PAD_MODES)}"
            )
        if not isinstance(flip, bool):
            raise ConfigError(f"augment flip must be true or false, got {flip!r}")
        self.crop_pad = crop_pad
        self.pad_mode = pad_mode
        self.flip = flip

    @classmethod
    def from_dict(cls, settings: dict) -> "Augment":
        """Build from ``{"crop_pad", "pad_mode", "flip"}`` (e.g. :func:`default_augment`)."""
        unknown = sorted(set(settings) - {"crop_pad", "pad_mode", "flip"})
        if unknown:
            raise ConfigError(
                f"unknown augment option(s) {', '.join(map(repr, unknown))}: "
                "valid options are crop_pad, pad_mode, flip"
            )
        return cls(**settings)

    @property
    def enabled(self) -> bool:
        """False when the transform is the identity (no crop, no flip)."""
        return self.crop_pad > 0 or self.flip

    def __repr__(self) -> str:
        return f"Augment(crop_pad={self.crop_pad}, pad_mode={self.pad_mode!r}, flip={self.flip})"

    # ----------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw parameters for ``n`` samples (on the generator's device; CPU without one).

        Draw order is fixed: ``dy``, ``dx``, then the flip mask.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        dy = dx = flip = None
        if self.crop_pad > 0:
            hi = 2 * self.crop_pad + 1
            dy = torch.randint(0, hi, (n,), generator=generator, device=device)
            dx = torch.randint(0, hi, (n,), generator=generator, device=device)
        if self.flip:
            flip = torch.rand(n, generator=generator, device=device) < 0.5
        return AugmentParams(dy, dx, flip)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters to a batch ``N x C x H x W`` (parameters have ``N`` entries)."""
        if x.dim() != 4:
            raise ValueError(f"Augment expects an N x C x H x W batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        dev = x.device
        if params.dy is None and params.flip is None:
            return x
        if params.dy is None:  # flip only
            mask = params.flip.to(dev).view(n, 1, 1, 1)
            return torch.where(mask, x.flip(3), x)
        p = self.crop_pad
        xp = self._pad(x, p)
        rows = params.dy.to(dev).view(n, 1) + torch.arange(h, device=dev)  # (N, H)
        cols = params.dx.to(dev).view(n, 1) + torch.arange(w, device=dev)  # (N, W)
        if params.flip is not None:
            cols = torch.where(params.flip.to(dev).view(n, 1), cols.flip(1), cols)
        n_idx = torch.arange(n, device=dev).view(n, 1, 1, 1)
        c_idx = torch.arange(c, device=dev).view(1, c, 1, 1)
        return xp[n_idx, c_idx, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch; randomness only from ``generator`` (global RNG if ``None``)."""
        if not self.enabled:
            return x
        return self.apply(x, self.sample(x.shape[0], generator))

    def _pad(self, x: torch.Tensor, p: int) -> torch.Tensor:
        if self.pad_mode == "zero":
            return F.pad(x, (p, p, p, p), mode="constant", value=0)
        # reflect by index, so it works for every dtype and for pads larger than the image
        _, _, h, w = x.shape
        ridx = _reflect_index(h, p, x.device)
        cidx = _reflect_index(w, p, x.device)
        return x.index_select(2, ridx).index_select(3, cidx)


def _reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source index of each padded coordinate for mirror padding without edge repeat."""
    i = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    m = torch.remainder(i, period)
    return torch.where(m < size, m, period - m)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32 on ``x``'s device.

    ``x`` is ``N x C x H x W`` on the 0..255 scale (``uint8``, or a float tensor holding
    0..255 values); ``mean``/``std`` are per channel on the 0..1 scale.
    """
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s
