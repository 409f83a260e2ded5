"""The common image container and the dataset front door.

Every dataset is held in memory as one :class:`ImageDataset`: ``uint8`` images ``N x C x H x W``
plus ``int64`` labels. The *sample id* of image ``i`` is simply ``i`` (see
:attr:`ImageDataset.indices`). Ids are stable: the same archive (or the same scikit-learn
digits data, or the same synthetic config + seed) gives the same ids, in the same order, on
every run and on every rank, so per-sample auxiliary states can be keyed on them.

Datasets:

* ``cifar10`` / ``cifar100``: the official python-format archives (see :mod:`auxpar.data.cifar`).
* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes). A fixed stratified
  80/20 split (1437 train / 360 test) whose seed is a constant of this module, *not* the run
  seed, so the test set never changes.
* ``fashion-mnist``: Zalando's Fashion-MNIST, 28x28 grey-scale clothing images in 10 classes
  (60000 train / 10000 test), read from the four official IDX files (see
  :mod:`auxpar.data.fashion`).
* ``synthetic``: uniform random ``uint8`` images with random labels, for benchmarks and speed
  measurements only. There is nothing to learn in it; never report accuracy on it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from auxpar.errors import ConfigError, DataError

SPLITS = ("train", "test")

#: Seed of the digits train/test split. A constant on purpose: the test set must not depend on
#: the run seed. Changing it changes every digits result; don't.
DIGITS_SPLIT_SEED = 20240611
DIGITS_TEST_FRACTION = 0.2

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_train": 1024,
    "num_test": 256,
    "shape": (3, 32, 32),
    "num_classes": 10,
}



def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (ints / strings), stable across runs and platforms.

    Used wherever a generator must depend on several things at once (seed, epoch, batch ...)
    without the result depending on how many draws happened before.
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class ImageDataset:
    """One split of a dataset, fully in memory.

    ``images``: ``uint8`` ``N x C x H x W``, contiguous. ``labels``: ``int64`` ``N``.
    ``mean`` / ``std``: per-channel statistics on the 0..1 scale, computed from the *train*
    split (a test split carries the train split's values). The sample id of image ``i`` is
    ``i``; ids are stable across runs (same data -> same ids).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str = field(default="train")

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ImageDataset.images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"ImageDataset.labels must be int64 of shape (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"ImageDataset has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {self.mean} / {self.std}")
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    @property
    def indices(self) -> torch.Tensor:
        """Sample ids ``0..N-1`` (int64): the id of image ``i`` is ``i``."""
        return torch.arange(len(self), dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:  # the default would print the whole tensors
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``uint8`` ``N x C x H x W`` images, 0..1 scale."""
    if images.shape[0] == 0:
        raise DataError("cannot compute image statistics of an empty dataset: check the data source")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


def default_augment(name: str) -> dict[str, Any]:
    """Default augmentation settings of a dataset: ``{"crop_pad", "pad_mode", "flip"}``, from
    its registration (:mod:`auxpar.registry`).

    CIFAR and synthetic: 4-pixel reflect-padded random crop + horizontal flip.
    Fashion-MNIST: 2-pixel zero-padded random crop + horizontal flip.
    Digits: 1-pixel zero-padded crop, no flip (flipping changes a digit's meaning).
    """
    from auxpar import registry

    return dict(registry.dataset(name).augment)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'test'")


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str = "data",
    download: bool = True,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    train_subset: int = 0,
) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset`.

    ``name``: a registered dataset (:func:`auxpar.registry.dataset_names`); ``split``: ``train`` or ``test``. ``data_dir`` and
    ``download`` only matter for CIFAR and Fashion-MNIST (see :func:`auxpar.data.cifar.load_cifar`
    and :func:`auxpar.data.fashion.load_fashion`). ``seed`` and ``synthetic`` (a mapping with keys
    ``num_train``, ``num_test``, ``shape``, ``num_classes``) only matter for ``synthetic``;
    the digits split never depends on ``seed``. ``train_subset`` > 0 keeps a fixed stratified
    subset of that many training samples (see :func:`stratified_subset`); it does not change
    the test split, and 0 keeps everything.
    """
    from auxpar import registry

    info = registry.dataset(name)
    _check_split(split)
    if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 0:
        raise ConfigError(
            f"data.train_subset = {train_subset!r} must be a whole number >= 0 (0 = the full training set)"
        )
    ds = info.load()(split, data_dir=data_dir, download=download, seed=seed, synthetic=synthetic)
    if not isinstance(ds, ImageDataset):
        raise ConfigError(f"dataset {name!r}: its loader {info.loader} returned {type(ds).__name__}, not an "
                          "auxpar.data.ImageDataset")
    if split == "train" and train_subset:
        ds = stratified_subset(ds, train_subset)
    return ds


# --------------------------------------------------------------------------------------------
# training subsets

#: Seed of :func:`stratified_subset`. A constant on purpose, like the digits split: the subset
#: of a given size is the same for every run seed, so runs with different seeds (and different
#: methods) train on exactly the same samples and only their initialization and batch order
#: differ. Changing it changes every subset result; don't.
TRAIN_SUBSET_SEED = 20251130


def check_train_subset(n: int, size: int, num_classes: int, dataset: str = "the dataset") -> None:
    """Raise :class:`ConfigError` unless ``0 < n`` is a usable subset size (``0`` = full set is fine)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(
            f"data.train_subset = {n!r} must be a whole number >= 0 (0 = the full training set)"
        )
    if n == 0:
        return
    if n > size:
        raise ConfigError(
            f"data.train_subset = {n} is larger than the {size} training samples of {dataset}: "
            f"use at most {size}, or 0 for the full training set"
        )
    if n < num_classes:
        raise ConfigError(
            f"data.train_subset = {n} is smaller than the {num_classes} classes of {dataset}: a "
            f"stratified subset needs at least one sample per class; use at least {num_classes}"
        )


def subset_indices(labels: torch.Tensor | list[int], n: int, seed: int = TRAIN_SUBSET_SEED) -> torch.Tensor:
    """Ids (ascending, int64) of a class-stratified subset of ``n`` samples.

    Class ``c`` with ``n_c`` of the ``N`` samples gets ``n * n_c / N`` of them, rounded by
    largest remainder (ties to the smaller class id), and at least one sample when ``n`` is at
    least the number of classes present. Inside a class, samples are ranked by a hash of
    ``(seed, id)``, so the result depends only on the labels, ``n`` and ``seed`` (no RNG state,
    the same on every platform and torch version).
    """
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    total = len(labels)
    if not 0 < n <= total:
        raise ConfigError(f"a subset of {n} samples cannot be drawn from {total}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    exact = {c: n * len(by_class[c]) / total for c in classes}
    quota = {c: math.floor(exact[c]) for c in classes}
    left = n - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:left]:
        quota[c] += 1
    if n >= len(classes):  # every class present keeps a sample: take it from the richest class
        for c in classes:
            if quota[c] == 0:
                donor = max((d for d in classes if quota[d] > 1),
                            key=lambda d: (quota[d] - exact[d], quota[d], -d))
                quota[donor] -= 1
                quota[c] = 1
    chosen: list[int] = []
    for c in classes:
        ranked = sorted(by_class[c], key=lambda i: derive_seed(seed, "train_subset", i))
        chosen.extend(ranked[: quota[c]])
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def stratified_subset(dataset: ImageDataset, n: int, seed: int = TRAIN_SUBSET_SEED) -> ImageDataset:
    """A fixed class-stratified subset of ``n`` samples of ``dataset`` (see :func:`subset_indices`).

    The kept samples stay in their original order and are renumbered ``0..n-1`` (sample ids stay
    contiguous, as the per-sample auxiliary states need). ``mean``/``std`` stay those of the full
    training set, so a subset is normalized exactly like the full set and the test split.
    """
    check_train_subset(n, len(dataset), dataset.num_classes, dataset.name)
    if n == len(dataset):
        return dataset
    ids = subset_indices(dataset.labels, n, seed)
    return ImageDataset(
        dataset.name,
        dataset.images.index_select(0, ids).contiguous(),
        dataset.labels.index_select(0, ids).contiguous(),
        dataset.num_classes,
        dataset.mean,
        dataset.std,
        split=dataset.split,
    )


# --------------------------------------------------------------------------------------------
# digits


def _stratified_test_mask(labels: list[int], fraction: float, seed: int) -> list[bool]:
    """Deterministic stratified split that does not depend on any RNG implementation.

    The test size is ``ceil(fraction * N)`` (what scikit-learn's ``train_test_split`` uses),
    shared out over classes by largest remainder; inside a class, samples are ranked by a hash
    of ``(seed, index)``.
    """
    n = len(labels)
    n_test = math.ceil(fraction * n)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    exact = {c: fraction * len(by_class[c]) for c in classes}
    quota = {c: math.floor(exact[c]) for c in classes}
    left = n_test - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:left]:
        quota[c] += 1
    mask = [False] * n
    for c in classes:
        ranked = sorted(by_class[c], key=lambda i: derive_seed(seed, "digits", i))
        for i in ranked[: quota[c]]:
            mask[i] = True
    return mask


def _bundled_digits_file():
    """scikit-learn's own copy of the digits (``sklearn/datasets/data/digits.csv.gz``, the file its
    ``load_digits`` parses), found without importing scikit-learn; None if it is not there."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as (float64 images 1797 x 8 x 8 with values 0..16, int64 labels).

    Importing scikit-learn costs about 0.7 s of CPU, in every rank of every run (most of a
    2-rank digits run's start-up on a 2-core machine), so the bundled CSV is read directly; its
    shape and value ranges are checked, and scikit-learn's loader is the fallback."""
    path = _bundled_digits_file()
    if path is not None:
        import numpy as np

        try:
            data = np.loadtxt(path, delimiter=",", dtype=np.float64)
        except (OSError, EOFError, ValueError):  # unreadable, truncated or not numbers: sklearn's loader
            data = None
        if (data is not None and data.shape == (1797, 65) and data[:, :64].min() >= 0 and data[:, :64].max() <= 16
                and set(np.unique(data[:, 64]).tolist()) == set(range(10))):
            return torch.as_tensor(data[:, :64]).reshape(-1, 8, 8), torch.as_tensor(data[:, 64]).long()
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise DataError(
            "the 'digits' dataset needs scikit-learn, which is not installed: "
            "run `pip install 'auxpar[demo]'` (or `pip install scikit-learn`)"
        ) from exc
    bunch = _sk_load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float64), torch.as_tensor(bunch.target, dtype=torch.int64)


def load_digits(split: str, **_: Any) -> ImageDataset:
    """scikit-learn's 8x8 digits as ``uint8`` ``N x 1 x 8 x 8`` (values ``round(v * 255 / 16)``)."""
    _check_split(split)
    raw, labels = _digits_arrays()  # (1797, 8, 8), values 0..16
    images = torch.round(raw * 255.0 / 16.0).clamp_(0, 255).to(torch.uint8).unsqueeze(1)
    test_mask = torch.tensor(
        _stratified_test_mask(labels.tolist(), DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    )
    train_images = images[~test_mask].contiguous()
    mean, std = channel_stats(train_images)
    if split == "train":
        sel_images, sel_labels = train_images, labels[~test_mask].contiguous()
    else:
        sel_images, sel_labels = images[test_mask].contiguous(), labels[test_mask].contiguous()
    return ImageDataset("digits", sel_images, sel_labels, 10, mean, std, split=split)


# --------------------------------------------------------------------------------------------
# synthetic


def _synthetic_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = dict(SYNTHETIC_DEFAULTS)
    if config is None:
        return cfg
    unknown = sorted(set(config) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown synthetic dataset option(s) {', '.join(map(repr, unknown))}: "
            f"valid options are {', '.join(SYNTHETIC_DEFAULTS)}"
        )
    cfg.update(config)
    for key in ("num_train", "num_test", "num_classes"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"synthetic.{key} must be a positive integer, got {value!r}")
    shape = cfg["shape"]
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ConfigError(
            f"synthetic.shape must be three positive integers (C, H, W), e.g. [3, 32, 32]; got {shape!r}"
        )
    cfg["shape"] = tuple(shape)
    return cfg


def _synthetic_split(cfg: dict[str, Any], split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = cfg["num_train"] if split == "train" else cfg["num_test"]
    gen = torch.Generator().manual_seed(derive_seed(seed, "synthetic", split))
    images = torch.randint(0, 256, (n, *cfg["shape"]), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=gen, dtype=torch.int64)
    return images, labels


def load_synthetic(split: str, *, seed: int = 0, config: Mapping[str, Any] | None = None,
                   synthetic: Mapping[str, Any] | None = None, **_: Any) -> ImageDataset:
    """Random ``uint8`` images and random labels, deterministic given ``seed``.

    For benchmarks / speed only: the labels are noise, so accuracy on it means nothing.
    Train and test are drawn from different generator streams (different samples).
    """
    _check_split(split)
    cfg = _synthetic_config(config if config is not None else synthetic)
    train_images, train_labels = _synthetic_split(cfg, "train", seed)
    mean, std = channel_stats(train_images)
    if split == "train":
        images, labels = train_images, train_labels
    else:
        images, labels = _synthetic_split(cfg, "test", seed)
    return ImageDataset("synthetic", images, labels, cfg["num_classes"], mean, std, split=split)
