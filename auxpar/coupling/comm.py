"""Point-to-point exchange with the neighbouring stages, with byte and time accounting.

Only neighbours talk (stage k with k-1 and k+1); there is no collective in a parallel step,
because the stages' parameter sets are disjoint. Every message is counted in ``bytes_sent``
on the sending rank. Time is split three ways per rank:

* ``compute``: forward, backward, optimizer and aux updates (measured by the caller);
* ``comm``: posting sends and receives and preparing their buffers;
* ``wait``: blocked until a message has arrived (or a send buffer may be reused).

Tags keep the message streams apart: each kind of message has its own tag, alternating with the
step parity so that two in-flight messages of one kind (this step's and the prefetched next
step's) can never be matched out of order.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as tdist

TAG_TARGET, TAG_OUTPUT, TAG_ACT, TAG_GRAD, TAG_INIT, TAG_EVAL = 10, 20, 30, 40, 50, 60


class Neighbours:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world = rank, world_size
        self.prev = rank - 1 if rank > 0 else None
        self.next = rank + 1 if rank + 1 < world_size else None
        self.bytes_sent = 0       # training traffic
        self.bytes_sent_eval = 0  # evaluation traffic (test-set forward), kept apart
        self.time_comm = 0.0
        self.time_wait = 0.0
        self._sends: list = []  # (work, tensor) kept alive until complete

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, track: bool = True, count: str = "train"):
        """Post a send. Tracked sends are kept (with their buffer) until ``reap_sends`` sees them done."""
        t0 = time.perf_counter()
        tensor = tensor.contiguous()
        work = tdist.isend(tensor, dst, tag=tag)
        if track:
            self._sends.append((work, tensor))
        nbytes = tensor.numel() * tensor.element_size()
        if count == "eval":
            self.bytes_sent_eval += nbytes
        else:
            self.bytes_sent += nbytes
            self.time_comm += time.perf_counter() - t0
        return work

    def irecv(self, shape: tuple, dtype: torch.dtype, device: torch.device, src: int, tag: int,
              count: str = "train"):
        """Post a receive; returns (work, buffer)."""
        t0 = time.perf_counter()
        buf = torch.empty(shape, dtype=dtype, device=device)
        work = tdist.irecv(buf, src, tag=tag)
        if count != "eval":
            self.time_comm += time.perf_counter() - t0
        return work, buf

    def wait(self, work, count: str = "train") -> None:
        t0 = time.perf_counter()
        work.wait()
        if count != "eval":
            self.time_wait += time.perf_counter() - t0

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Blocking send (the layer-serial executor: there is nothing to overlap with)."""
        self.wait(self.isend(tensor, dst, tag, track=False))

    def recv(self, shape: tuple, dtype: torch.dtype, device: torch.device, src: int, tag: int,
             count: str = "train") -> torch.Tensor:
        work, buf = self.irecv(shape, dtype, device, src, tag, count)
        self.wait(work, count)
        return buf

    def reap_sends(self, block: bool = False) -> None:
        """Drop completed sends; with ``block``, wait for the rest first.

        Each work is waited on at most once: a second ``wait()`` on a finished gloo send blocks
        until the timeout (found the hard way: a serial-phase epoch hung at its end).
        """
        keep = []
        for work, tensor in self._sends:
            if work.is_completed():
                continue
            if block:
                self.wait(work)
            else:
                keep.append((work, tensor))
        self._sends = keep
