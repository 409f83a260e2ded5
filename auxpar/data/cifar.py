"""CIFAR-10 / CIFAR-100 from the official python-format archives.

Flow of :func:`load_cifar`:

1. If ``<data_dir>/auxpar_cache/<name>-<split>.pt`` exists and was built from an archive with
   the source's MD5, it is loaded (``torch.load(weights_only=True)``) and nothing else is
   touched -- not even the archive, which may then be deleted. A cache file that is corrupt,
   from another archive (other MD5) or from an older cache format is ignored and rebuilt.
2. Otherwise the archive ``<data_dir>/<filename>`` is used; if it is missing and ``download``
   is true it is downloaded (streamed to a temporary file in ``data_dir``, MD5 checked while
   streaming, then atomically renamed; progress bar when stderr is a terminal).
3. The archive's MD5 is checked against the published one, then the batches are read straight
   from the ``.tar.gz`` (no extraction) with a restricted unpickler that only accepts numpy
   array reconstruction, validated, and both splits are written to the cache atomically.

Mirrors: set ``AUXPAR_CIFAR_URL_BASE`` (e.g. ``https://mirror.example/cifar``) to download
``<base>/<filename>`` instead of the registry URL; the MD5 is still checked. The variable
applies to the registry entries (``source=None``), not to an explicit ``source=`` argument.

Several processes (ranks) may call :func:`load_cifar` at once: downloads and cache writes are
atomic, so they never see a half-written file, but each may download on its own. Let one rank
prepare the data first (then a barrier) when downloading is expected.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxpar.data.datasets import ImageDataset, channel_stats
from auxpar.data.download import fetch
from auxpar.errors import ConfigError, DataError

log = logging.getLogger(__name__)

URL_BASE_ENV = "AUXPAR_CIFAR_URL_BASE"
CACHE_DIRNAME = "auxpar_cache"
CACHE_FORMAT = 1
_CHUNK = 1 << 20
_MAX_MEMBER_BYTES = 1 << 30  # the largest official member (cifar-100 train) is ~155 MB


@dataclass(frozen=True)
class CifarSource:
    """Where a CIFAR archive comes from and what is inside it."""

    url: str
    md5: str
    filename: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    title: str = "CIFAR"


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        filename="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        title="CIFAR-10",
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        filename="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        title="CIFAR-100",
    ),
}


# --------------------------------------------------------------------------------------------
# restricted unpickling


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is not None and hasattr(core, "multiarray"):
        return core.multiarray._reconstruct
    return np.core.multiarray._reconstruct  # pragma: no cover - numpy 1.x


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction may be looked up; any other global is refused *before*
    anything is called, so a malicious pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _RefusedGlobal(module, name)
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("persistent_id", repr(pid)[:40])


def _unpickle(raw: bytes, where: str) -> Any:
    try:
        return _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refused to unpickle {exc.qualname} from {where}: CIFAR batches only contain numpy "
            "arrays; the archive is corrupt or malicious. Delete it and download the official "
            "archive again"
        ) from None
    except Exception as exc:  # any failure of a hostile/corrupt byte stream
        raise DataError(
            f"could not unpickle {where} ({type(exc).__name__}: {exc}): the archive is corrupt; "
            "delete it and rerun to download it again"
        ) from None


# --------------------------------------------------------------------------------------------
# archive handling


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_source(name: str, source: CifarSource | None) -> CifarSource:
    if source is not None:
        return source
    if name not in CIFAR_SOURCES:
        raise ConfigError(
            f"unknown CIFAR dataset {name!r}: valid names are {', '.join(CIFAR_SOURCES)}"
        )
    src = CIFAR_SOURCES[name]
    base = os.environ.get(URL_BASE_ENV, "").strip()
    if base:
        src = replace(src, url=f"{base.rstrip('/')}/{src.filename}")
    return src


def _download(src: CifarSource, dest: Path) -> None:
    """Stream ``src.url`` to a temp file next to ``dest``, check the MD5, rename atomically."""
    manual = (
        f"download {src.url} yourself and place it at {dest} (MD5 {src.md5}), "
        f"or set {URL_BASE_ENV} to a mirror"
    )

    def verify(tmp: Path, md5: str) -> None:
        if md5 != src.md5:
            raise DataError(
                f"downloaded {src.url} but its MD5 is {md5}, not the published MD5 {src.md5}: "
                f"the server sent a different or incomplete file. Rerun to retry, or {manual}"
            )

    fetch(src.url, dest, src.title, manual, verify)


def _ensure_archive(src: CifarSource, archive: Path, download: bool) -> None:
    if archive.is_file():
        digest = _md5(archive)
        if digest != src.md5:
            raise DataError(
                f"{src.title} archive {archive} has MD5 {digest} but the published MD5 is "
                f"{src.md5}: the file is corrupt or incomplete; delete it and rerun to download "
                f"it again (or replace it with the official archive from {src.url})"
            )
        return
    if not download:
        raise DataError(
            f"{src.title} archive not found at {archive} and downloading is disabled: download "
            f"{src.url} (MD5 {src.md5}) and place it at {archive}, or allow downloading"
        )
    _download(src, archive)


def _read_archive(src: CifarSource, archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read both splits from the .tar.gz: ``{"train": (data N x 3072, labels), "test": ...}``."""
    wanted = {f"{src.folder}/{f}" for f in (*src.train_files, *src.test_files)}
    found: dict[str, Any] = {}
    corrupt = f"{src.title} archive {archive} is truncated or corrupt"
    fix = "delete it and rerun to download it again"
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted or name in found:
                    continue
                if not member.isfile():
                    raise DataError(f"{corrupt}: {name} is not a regular file; {fix}")
                if member.size > _MAX_MEMBER_BYTES:
                    raise DataError(f"{corrupt}: {name} claims {member.size} bytes; {fix}")
                f = tar.extractfile(member)
                assert f is not None
                raw = f.read()
                if len(raw) != member.size:
                    raise DataError(f"{corrupt}: {name} ended early; {fix}")
                found[name] = _unpickle(raw, f"{name} in {archive}")
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{corrupt} ({type(exc).__name__}: {exc}); {fix}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{corrupt}, or not the official {src.title} archive: it lacks {', '.join(missing)}; {fix}"
        )

    out = {}
    for split, files in (("train", src.train_files), ("test", src.test_files)):
        datas, labels = [], []
        for fname in files:
            name = f"{src.folder}/{fname}"
            d, y = _validate_batch(src, found[name], f"{name} in {archive}")
            datas.append(d)
            labels.append(y)
        out[split] = (np.concatenate(datas), np.concatenate(labels))
    return out


def _validate_batch(src: CifarSource, batch: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    bad = f"{where} is not a valid {src.title} batch"
    fix = "the archive is corrupt; delete it and rerun to download it again"
    if not isinstance(batch, dict):
        raise DataError(f"{bad} (a {type(batch).__name__}, expected a dict): {fix}")
    for key in (b"data", src.label_key):
        if key not in batch:
            raise DataError(f"{bad} (no {key!r} entry): {fix}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{bad} (data is a {desc}, expected uint8 N x 3072): {fix}")
    try:
        labels = np.asarray(batch[src.label_key])
    except Exception:  # noqa: BLE001 - anything odd in the label entry
        labels = np.asarray([None])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{bad} (labels are not a list of integers): {fix}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{bad} ({data.shape[0]} images but {labels.shape[0]} labels): {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= src.num_classes):
        raise DataError(
            f"{bad} (labels range {labels.min()}..{labels.max()}, expected 0..{src.num_classes - 1}): {fix}"
        )
    return data, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# cache


def cache_path(data_dir: str | os.PathLike, name: str, split: str) -> Path:
    """Where the parsed split is cached: ``<data_dir>/auxpar_cache/<name>-<split>.pt``."""
    return Path(data_dir) / CACHE_DIRNAME / f"{name}-{split}.pt"


def _load_cache(path: Path, src: CifarSource) -> dict[str, Any] | None:
    return load_split_cache(path, {"format": CACHE_FORMAT, "md5": src.md5}, (3, 32, 32), src.num_classes)


def load_split_cache(path: Path, header: dict, image_shape: tuple, num_classes: int) -> dict[str, Any] | None:
    """A cached split (see :func:`save_split_caches`) if it exists, matches ``header`` (format
    and source checksum) and holds sane tensors; None otherwise (the caller rebuilds it)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = obj["images"], obj["labels"]
        ok = (
            all(obj.get(k) == v for k, v in header.items())
            and isinstance(images, torch.Tensor)
            and isinstance(labels, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape[1:]) == tuple(image_shape)
            and labels.dtype == torch.int64
            and labels.shape == (images.shape[0],)
            and len(obj["mean"]) == image_shape[0]
            and len(obj["std"]) == image_shape[0]
            and (labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < num_classes))
        )
    except Exception as exc:  # noqa: BLE001 - a bad cache is never fatal
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if not ok:
        log.info("cache %s is stale or invalid; rebuilding it", path)
        return None
    return obj


def _save_cache(path: Path, obj: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(obj, tmp_name)
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    except OSError as exc:  # a read-only data_dir only costs speed
        log.warning("could not write cache %s (%s); the archive will be parsed again next time", path, exc)


# --------------------------------------------------------------------------------------------
# front door


def load_cifar10(split: str, data_dir: str | os.PathLike = "data", download: bool = True, **_) -> ImageDataset:
    """The registered loader of ``cifar10`` (:mod:`auxpar.registry`)."""
    return load_cifar("cifar10", split, data_dir=data_dir, download=download)


def load_cifar100(split: str, data_dir: str | os.PathLike = "data", download: bool = True, **_) -> ImageDataset:
    """The registered loader of ``cifar100`` (:mod:`auxpar.registry`)."""
    return load_cifar("cifar100", split, data_dir=data_dir, download=download)


def load_cifar(
    name: str,
    split: str,
    data_dir: str | os.PathLike = "data",
    download: bool = True,
    source: CifarSource | None = None,
) -> ImageDataset:
    """Load a CIFAR split as an :class:`ImageDataset` (uint8 N x 3 x 32 x 32, int64 labels).

    ``name`` is ``cifar10`` or ``cifar100`` (also the cache key); ``source`` replaces the
    registry entry (tests use it for a local URL and MD5). Sample ids follow the archive order
    (train: data_batch_1..5 concatenated), so they are the same on every run.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'test'")
    src = _resolve_source(name, source)
    cached = _load_cache(cache_path(data_dir, name, split), src)
    if cached is None:
        archive = Path(data_dir) / src.filename
        _ensure_archive(src, archive, download)
        splits = _read_archive(src, archive)
        images = {s: torch.from_numpy(data).reshape(-1, 3, 32, 32) for s, (data, _) in splits.items()}
        cached = save_split_caches(data_dir, name, split, {s: (images[s], lab) for s, (_, lab) in splits.items()},
                                   {"format": CACHE_FORMAT, "md5": src.md5})
    return dataset_from_cache(name, cached, src.num_classes, split)


def save_split_caches(data_dir, name: str, split: str, splits: dict, header: dict) -> dict:
    """Cache every split ({split: (uint8 image tensor, label array)}) with the training set's
    normalization and ``header``; returns the cache object of ``split``."""
    mean, std = channel_stats(splits["train"][0])
    out = None
    for s, (images, labels) in splits.items():
        obj = {**header, "images": images.contiguous(),
               "labels": torch.from_numpy(labels).to(torch.int64).contiguous(),
               "mean": tuple(mean), "std": tuple(std)}
        _save_cache(cache_path(data_dir, name, s), obj)
        if s == split:
            out = obj
    assert out is not None
    return out


def dataset_from_cache(name: str, cached: dict, num_classes: int, split: str) -> ImageDataset:
    return ImageDataset(name, cached["images"].contiguous(), cached["labels"], num_classes,
                        tuple(cached["mean"]), tuple(cached["std"]), split=split)
