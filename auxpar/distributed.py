"""Process layout: the ONLY module that reads torchrun's environment.

Two ways to get N processes:

* ``torchrun --nproc_per_node=N -m auxpar train ...``: torchrun sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT; :func:`init` joins the group.
* ``auxpar train --nproc N ...``: :func:`launch_local` starts N copies of the same command
  with that environment set (gloo on CPU), waits for them, and if one fails stops the others
  at once, so a crashed or misconfigured rank never leaves its peers hanging in a collective.

Backend: nccl when the device is CUDA, gloo otherwise (``dist.backend`` may force one). It is
decided before the device: nccl needs one GPU per local rank (too few GPUs stops with both
counts), gloo may put several ranks on one GPU.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as tdist

from auxpar.errors import DistributedError



@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    """'none' when running as a single process without a process group."""

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def env_layout() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's variables; (0, 1, 0, 1) if unset."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise DistributedError(f"malformed torchrun environment ({exc}); launch with torchrun or --nproc") from None
    return rank, world, local_rank, local_world


def under_launcher() -> bool:
    """True when this process was started by torchrun or by ``--nproc`` (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


def resolve_backend(device: str, backend: str) -> str:
    """The process-group backend for ``--device``/``--backend`` (before any device is touched).

    auto: nccl when the run will use CUDA (``--device cuda``, or auto with a visible GPU), gloo
    otherwise. nccl needs CUDA: asking for it without a GPU, or together with ``--device cpu``,
    stops here with the fix, before any rank joins a collective."""
    if backend == "auto":
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return "nccl" if cuda else "gloo"
    if backend == "nccl":
        if device == "cpu":
            raise DistributedError("dist.backend = nccl needs CUDA devices but dist.device = cpu; "
                                   "use --backend gloo on the CPU (or --device cuda)")
        if not torch.cuda.is_available():
            raise DistributedError("dist.backend = nccl needs CUDA devices but torch sees no GPU; "
                                   "use --backend gloo on the CPU")
    return backend


def pick_device(kind: str, local_rank: int, backend: str = "none",
                local_world_size: int | None = None) -> torch.device:
    """This rank's device. On CUDA, local rank r gets GPU r.

    nccl needs one GPU per local rank: more local ranks than visible GPUs stops with both
    counts (nccl cannot put two ranks on one GPU). gloo (and a single process) may share GPUs on
    purpose, rank r on GPU r % n: several ranks per GPU for development."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()) or backend == "nccl":
        if kind == "cpu":
            raise DistributedError("dist.backend = nccl needs CUDA devices but dist.device = cpu; "
                                   "use --backend gloo on the CPU (or --device cuda)")
        if not torch.cuda.is_available():
            fix = "use --backend gloo on the CPU" if backend == "nccl" else "use --device cpu"
            raise DistributedError(f"dist.device = cuda but torch sees no CUDA device; {fix}")
        n = torch.cuda.device_count()
        local_world = local_rank + 1 if local_world_size is None else local_world_size
        # A launcher that binds one GPU to each process (CUDA_VISIBLE_DEVICES with one entry per
        # process, as SLURM's --gpus-per-task does) shows every rank one GPU, its own: that is
        # not sharing; init() then checks the physical GPUs (their UUIDs) across local ranks.
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        bound = n == 1 and len(visible) == 1
        if backend == "nccl" and not bound and (local_rank >= n or local_world > n):
            err = DistributedError(
                f"{max(local_world, local_rank + 1)} local ranks but only {n} visible GPU(s); nccl needs "
                "one GPU per process: start at most one process per GPU on each node (e.g. "
                f"--nproc {n} or torchrun --nproc_per_node={n}), or pass --backend gloo to let "
                "several ranks share a GPU (development only)")
            # Every rank sees the too-small GPU count when the layout itself is too big (rank 0
            # reports); a lone rank with a stray LOCAL_RANK speaks for itself.
            err.same_on_every_rank = local_world > n
            raise err
        dev = torch.device("cuda", local_rank % n)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def default_threads(local_world_size: int) -> int:
    """One core share per local process, so N ranks on N cores do not oversubscribe the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def init(device: str = "auto", backend: str = "auto", timeout_s: float = 300.0,
         threads: int = 0) -> DistInfo:
    """Join the process group described by the environment (or stay single-process)."""
    global _joined_group
    rank, world, local_rank, local_world = env_layout()
    launched = under_launcher()
    # The backend first: whether ranks may share a GPU (gloo) or need one each (nccl) decides
    # how the device is picked. A single process has no group ('none').
    backend = resolve_backend(device, backend) if launched else "none"
    dev = pick_device(device, local_rank, backend, local_world if launched else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    elif launched:
        torch.set_num_threads(default_threads(local_world))
    if not launched:
        return DistInfo(0, 1, 0, 1, dev, "none")
    if not tdist.is_initialized():
        bind_defaults_before_the_group()
        timeout = datetime.timedelta(seconds=timeout_s)
        # The rendezvous store outlives a torchrun restart (the agent keeps it), so the previous
        # attempt's keys (e.g. gloo peer addresses of dead workers) are still there; a restarted
        # worker could read one and fail with "connection refused". Each attempt gets its own
        # key space.
        store, rank, world = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
        tdist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timeout,
            store=tdist.PrefixStore(f"auxpar/attempt{attempt}", store),
            device_id=dev if dev.type == "cuda" else None,
        )
        _joined_group = True
        if backend == "nccl":
            check_one_rank_per_gpu(tdist.PrefixStore(f"auxpar/attempt{attempt}/gpus", store), dev,
                                   local_rank, local_world)
    return DistInfo(rank, world, local_rank, local_world, dev, backend)


def check_one_rank_per_gpu(store, dev: torch.device, local_rank: int, local_world: int) -> None:
    """nccl cannot put two ranks on one GPU: each local rank publishes its GPU's UUID (under its
    host name) in the rendezvous store and reads its node's others; a shared GPU stops every
    rank of the node with both counts, before NCCL's own duplicate-GPU error."""
    host = socket.gethostname()
    try:
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
    except Exception:  # noqa: BLE001 - no UUID to compare: the count check in pick_device stands
        return
    store.set(f"{host}/{local_rank}", uuid)
    gpus = [store.get(f"{host}/{r}").decode() for r in range(local_world)]
    distinct = len(set(gpus))
    if distinct < local_world:
        shared = sorted(r for r in range(local_world) if gpus.count(gpus[r]) > 1)
        err = DistributedError(
            f"{local_world} local ranks but only {distinct} distinct GPU(s) on {host} (local ranks "
            f"{shared} share one); nccl needs one GPU per process: start at most {distinct} processes "
            f"per node (--nproc {distinct} or torchrun --nproc_per_node={distinct}), or pass --backend "
            "gloo to let several ranks share a GPU (development only)")
        err.same_on_every_rank = True
        raise err


def bind_defaults_before_the_group() -> None:
    """Import the torch modules whose functions take ``group=group.WORLD`` as a *default
    argument* before the group exists (the default is then None, "the default group").

    ``torch.distributed.nn.functional`` is such a module, and it is imported lazily: the first
    ``torch.optim`` optimizer imports ``torch._dynamo``, which imports it. Imported after
    ``init_process_group``, its ten collectives keep the world ProcessGroup in their
    ``__defaults__`` for the life of the process, so ``destroy_process_group`` frees nothing:
    gloo's worker and transport threads and rank 0's TCPStore server stay alive until
    interpreter teardown and C++ static destruction, racing with the peers' exit
    ("terminate called without an active exception", SIGABRT, after a finished run)."""
    import torch.distributed.nn.functional  # noqa: F401


_drains: list[Callable[[], None]] = []
_joined_group = False  # this process called init_process_group through init()
_exit_armed = False


def register_drain(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a clean :func:`shutdown` before the final barrier: a method waits there for
    the point-to-point sends it still holds (and drops its Work objects), so that nothing of
    the process group is referenced when it is destroyed. Hooks run once, last registered first."""
    _drains.append(fn)


def _drain() -> None:
    while _drains:
        _drains.pop()()
    # Work objects caught in reference cycles (a method's dicts of posted messages) would
    # otherwise live until interpreter teardown, and with them gloo's context and threads.
    gc.collect()


_GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")
"""Thread names of a gloo process group (worker loops, transport loop) and of rank 0's TCPStore
server, as Linux shows them in /proc/self/task/*/comm."""


def group_threads_alive() -> list[str]:
    """Names of this process's gloo / TCPStore threads still running ([] where /proc is absent)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm", encoding="utf-8") as fh:
                name = fh.read().strip()
        except OSError:
            continue
        if name in _GROUP_THREADS:
            names.append(name)
    return sorted(names)


def shutdown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group.

    Clean exit: pending sends are drained (:func:`register_drain`), all ranks meet at a barrier
    (tearing down gloo while a peer is still finishing, e.g. the log rank writing summary.json,
    made a rank abort), then the group is destroyed.

    ``destroy_process_group`` only drops the Python registry's references. While anything else
    still references the group (a Work object, a function default, a DDP reducer), gloo's
    worker and transport threads and, on rank 0, the TCPStore server thread stay alive; they
    then die during interpreter teardown and C++ static destruction, racing with the peers that
    exit at the same moment: "terminate called without an active exception" and SIGABRT on a
    run that had finished and written summary.json. :func:`init` removes the cause found for
    penalty/AL (see :func:`bind_defaults_before_the_group`), and the threads are then gone when
    this returns. If some are still alive (measured, not assumed: /proc/self/task), the
    interpreter's teardown is skipped instead: at exit, stdout, stderr and the log handlers are
    flushed and the process ends with ``os._exit(0)``; every file of the run is already written
    atomically and closed, and Python code after shutdown still runs normally. Never after an
    error: that exit keeps its status.
    """
    global _exit_armed
    if info.distributed and tdist.is_initialized():
        if clean:
            _drain()
            barrier(info)
        else:
            _drains.clear()
        tdist.destroy_process_group()
        if clean and _joined_group and not _exit_armed:
            gc.collect()
            left = group_threads_alive()
            if left:
                logging.getLogger("auxpar").debug(
                    "process group threads still alive after destroy_process_group (%s): "
                    "ending without interpreter teardown", ", ".join(left))
                _exit_armed = True
                atexit.register(_exit_without_teardown)  # registered last: runs first at exit


def _exit_without_teardown() -> None:
    """atexit hook armed by a clean :func:`shutdown`: flush and end the process at once."""
    if getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None:
        return  # an uncaught exception after the shutdown: keep Python's exit status
    for h in list(logging.getLogger().handlers) + list(logging.getLogger("auxpar").handlers):
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not turn a clean exit into an error
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(0)


def is_comm_failure(exc: BaseException) -> bool:
    """A peer died, stalled past the timeout, or closed its connection."""
    if isinstance(exc, getattr(tdist, "DistBackendError", ())) or isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                            "gloo", "nccl", "socket"))


def comm_failure_error(exc: BaseException, info: DistInfo, timeout_s: float) -> DistributedError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    timed_out = "timed out" in first.lower() or "timeout" in first.lower()
    why = (f"no message from a peer within the {timeout_s:g} s timeout: another rank stalled or died"
           if timed_out else "the connection to another rank failed: it probably died")
    err = DistributedError(
        f"stopped: {why} ({first[:200]}). Look for the first error of another rank "
        "above; raise --timeout if a rank is legitimately slow (e.g. a long evaluation or checkpoint)")
    err.same_on_every_rank = False
    return err


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            tdist.barrier(device_ids=[info.device.index])
        else:
            tdist.barrier()


def all_reduce_(info: DistInfo, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over all ranks (no-op single-process). op: sum or max."""
    if info.distributed:
        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


def reduce_floats(info: DistInfo, values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few Python numbers (end-of-run accounting, not the hot loop)."""
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    all_reduce_(info, t, op)
    return t.tolist()


# --------------------------------------------------------------------------- local launcher

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], nproc: int, grace_s: float = 5.0) -> int:
    """Run ``python -m auxpar <argv>`` as ``nproc`` ranks on this machine; return the exit code.

    The first rank that exits non-zero stops the job: the others are terminated (then killed
    after ``grace_s``), so a failure never becomes a hang. Its exit code is returned.
    """
    port = _free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   AUXPAR_LOCAL_LAUNCH="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "auxpar", *argv], env=env))
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                print(f"auxpar: rank {rank} {how}; stopping the other {nproc - 1} rank(s)", file=sys.stderr)
                code = code if code > 0 else 1
                # An error every rank hits (the NaN guard, a bad setting) ends all ranks at once,
                # and rank 0 reports it: give them a moment to exit by themselves first.
                deadline = time.monotonic() + min(grace_s, 3.0)
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                break
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        code = 130
    _stop_all(procs, grace_s)
    return code


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
