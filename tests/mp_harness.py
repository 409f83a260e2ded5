"""Run a function on K gloo ranks (separate processes) and collect what each rank returns.

The function must live at module level in an importable test module; it receives
(rank, world, *args) after the process group is up and returns tensors / plain containers.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, outdir):
    from auxpar import distributed as adist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # As auxpar.distributed.init/shutdown do (the teardown race): bind torch's WORLD-defaulted
    # functions before the group exists, and complete every pending send before leaving it, so
    # no gloo thread outlives destroy_process_group and aborts the process at exit.
    adist.bind_defaults_before_the_group()
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        adist._drain()
        dist.barrier()
    finally:
        adist._drains.clear()
        dist.destroy_process_group()
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def run_ranks(fn, world: int, *args):
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(world, _free_port(), fn, args, outdir), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
