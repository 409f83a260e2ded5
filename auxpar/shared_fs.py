"""Is the run directory one directory for every rank? Checked before a multi-rank run that
checkpoints (or resumes) takes its first step.

auxpar's checkpoints live in one directory: every rank writes ``RUN/checkpoints/step-N/
rank-R.pt`` and rank 0 writes ``manifest.json`` listing every rank's file (size, SHA-256); a
checkpoint counts as complete only where every listed file is present, and every rank reads the
manifest to resume. On nodes that do not share a filesystem (``--out`` on a node-local disk at
the same path on each node), rank 0 never sees the other nodes' files and those nodes never see
the manifest: saving "works", and resuming silently starts from the beginning, or from a
different step on different nodes. :func:`check_shared_run_dir` finds that out at start and
stops every rank with the same error, which names the ranks, their hosts and the fix.

The probe, with W ranks (4 tiny collectives; a 5th only to explain a failure):

1. a random token from the ranks (an all-reduce of random numbers, so that a stale probe of
   another start can never be mistaken for this one's);
2. every rank writes ``RUN/.fs-probe/<token>-rank-<r>`` (its host name inside), atomically; an
   all-reduce of "could not write" flags is also the barrier after which all probes exist;
3. every rank lists ``RUN/.fs-probe`` once (one directory read, not W look-ups) and looks up by
   name only the probes it did not find, again for up to :data:`GRACE_S` seconds (a network
   filesystem's caches); one all-reduce counts the ranks that miss any;
4. every rank removes its own probe; after a barrier, ``.fs-probe`` is removed (and, after a
   failure, the run directory too where the probe created it and it is empty).

On a failure every rank gathers each rank's host, run directory and missing ranks (one
``all_gather_object``) and raises the same :class:`ConfigError`. Nothing else in the run
directory is touched, so a run that already holds checkpoints keeps them intact.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import torch.distributed as tdist

from auxpar.distributed import DistInfo, barrier, reduce_floats
from auxpar.errors import ConfigError

PROBE_DIR = ".fs-probe"
GRACE_S = 3.0
"""How long a rank keeps looking for probes it did not see at first (a network filesystem
may show another client's new file a moment late); a non-shared directory fails after it."""

FIX = ("auxpar's checkpoints need one directory that every rank reads and writes (each rank writes "
       "its own file and the manifest written by rank 0 lists them all): put --out on a filesystem "
       "shared by all nodes (NFS, Lustre, ...), at the same path on every node, or drop "
       "--checkpoint-every / --resume to train without checkpoints")


def probe_name(token: str, rank: int) -> str:
    return f"{token}-rank-{rank:05d}"


def check_shared_run_dir(run_dir: str | Path, info: DistInfo, grace_s: float | None = None) -> None:
    """Stop every rank with one ConfigError unless all ranks see each other's files in
    ``run_dir`` (a collective: every rank calls it). A no-op for a single process."""
    if not info.distributed or info.world_size <= 1:
        return
    grace_s = GRACE_S if grace_s is None else grace_s
    run_dir = Path(run_dir)
    W, me = info.world_size, info.rank
    token = f"{int(reduce_floats(info, [float(secrets.randbits(48))], op='max')[0]):012x}"
    probes = run_dir / PROBE_DIR
    mine = probes / probe_name(token, me)
    existed = run_dir.is_dir()
    host = socket.gethostname()
    write_error = None
    try:
        probes.mkdir(parents=True, exist_ok=True)
        _write_probe(mine, f"{host}\n{os.getpid()}\n")
    except OSError as exc:
        write_error = f"{exc.strerror or type(exc).__name__}: {exc.filename or run_dir}"
    # the barrier after which every rank's probe exists (or could not be written)
    failed_writes = int(reduce_floats(info, [float(write_error is not None)])[0])
    missing: list[int] = []
    if not failed_writes:
        missing = _missing_probes(probes, token, W, me, grace_s)
    blind = int(reduce_floats(info, [float(bool(missing))])[0]) if not failed_writes else 0
    if write_error is None:
        try:
            mine.unlink()
        except OSError:
            pass
    if not failed_writes and not blind:
        barrier(info)  # every probe is gone: the directory can go too
        _rmdir(probes)
        return
    # ---- failure: every rank learns every rank's view, and raises the same error
    view = {"rank": me, "host": host, "run_dir": str(run_dir), "write_error": write_error,
            "missing": _ranges(missing)}
    views: list = [None] * W
    tdist.all_gather_object(views, view)  # also the barrier after every rank removed its probe
    _rmdir(probes)
    if not existed:
        _rmdir(run_dir)  # created by the probe and empty: leave no trace
    raise ConfigError(failure_message(views))


def _write_probe(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the whole file or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _missing_probes(probes: Path, token: str, world: int, me: int, grace_s: float) -> list[int]:
    """Ranks whose probe this rank cannot see after ``grace_s`` seconds of looking."""
    try:
        names = set(os.listdir(probes))
    except OSError:
        names = set()
    missing = [r for r in range(world) if r != me and probe_name(token, r) not in names]
    deadline = time.monotonic() + grace_s
    while missing and time.monotonic() < deadline:
        time.sleep(0.2)
        missing = [r for r in missing if not (probes / probe_name(token, r)).exists()]
    return missing


def _rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # another rank removed it first, or it is not empty (not ours to empty)


def _ranges(ranks: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for r in sorted(ranks):
        if out and out[-1][1] == r - 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out


def format_ranks(ranges: list[tuple[int, int]] | list[int]) -> str:
    """'rank 3', 'ranks 0-1', 'ranks 0, 2, 5-7' (from ranks or from :func:`_ranges`)."""
    if ranges and not isinstance(ranges[0], (tuple, list)):
        ranges = _ranges(list(ranges))  # type: ignore[arg-type]
    parts = [f"{a}" if a == b else f"{a}-{b}" if b > a + 1 else f"{a}, {b}" for a, b in ranges]
    n = sum(b - a + 1 for a, b in ranges)
    return ("rank " if n == 1 else "ranks ") + ", ".join(parts)


def _expand(ranges) -> list[int]:
    return [r for a, b in ranges for r in range(a, b + 1)]


def _hosts(views: list[dict], ranks: list[int]) -> str:
    hosts = sorted({views[r]["host"] for r in ranks})
    shown = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
    return ("host " if len(hosts) == 1 else "hosts ") + shown


def failure_message(views: list[dict]) -> str:
    """The one message every rank raises, built from every rank's view (the same on every rank)."""
    unwritable = [v["rank"] for v in views if v["write_error"]]
    if unwritable:
        first = views[unwritable[0]]
        return (f"{format_ranks(unwritable)} ({_hosts(views, unwritable)}) cannot write to the run directory "
                f"(rank {first['rank']}: {first['write_error']}): choose a --out that every rank can write, "
                "on a filesystem shared by all nodes (NFS, Lustre, ...)")
    groups: dict[tuple, list[int]] = {}
    for v in views:
        if v["missing"]:
            groups.setdefault(tuple(map(tuple, v["missing"])), []).append(v["rank"])
    lines = []
    for miss, ranks in list(groups.items())[:4]:
        lines.append(f"{format_ranks(ranks)} ({_hosts(views, ranks)}) cannot see the files of "
                     f"{format_ranks(list(miss))} ({_hosts(views, _expand(miss))})")
    if len(groups) > 4:
        lines.append(f"and {len(groups) - 4} more group(s) of ranks")
    dirs: dict[str, list[int]] = {}
    for v in views:
        dirs.setdefault(v["run_dir"], []).append(v["rank"])
    differ = ""
    if len(dirs) > 1:
        differ = (" The ranks were also given different run directories ("
                  + "; ".join(f"{d} on {format_ranks(r)}" for d, r in list(dirs.items())[:4]) + ").")
    return (f"the run directory {views[0]['run_dir']} is not on a filesystem shared by all ranks: "
            + "; ".join(lines) + "." + differ + " " + FIX)
