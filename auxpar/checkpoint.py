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


# --------------------------------------------------------------------------- training checkpoints
#
# RUN/checkpoints/step-000001234/
#     rank-00000.pt ... rank-NNNNN.pt   one per rank: its stage, optimizer, method and loop state
#     manifest.json                     written LAST, after every rank's file is complete
#
# A checkpoint without a manifest is incomplete (a crash while saving) and is never loaded;
# the manifest records each file's size and SHA-256, so a truncated, corrupted or swapped file
# is refused with a clear message instead of being half-loaded.

CKPT_FORMAT = "auxpar-checkpoint/1"
MANIFEST = "manifest.json"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def ckpt_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step-{step:09d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank-{rank:05d}.pt"


def sha256_file(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(ckpt: str | Path) -> dict | None:
    """The manifest of a complete checkpoint, or None (missing, unreadable, or files missing)."""
    p = Path(ckpt) / MANIFEST
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or man.get("format") != CKPT_FORMAT:
        return None
    files = man.get("files")
    if not isinstance(files, dict):
        return None
    for name, meta in files.items():
        f = Path(ckpt) / name
        if not f.is_file() or f.stat().st_size != meta.get("bytes"):
            return None
    return man


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are skipped)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and read_manifest(d) is not None:
            found.append(d)
    return sorted(found, key=lambda d: d.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and incomplete ones older
    than the newest complete checkpoint. Call only when no rank is writing."""
    import shutil

    done = complete_checkpoints(run_dir)
    if not done:
        return
    newest = done[-1].name
    keep_names = {d.name for d in done[-keep:]}
    for d in ckpt_root(run_dir).iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name not in keep_names and d.name < newest:
            shutil.rmtree(d, ignore_errors=True)
