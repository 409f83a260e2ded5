"""Downloading a dataset file: streamed to a temporary file next to its destination with a
progress bar, checked by the caller's ``verify``, then renamed into place (atomic), so a
failed or corrupt download never leaves a file that looks complete. Every failure is one
DataError that names the URL and the manual fix."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from auxpar.errors import DataError

log = logging.getLogger("auxpar")

DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fetch(url: str, dest: Path, title: str, manual: str, verify: Callable[[Path, str], None]) -> None:
    """Download ``url`` to ``dest``. ``verify(tmp_path, md5_hex)`` checks the finished file and
    raises DataError if it is not usable; ``manual`` completes messages ("..., or {manual}")."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the data directory {dest.parent} ({exc}): choose a writable data_dir"
        ) from None
    log.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        got, total = 0, None
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    from tqdm import tqdm

                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                              file=sys.stderr, disable=not stderr_is_tty()) as bar:
                        while True:
                            chunk = resp.read(_CHUNK)
                            if not chunk:
                                break
                            out.write(chunk)
                            h.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    reason = f"HTTP {exc.code} {exc.reason}"
                else:
                    reason = getattr(exc, "reason", None) or exc
                raise DataError(
                    f"could not download {title} from {url} ({reason}): the URL could not be "
                    f"reached. Check the network, or {manual}"
                ) from None
        if total is not None and got != total:
            raise DataError(f"download of {url} stopped after {got} of {total} bytes: rerun to retry, or {manual}")
        verify(tmp, h.hexdigest())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
