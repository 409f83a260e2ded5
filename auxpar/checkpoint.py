"""Atomic, safe files: checkpoints and JSON written so that a crash never leaves a half file.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
renamed over the target (``os.replace`` is atomic on POSIX). A reader therefore sees the old
file or the new one, never a torn one. Checkpoints hold tensors and plain containers only and
are read with ``torch.load(weights_only=True)``, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from auxpar.errors import AuxparError


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_tensors(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` (tensors and plain containers) atomically."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    p = Path(path)
    if not p.is_file():
        raise AuxparError(f"{p} does not exist; check the path")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or unsafe file: one clear message
        raise AuxparError(
            f"{p} could not be read as an auxpar tensor file ({type(exc).__name__}: {exc}); "
            "it is corrupt or not an auxpar file"
        ) from None


def write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(text), mode="w")
