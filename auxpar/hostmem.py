"""Host memory policy of a process: keep freed tensor memory in the process, or give it back.

PyTorch's CPU tensors are allocated with glibc's malloc. A training step allocates and frees the
same large activation buffers (ResNet-20 on Fashion-MNIST at batch 128: 6.4 MB each) over and
over. glibc's defaults give such buffers back to the kernel (``munmap`` above the dynamic mmap
threshold, ``brk`` trimming of a free heap top), so the next step takes a page fault for every
4 KiB page of them and the kernel zeroes it: on one CPU core that cost ResNet-20's serial step
about a sixth of its time (``experiments/bench_hostmem.py``).

``run.host_memory = "keep"`` (the default) tells glibc, through ``mallopt``, to serve blocks up
to 1 GiB from the heap and never to trim it below 2 GiB of free top, so freed buffers are reused
without page faults, as PyTorch's CUDA caching allocator does for device memory. The process
then holds its peak working set until it exits; its peak (``peak_memory_bytes``) is unchanged.
Blocks above 1 GiB (a full-set aux store, a dataset cache) are still mapped and unmapped directly.
``"release"`` leaves glibc's defaults. Where the C library is not glibc (macOS, musl), there is
nothing to set and the policy reads ``"unavailable"``.

Environment variables ``MALLOC_*_`` of glibc still apply first; this only calls ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30
"""Blocks up to this size come from the heap (and are reused) under ``keep``."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free heap top that glibc keeps before giving memory back (``mallopt`` takes an int)."""
TOP_PAD = 64 << 20
"""Extra bytes asked of the kernel at each heap growth (fewer ``brk`` calls while warming up)."""

_applied: str | None = None


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def configure(policy: str) -> str:
    """Apply ``policy`` ("keep" or "release") to this process; returns what is in force:
    "keep", "release" or "unavailable". "release" after "keep" in one process cannot undo the
    settings and reports "keep" (a process runs one training run; tests call this twice)."""
    global _applied
    if policy not in ("keep", "release"):
        raise ValueError(f"host memory policy {policy!r}: use keep or release")
    if policy == "release":
        return _applied or "release"
    if _applied == "keep":
        return _applied
    libc = _glibc()
    if libc is None:
        return "unavailable"
    ok = all(libc.mallopt(ctypes.c_int(opt), ctypes.c_int(val)) == 1 for opt, val in
             ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    if not ok:
        return "unavailable"
    _applied = "keep"
    return _applied


def in_force() -> str:
    """The policy this process runs under: "keep" once :func:`configure` applied it, else "release"
    (glibc's defaults) or "unavailable" where there is no glibc."""
    if _applied:
        return _applied
    return "release" if _glibc() is not None else "unavailable"
