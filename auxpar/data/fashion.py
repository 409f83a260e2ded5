"""Fashion-MNIST (Zalando Research) from its four official IDX files.

The files are ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``: 60000 training and 10000 test
images, 28x28 grey-scale, labels 0..9 (T-shirt/top, trouser, pullover, dress, coat, sandal,
shirt, sneaker, bag, ankle boot).

Flow of :func:`load_fashion`:

1. If ``<data_dir>/auxpar_cache/fashion-mnist-<split>.pt`` exists and was built from files with
   the expected hashes, it is loaded and nothing else is touched. A corrupt or stale cache is
   ignored and rebuilt.
2. Otherwise each file is taken from ``<data_dir>/<name>``; if it is not there, from the Debian
   package's folder :data:`SYSTEM_DIR` (``apt-get install dataset-fashion-mnist``); if neither
   has it and ``download`` is true, it is downloaded to ``<data_dir>/<name>`` (streamed to a
   temporary file, checked, then atomically renamed).
3. Each file is decompressed, parsed strictly (magic number, dimensions, exact byte length,
   image and label counts agree, labels in 0..9) and the SHA-256 of the *decompressed* payload
   is compared with :data:`FASHION_SHA256`. The payload is what is pinned, not the ``.gz``:
   Debian recompresses the files, so their ``.gz`` bytes differ from the official ones while the
   content is identical. Both splits are then written to the uint8 cache.

Every problem (missing, truncated, corrupt, wrong file, hash mismatch, unreachable URL) is a
:class:`~auxpar.errors.DataError` naming the file, what is wrong and the fix.

Mirrors: set ``AUXPAR_FASHION_URL_BASE`` (e.g. ``https://mirror.example/fashion-mnist``) to
download ``<base>/<name>`` instead of the official URL; the hashes are still checked.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from auxpar.data.cifar import cache_path, dataset_from_cache, load_split_cache, save_split_caches
from auxpar.data.download import fetch
from auxpar.data.datasets import ImageDataset
from auxpar.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "fashion-mnist"
TITLE = "Fashion-MNIST"
NUM_CLASSES = 10
SIZE = 28
URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
"""Where Zalando Research publishes the four files."""
URL_BASE_ENV = "AUXPAR_FASHION_URL_BASE"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the files."""
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CACHE_FORMAT = 1
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_MAX_PAYLOAD = 64 << 20  # the largest official payload (train images) is 47,040,016 bytes
_CHUNK = 1 << 20


@dataclass(frozen=True)
class IdxFile:
    filename: str
    kind: str  # "images" or "labels"
    split: str


FILES: dict[str, tuple[IdxFile, IdxFile]] = {
    "train": (IdxFile("train-images-idx3-ubyte.gz", "images", "train"),
              IdxFile("train-labels-idx1-ubyte.gz", "labels", "train")),
    "test": (IdxFile("t10k-images-idx3-ubyte.gz", "images", "test"),
             IdxFile("t10k-labels-idx1-ubyte.gz", "labels", "test")),
}

#: SHA-256 of the *decompressed* official files, computed from Debian's dataset-fashion-mnist
#: 0.0~git20200523.55506a9-1 (the files of zalandoresearch/fashion-mnist at 55506a9).
#: Payload sizes: 47,040,016 / 60,008 / 7,840,016 / 10,008 bytes.
FASHION_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


# --------------------------------------------------------------------------------------------
# IDX parsing


def parse_idx(payload: bytes, kind: str, where: str) -> np.ndarray:
    """Parse a decompressed IDX payload strictly.

    ``kind="images"``: magic 2051, dimensions ``n x 28 x 28``, exactly ``16 + n * 784`` bytes;
    returns ``uint8 n x 1 x 28 x 28``. ``kind="labels"``: magic 2049, exactly ``8 + n`` bytes,
    every label in 0..9; returns ``int64 n``. Anything else is a :class:`DataError` naming
    ``where``.
    """
    fix = _fix_hint(where)
    if kind == "images":
        header, magic_want, what = 16, IMAGES_MAGIC, "an image file (magic 2051)"
    elif kind == "labels":
        header, magic_want, what = 8, LABELS_MAGIC, "a label file (magic 2049)"
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    if len(payload) < header:
        raise DataError(
            f"{where} is truncated: it holds {len(payload)} bytes, less than the {header}-byte IDX "
            f"header of {what}; {fix}"
        )
    fields = [int.from_bytes(payload[i:i + 4], "big") for i in range(0, header, 4)]
    magic, n = fields[0], fields[1]
    if magic != magic_want:
        other = {IMAGES_MAGIC: " (that of an image file)", LABELS_MAGIC: " (that of a label file)"}.get(magic, "")
        raise DataError(
            f"{where} has IDX magic number {magic} (0x{magic:08x}){other}, but it should be {what}: "
            f"it is not the Fashion-MNIST {kind} file it is named after; {fix}"
        )
    if kind == "images":
        rows, cols = fields[2], fields[3]
        if (rows, cols) != (SIZE, SIZE):
            raise DataError(
                f"{where} holds {rows}x{cols} images, but Fashion-MNIST images are {SIZE}x{SIZE}; {fix}"
            )
        want = header + n * SIZE * SIZE
        unit = f"{n} images of {SIZE}x{SIZE}"
    else:
        want = header + n
        unit = f"{n} labels"
    if len(payload) != want:
        how = "is truncated" if len(payload) < want else "has trailing bytes"
        raise DataError(
            f"{where} {how}: its header announces {unit}, which take exactly {want} bytes, but it "
            f"holds {len(payload)}; {fix}"
        )
    data = np.frombuffer(payload, dtype=np.uint8, offset=header)
    if kind == "images":
        return data.reshape(n, 1, SIZE, SIZE)
    if n and int(data.max()) >= NUM_CLASSES:
        bad = int(np.argmax(data >= NUM_CLASSES))
        raise DataError(
            f"{where} has label {int(data[bad])} at position {bad}, outside 0..{NUM_CLASSES - 1}; {fix}"
        )
    return data.astype(np.int64)


def _fix_hint(where: str) -> str:
    return (f"delete it and rerun to download it again, or install the Debian package "
            f"{DEBIAN_PACKAGE} (files in {SYSTEM_DIR})")


def read_payload(path: Path) -> bytes:
    """The decompressed bytes of a ``.gz`` file (at most 64 MiB), or a :class:`DataError`."""
    fix = _fix_hint(str(path))
    try:
        with gzip.open(path, "rb") as f:
            payload = f.read(_MAX_PAYLOAD + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a complete gzip file ({type(exc).__name__}: {exc}); {fix}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}); {fix}") from None
    if len(payload) > _MAX_PAYLOAD:
        raise DataError(f"{path} decompresses to more than {_MAX_PAYLOAD} bytes: it is not a "
                        f"Fashion-MNIST file; {fix}")
    return payload


def read_idx_file(path: Path, spec: IdxFile, sha256: str) -> np.ndarray:
    """Decompress, parse strictly and check the payload's SHA-256 against ``sha256``."""
    payload = read_payload(path)
    array = parse_idx(payload, spec.kind, str(path))
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise DataError(
            f"{path} decompresses to content with SHA-256 {digest}, not the expected {sha256}: "
            f"it is not the official {TITLE} {spec.filename} (corrupt, modified or another "
            f"data set); {_fix_hint(str(path))}"
        )
    return array


# --------------------------------------------------------------------------------------------
# finding and downloading the files


def _url_base(url_base: str | None) -> str:
    if url_base is not None:
        return url_base.rstrip("/")
    env = os.environ.get(URL_BASE_ENV, "").strip()
    return (env or URL_BASE).rstrip("/")


def _download(url: str, dest: Path, spec: IdxFile, sha256: str) -> None:
    """Stream ``url`` next to ``dest``, check it like a local file, then rename it into place."""
    manual = (
        f"download {url} yourself and place it at {dest}, install the Debian package "
        f"{DEBIAN_PACKAGE}, or set {URL_BASE_ENV} to a mirror"
    )

    def verify(tmp: Path, md5: str) -> None:
        try:
            read_idx_file(tmp, spec, sha256)
        except DataError as exc:
            raise DataError(f"downloaded {url}, but the file is not usable: {exc}. Rerun to retry, "
                            f"or {manual}") from None

    fetch(url, dest, TITLE, manual, verify)


def locate(spec: IdxFile, data_dir: Path, system_dir: Path, download: bool, url_base: str,
           sha256: str) -> Path:
    """``data_dir/name``, else ``system_dir/name``, else download to ``data_dir/name``."""
    for folder in (data_dir, system_dir):
        path = folder / spec.filename
        if path.is_file():
            return path
    dest = data_dir / spec.filename
    url = f"{url_base}/{spec.filename}"
    if not download:
        raise DataError(
            f"{TITLE} file {spec.filename} not found in {data_dir} nor in {system_dir}, and "
            f"downloading is disabled: install the Debian package {DEBIAN_PACKAGE}, or download "
            f"{url} and place it at {dest}, or allow downloading"
        )
    _download(url, dest, spec, sha256)
    return dest


# --------------------------------------------------------------------------------------------
# cache


def _load_cache(path: Path, hashes: list[str]) -> dict[str, Any] | None:
    # (the hashes list round-trips through the cache as a list)
    return load_split_cache(path, {"format": CACHE_FORMAT, "sha256": list(hashes)}, (1, SIZE, SIZE), NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# front door


def load_fashion(
    split: str,
    data_dir: str | os.PathLike = "data",
    download: bool = True,
    *,
    system_dir: str | os.PathLike | None = None,
    sha256: Mapping[str, str] | None = None,
    url_base: str | None = None,
    **_,
) -> ImageDataset:
    """Load a Fashion-MNIST split as an :class:`ImageDataset` (uint8 N x 1 x 28 x 28, int64 labels).

    ``system_dir`` replaces :data:`SYSTEM_DIR`, ``sha256`` (file name -> payload SHA-256)
    replaces :data:`FASHION_SHA256` and ``url_base`` replaces the official/mirror URL (tests use
    them for tiny files; the hash check itself is never skipped). Sample ids follow the file
    order, so they are the same on every run. mean/std come from the training images.
    """
    if split not in FILES:
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'test'")
    expected = dict(FASHION_SHA256 if sha256 is None else sha256)
    specs = [spec for pair in FILES.values() for spec in pair]
    missing = [s.filename for s in specs if s.filename not in expected]
    if missing:
        raise ConfigError(f"no expected SHA-256 for {', '.join(missing)}")
    hashes = [expected[s.filename] for s in specs]
    cached = _load_cache(cache_path(data_dir, NAME, split), hashes)
    if cached is None:
        root = Path(data_dir)
        sysdir = Path(SYSTEM_DIR if system_dir is None else system_dir)
        base = _url_base(url_base)
        arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s, (img_spec, lab_spec) in FILES.items():
            img_path = locate(img_spec, root, sysdir, download, base, expected[img_spec.filename])
            images = read_idx_file(img_path, img_spec, expected[img_spec.filename])
            lab_path = locate(lab_spec, root, sysdir, download, base, expected[lab_spec.filename])
            labels = read_idx_file(lab_path, lab_spec, expected[lab_spec.filename])
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
                    f"{labels.shape[0]} labels: the two {s} files do not belong together; "
                    f"{_fix_hint(str(img_path))}"
                )
            arrays[s] = (torch.from_numpy(images.copy()), labels)
        cached = save_split_caches(data_dir, NAME, split, arrays, {"format": CACHE_FORMAT, "sha256": list(hashes)})
    return dataset_from_cache(NAME, cached, NUM_CLASSES, split)
