"""A user's own data for ``auxpar.train``: tensors, or map-style datasets materialized once.

The trainer consumes two :class:`~auxpar.data.datasets.ImageDataset` splits held in memory
(``N x C x H x W`` images, ``int64`` labels, per-channel ``mean``/``std``). :class:`TensorData`
checks a user's tensors once and hands out exactly that::

    data = TensorData(x_train, y_train, x_test, y_test)          # uint8 0..255 or float images
    data = TensorData.from_datasets(train_ds, test_ds)            # any ds[i] -> (x, y), len(ds)
    train_set, test_set = data.splits(train_subset=0)

Sample ids are the row numbers of ``x_train`` (for ``from_datasets``: the dataset index ``i``
of ``train_ds[i]``); the layer-parallel methods key their per-sample auxiliary states on them.

Images: ``uint8`` (0..255, stored as they are, like the built-in datasets) or floating point
(stored as float32, 4x the memory: the whole training set lives on the training device).
``normalize=True`` (default) standardizes every channel with the training split's mean and
standard deviation, as for the built-in datasets; ``False`` feeds uint8 images as ``x / 255``
and float images unchanged. Augmentation (random crop / horizontal flip) is off unless
``augment`` says otherwise (auxpar cannot know whether a flip keeps your labels).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from auxpar.data.datasets import ImageDataset, channel_stats, check_train_subset, subset_indices
from auxpar.errors import DataError

NO_AUGMENT = {"crop_pad": 0, "pad_mode": "zero", "flip": False}


class FloatImageDataset(ImageDataset):
    """An :class:`ImageDataset` whose images are float32 in the user's own scale.

    ``mean``/``std`` are stored divided by 255, so the loader's ``(x / 255 - mean) / std`` is
    ``(x - mean_user) / std_user``: the trainer and the methods see no difference."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(f"FloatImageDataset.images must be float32 N x C x H x W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError("FloatImageDataset.labels must be int64 of shape (N,)")
        self.images = self.images.contiguous()
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what} must be a tensor or an array, got {type(v).__name__} ({exc})") from None


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3:
        raise DataError(f"{what} has shape {tuple(x.shape)}; auxpar needs N x C x H x W images: add the channel "
                        f"axis, e.g. {what}.unsqueeze(1) for grey-scale images")
    if x.dim() != 4:
        raise DataError(f"{what} has shape {tuple(x.shape)}; auxpar needs N x C x H x W images")
    if x.shape[0] == 0:
        raise DataError(f"{what} is empty (0 images)")
    if x.shape[2] != x.shape[3]:
        raise DataError(f"{what} has {x.shape[2]}x{x.shape[3]} images; auxpar models take square images "
                        "(height == width): pad or crop them")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.is_floating_point():
        x = x.to(torch.float32).contiguous()
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{what} holds NaN or infinite values")
        return x
    raise DataError(f"{what} has dtype {x.dtype}; give uint8 images (0..255) or floating-point images "
                    "(convert with .to(torch.uint8) or .float())")


def _check_labels(y: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if y.dim() != 1:
        raise DataError(f"{what} has shape {tuple(y.shape)}; labels are one class index per image, shape (N,)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{what} has dtype {y.dtype}; labels must be integer class indices (e.g. .long())")
    if y.shape[0] != n:
        raise DataError(f"{what} has {y.shape[0]} labels for {n} images; give one label per image")
    return y.to(torch.int64).contiguous()


def _float_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xs = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xs.mean(1).tolist()), tuple(xs.std(1, unbiased=False).clamp_min(1e-6).tolist())


class TensorData:
    """Train and test images and labels given as tensors (or arrays), checked once.

    Args:
        x_train, x_test: ``N x C x H x W`` images, ``uint8`` or floating point, square, with the
            same per-sample shape.
        y_train, y_test: integer class indices, shape ``(N,)``.
        num_classes: the number of classes; default ``max label + 1``. Every label must lie
            in ``0..num_classes-1``.
        name: the dataset's name in summary.json, logs and config.toml (``data.dataset``).
        normalize: standardize channels with the training split's statistics (see module doc).
        augment: random crop / flip settings ``{"crop_pad": int, "pad_mode": "zero"|"reflect",
            "flip": bool}`` (missing keys: off); default no augmentation. The config keys
            ``data.augment``, ``data.crop_pad``, ``data.pad_mode``, ``data.flip`` still apply on top.
    """

    def __init__(self, x_train, y_train, x_test, y_test, *, num_classes: int | None = None, name: str = "custom",
                 normalize: bool = True, augment: Mapping[str, Any] | None = None) -> None:
        xtr = _check_images(_as_tensor(x_train, "x_train"), "x_train")
        xte = _check_images(_as_tensor(x_test, "x_test"), "x_test")
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"x_train has images of shape {tuple(xtr.shape[1:])} but x_test {tuple(xte.shape[1:])}; "
                            "both splits need the same (C, H, W)")
        if xtr.dtype != xte.dtype:
            raise DataError(f"x_train is {xtr.dtype} but x_test is {xte.dtype}; give both splits the same dtype "
                            "(and the same scale)")
        ytr = _check_labels(_as_tensor(y_train, "y_train"), xtr.shape[0], "y_train")
        yte = _check_labels(_as_tensor(y_test, "y_test"), xte.shape[0], "y_test")
        lo = min(int(ytr.min()), int(yte.min()))
        hi = max(int(ytr.max()), int(yte.max()))
        if num_classes is None:
            num_classes = hi + 1
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise DataError(f"num_classes = {num_classes!r} must be a whole number >= 2")
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(f"label {bad} is outside 0..{num_classes - 1} (num_classes = {num_classes}); labels "
                            "must be class indices 0..num_classes-1")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\:"):
            raise DataError(f"name = {name!r} must be a short non-empty name without '/', '\\\\' or ':' "
                            "(it is part of the default run directory)")
        self.name = name.strip()
        self.x_train, self.y_train, self.x_test, self.y_test = xtr, ytr, xte, yte
        self.num_classes = int(num_classes)
        self.normalize = bool(normalize)
        self.augment = self._check_augment(augment)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_datasets(cls, train, test, **kwargs) -> "TensorData":
        """Materialize two map-style datasets (``len(ds)`` and ``ds[i] -> (x, y)``) once.

        ``x`` is a ``C x H x W`` (or ``H x W``, grey-scale) tensor or array; ``y`` an integer
        or a 0-dim integer tensor. Sample id ``i`` is ``train[i]``. Other keyword arguments
        go to :class:`TensorData`."""
        xtr, ytr = _materialize(train, "train")
        xte, yte = _materialize(test, "test")
        return cls(xtr, ytr, xte, yte, **kwargs)

    @staticmethod
    def _check_augment(augment) -> dict:
        if augment is None:
            return dict(NO_AUGMENT)
        if not isinstance(augment, Mapping):
            raise DataError(f"augment = {augment!r} must be a dict like {{'crop_pad': 4, 'flip': True}} or None")
        unknown = sorted(set(augment) - set(NO_AUGMENT))
        if unknown:
            raise DataError(f"augment has unknown key(s) {unknown}; valid keys are {', '.join(NO_AUGMENT)}")
        out = {**NO_AUGMENT, **augment}
        from auxpar.data.augment import Augment

        Augment(**out)  # validates the values with the augmentation's own messages
        return out

    # ------------------------------------------------------------------ what the trainer reads
    @property
    def shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.x_train.shape
        return (int(c), int(h), int(w))

    def augment_defaults(self) -> dict:
        """``{"crop_pad", "pad_mode", "flip"}``: this data's augmentation (the built-in datasets'
        counterpart is :func:`auxpar.data.default_augment`)."""
        return dict(self.augment)

    def splits(self, train_subset: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(train, test) as the trainer's datasets; ``train_subset`` > 0 keeps a fixed stratified
        subset of the training split (``data.train_subset``, as for the built-in datasets)."""
        xtr, ytr = self.x_train, self.y_train
        mean, std = self._stats()
        if train_subset:
            check_train_subset(train_subset, len(ytr), self.num_classes, self.name)
            if train_subset < len(ytr):
                ids = subset_indices(ytr, train_subset)
                xtr, ytr = xtr.index_select(0, ids).contiguous(), ytr.index_select(0, ids).contiguous()
        cls = ImageDataset if xtr.dtype == torch.uint8 else FloatImageDataset
        return (cls(self.name, xtr, ytr, self.num_classes, mean, std, split="train"),
                cls(self.name, self.x_test, self.y_test, self.num_classes, mean, std, split="test"))

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std in the loader's convention (0..1 scale: divided by 255)."""
        c = self.x_train.shape[1]
        if self.x_train.dtype == torch.uint8:
            return channel_stats(self.x_train) if self.normalize else ((0.0,) * c, (1.0,) * c)
        if not self.normalize:
            return (0.0,) * c, (1.0 / 255.0,) * c
        mean, std = _float_stats(self.x_train)
        return tuple(m / 255.0 for m in mean), tuple(s / 255.0 for s in std)

    def __len__(self) -> int:
        return int(self.x_train.shape[0])

    def __repr__(self) -> str:
        return (f"TensorData(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"shape={self.shape}, num_classes={self.num_classes}, dtype={self.x_train.dtype})")


def _materialize(ds, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"the {split} dataset ({type(ds).__name__}) has no len(): give a map-style dataset "
                        "(len(ds) and ds[i] -> (x, y)) or tensors") from None
    if n == 0:
        raise DataError(f"the {split} dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{split}[{i}] is {type(item).__name__}; a dataset item must be a pair (x, y)")
        x, y = item
        x = _as_tensor(x, f"{split}[{i}] image")
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or (xs and x.shape != xs[0].shape):
            want = f"{tuple(xs[0].shape)} like {split}[0]" if xs else "C x H x W"
            raise DataError(f"{split}[{i}] has an image of shape {tuple(x.shape)}; every image must be {want}")
        y = _as_tensor(y, f"{split}[{i}] label")
        if y.numel() != 1 or y.is_floating_point():
            raise DataError(f"{split}[{i}] has label {y.tolist()!r}; a label must be one integer class index")
        xs.append(x)
        ys.append(int(y.reshape(())))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
