"""Tiny CIFAR archives in the official python format, plus broken and malicious variants.

The real batches were pickled by Python 2 (protocol 2): dict keys and strings are Python 2
``str`` (read back as ``bytes`` with ``encoding="bytes"``) and arrays are rebuilt through
``numpy.core.multiarray._reconstruct``. Python 3's pickler would instead emit
``_codecs.encode`` calls for bytes, so :class:`Py2StylePickler` writes bytes/str the Python 2
way (``BINSTRING``) and the numpy module name is rewritten to the numpy 1 spelling.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from auxpar.data.cifar import CIFAR_SOURCES, CifarSource

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FILENAMES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


class Py2StylePickler(pickle._Pickler):  # the pure-Python pickler, so its dispatch is patchable
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_batches(kind: str, per_batch: int = 16, seed: int = 0) -> dict[str, dict[bytes, Any]]:
    """The batch dicts of a tiny archive, keyed by file name (no folder)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[bytes, Any]] = {}
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for j, f in enumerate(files):
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            out[f] = {
                b"batch_label": f"{f} of 5".encode(),
                b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                b"data": data,
                b"filenames": [f"img_{j}_{i}.png".encode() for i in range(per_batch)],
            }
        out["batches.meta"] = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in "abcdefghij"],
            b"num_vis": 3072,
        }
    elif kind == "cifar100":
        for f, n in (("train", 5 * per_batch), ("test", per_batch)):
            out[f] = {
                b"filenames": [f"img_{f}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{f} batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            }
        out["meta"] = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
    else:
        raise ValueError(kind)
    return out


def expected_split(kind: str, batches: dict[str, dict[bytes, Any]], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(data N x 3072, labels) of a split, in archive order."""
    src = CIFAR_SOURCES[kind]
    files = src.train_files if split == "train" else src.test_files
    data = np.concatenate([batches[f][b"data"] for f in files])
    labels = np.concatenate([np.asarray(batches[f][src.label_key]) for f in files])
    return data, labels


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_archive(directory: Path, kind: str, members: dict[str, bytes], filename: str | None = None) -> tuple[Path, str]:
    """A .tar.gz holding ``<folder>/<name>`` for each member (plus the folder entry)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (filename or FILENAMES[kind])
    folder = FOLDERS[kind]
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, raw in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(raw))
    return path, md5_of(path)


def write_cifar_archive(
    directory: Path,
    kind: str = "cifar10",
    *,
    per_batch: int = 16,
    seed: int = 0,
    tamper: Callable[[str, dict[bytes, Any]], Any] | None = None,
) -> tuple[Path, str]:
    """Write a tiny official-format archive; returns ``(path, md5)``.

    ``tamper(file_name, batch_dict)`` may return a replacement object for a member.
    The content is :func:`make_batches` ``(kind, per_batch, seed)``.
    """
    members = {}
    for name, batch in make_batches(kind, per_batch, seed).items():
        obj = tamper(name, batch) if tamper is not None else batch
        members[name] = py2_pickle(obj)
    if kind == "cifar10":
        members["readme.html"] = b"<html>tiny test archive</html>"
    return write_archive(directory, kind, members)


class _ExecPayload:
    """Unpickling this runs ``exec(code)`` (what a malicious archive would do)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


class _SystemPayload:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def malicious_payload(marker: Path, how: str = "exec") -> Any:
    if how == "exec":
        return _ExecPayload(f"with open({str(marker)!r}, 'w') as f:\n    f.write('pwned')")
    if how == "system":
        return _SystemPayload(f"touch '{marker}'")
    raise ValueError(how)


def write_malicious_archive(directory: Path, marker: Path, kind: str = "cifar10", how: str = "exec") -> tuple[Path, str]:
    """An archive whose first training batch, when unpickled naively, creates ``marker``."""
    first = "data_batch_1" if kind == "cifar10" else "train"

    def tamper(name: str, batch: dict[bytes, Any]) -> Any:
        if name == first:
            batch = dict(batch)
            batch[b"data"] = malicious_payload(marker, how)
        return batch

    return write_cifar_archive(directory, kind, tamper=tamper)


def write_truncated_archive(directory: Path, kind: str = "cifar10", keep: float = 0.6) -> tuple[Path, str]:
    """A valid archive cut to ``keep`` of its bytes; the md5 returned is the truncated file's."""
    path, _ = write_cifar_archive(directory, kind)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path, md5_of(path)


def local_source(kind: str, url: str, md5: str) -> CifarSource:
    """The registry entry of ``kind`` with a substituted URL and MD5."""
    return replace(CIFAR_SOURCES[kind], url=url, md5=md5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on 127.0.0.1 (free port); yields ``(base_url, request_paths)``."""
    requests: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
