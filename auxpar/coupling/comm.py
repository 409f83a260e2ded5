"""The one door for point-to-point traffic between ranks, with byte and time accounting.

Every tensor that one rank sends to another (penalty/AL targets and outputs, the layer-serial
executor's activations and gradients, the aux-state re-initialization, evaluation, the MGRIT
solves and the model.pt gather) goes through :meth:`P2P.exchange`. The rest of the code says
*what* travels; this module decides *how*. (``--method pipeline`` is the exception: its
micro-batch traffic is torch.distributed.pipelining's own ``batch_isend_irecv`` schedule, which
the protocol checker covers like ours.)

The NCCL rule, and why this module obeys it by construction
------------------------------------------------------------
NCCL has no tags: between two ranks, messages match in the order they were issued, a receive
blocks its queue until the peer's send, sends may block until the receive (no eager
buffering is assumed), and with ``device_id`` given to ``init_process_group`` every
point-to-point op of a rank shares one queue with the group's collectives. gloo forgives
all of that, so code that works on gloo can deadlock on NCCL. Therefore:

1. **One exchange = one ``batch_isend_irecv``.** All messages of one exchange phase (e.g.
   "send my target down, receive the target from above") are issued as a single batch, so
   they occupy one slot of each queue and progress together.
2. **Canonical op order inside a batch.** Ops are sorted by peer, and for each peer the
   message that flows from the lower to the higher rank comes first; messages of one
   direction keep the caller's order. Both peers compute the same order from the same pair,
   so their batches line up op for op.
3. **No tags.** Every op uses tag 0. Nothing may rely on a tag to separate two messages; two
   ranks must issue their exchanges with each other in the same order, and the n-th message
   from a to b must agree with the n-th receive at b in shape and dtype. The callers' protocols
   (see ``tests/test_protocol.py``) are checked against exactly these rules, in both queue
   models (one queue per rank and group; one per rank, group and peer).
4. **Tensors on the rank's device.** Receive buffers are allocated on ``device`` and a send
   of a tensor on another device is an error: an NCCL-only group has no CPU backend.
   Exception, for development: with the **gloo** backend and a CUDA device (several ranks
   sharing one GPU), sends are staged through host memory and receives land in host buffers
   that :meth:`Exchange.wait` copies to the device (:func:`needs_staging`).

Accounting per rank: ``bytes_sent`` (training traffic) and ``bytes_sent_eval`` (test-set
forward, kept apart); time goes to the method's :class:`~auxpar.timing.Clock` when one is
given: ``comm`` for posting an exchange and preparing its buffers, ``wait`` for the time
blocked until its messages have arrived.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.distributed as tdist

from auxpar.distributed import register_drain
from auxpar.errors import DistributedError


def needs_staging(backend: str, device: torch.device) -> bool:
    """True when tensors must travel through host memory: gloo moves CPU tensors only, so a
    gloo group on CUDA devices (several ranks sharing one GPU for development) stages them."""
    return backend == "gloo" and torch.device(device).type != "cpu"


def canonical_order(me: int, ops: list[tuple[str, int, int]]) -> list[int]:
    """Indices of ``ops`` (kind 'send'/'recv', peer, position) in the order both peers agree on:
    by peer, then the lower-to-higher-rank direction first, then the caller's order."""
    def key(i: int):
        kind, peer, pos = ops[i]
        src, dst = (me, peer) if kind == "send" else (peer, me)
        return (peer, 0 if src < dst else 1, pos)

    return sorted(range(len(ops)), key=key)


class Exchange:
    """An exchange in flight. :meth:`wait` blocks until every message of it has arrived (each
    underlying work is waited on exactly once: a second ``wait()`` on a finished gloo send
    blocks until the timeout) and returns the receive buffers in the order they were asked for."""

    def __init__(self, p2p: "P2P", works: list, recv_bufs: list[torch.Tensor], staged: list, keep: list,
                 count: str):
        self._p2p, self._works, self.recvs = p2p, works, recv_bufs
        self._staged, self._keep, self._count = staged, keep, count
        self.done = not works

    def is_completed(self) -> bool:
        return self.done or all(w.is_completed() for w in self._works)

    def wait(self) -> list[torch.Tensor]:
        if not self.done:
            clock = self._p2p.clock if self._count != "eval" else None
            tok = clock.start() if clock is not None else None
            for w in self._works:
                w.wait()
            for dev_buf, host_buf in self._staged:
                dev_buf.copy_(host_buf, non_blocking=False)
            if tok is not None:
                clock.stop("wait", tok)
            self.done, self._works, self._staged, self._keep = True, [], [], []
        return self.recvs


class P2P:
    """Point-to-point exchanges of one rank (see the module docstring for the NCCL rule)."""

    def __init__(self, rank: int, device: torch.device, backend: str = "gloo", group=None, clock=None):
        self.rank, self.device, self.backend, self.group = rank, torch.device(device), backend, group
        self.clock = clock
        self.staging = needs_staging(backend, self.device)
        self.bytes_sent = 0       # training traffic
        self.bytes_sent_eval = 0  # evaluation traffic (test-set forward), kept apart
        self.staged_messages = 0  # messages that went through host memory (gloo on CUDA)
        self._pending: list[Exchange] = []  # fire-and-forget sends, kept alive until complete
        # A clean shutdown waits for them before the final barrier (nothing of the group may
        # be referenced when it is destroyed); a weak reference, so this does not keep us alive.
        me = weakref.ref(self)
        register_drain(lambda: me() is not None and me().reap(block=True))

    max_pending = 16
    """Tracked exchanges kept before :meth:`reap` waits for the oldest (gloo reports a send
    complete only once it was waited on, so without a bound an epoch's send buffers would pile
    up; the oldest was received steps ago, so the wait returns at once)."""

    # ---- the primitive ----------------------------------------------------------------
    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]] = (),
                 recvs: Sequence[tuple[tuple, torch.dtype, int]] = (), count: str = "train") -> Exchange:
        """Post one exchange: ``sends`` = [(tensor, peer)], ``recvs`` = [(shape, dtype, peer)].

        Returns an :class:`Exchange`; ``wait()`` gives the received tensors (on ``device``) in
        the order of ``recvs``. Send buffers stay referenced until the exchange completes.
        """
        clock = self.clock if count != "eval" else None
        tok = clock.start() if clock is not None else None
        spec: list[tuple[str, int, int]] = []
        tensors: list[torch.Tensor] = []
        staged, keep, recv_bufs = [], [], []
        nbytes = 0
        for pos, (t, peer) in enumerate(sends):
            if t.device != self.device:
                raise DistributedError(
                    f"internal error: a tensor on {t.device} was handed to a send on rank {self.rank}, whose "
                    f"device is {self.device}; NCCL cannot move it. Move it with .to(device) first")
            t = t.detach().contiguous()
            nbytes += t.numel() * t.element_size()
            keep.append(t)
            if self.staging:
                t = t.cpu()
                self.staged_messages += 1
            spec.append(("send", peer, pos))
            tensors.append(t)
        for pos, (shape, dtype, peer) in enumerate(recvs):
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            recv_bufs.append(buf)
            if self.staging:
                host = torch.empty(shape, dtype=dtype, device="cpu")
                staged.append((buf, host))
                self.staged_messages += 1
                buf = host
            spec.append(("recv", peer, len(sends) + pos))
            tensors.append(buf)
        ops = []
        for i in canonical_order(self.rank, spec):
            kind, peer, _ = spec[i]
            fn = tdist.isend if kind == "send" else tdist.irecv
            ops.append(tdist.P2POp(fn, tensors[i], peer, self.group, 0))
        works = tdist.batch_isend_irecv(ops) if ops else []
        keep.extend(tensors)  # host copies and buffers must outlive the works
        if count == "eval":
            self.bytes_sent_eval += nbytes
        else:
            self.bytes_sent += nbytes
        if tok is not None:
            clock.stop("comm", tok)
        return Exchange(self, list(works or []), recv_bufs, staged, keep, count)

    # ---- conveniences built on it ------------------------------------------------------
    def send(self, tensor: torch.Tensor, peer: int, count: str = "train") -> None:
        """Blocking send (the layer-serial executor: there is nothing to overlap with)."""
        self.exchange(sends=[(tensor, peer)], count=count).wait()

    def recv(self, shape: tuple, dtype: torch.dtype, peer: int, count: str = "train") -> torch.Tensor:
        return self.exchange(recvs=[(shape, dtype, peer)], count=count).wait()[0]

    def send_async(self, tensor: torch.Tensor, peer: int, count: str = "train") -> Exchange:
        """A send nobody waits for at once; it is kept until :meth:`reap` sees it complete."""
        ex = self.exchange(sends=[(tensor, peer)], count=count)
        self._pending.append(ex)
        return ex

    def keep(self, ex: Exchange) -> Exchange:
        """Track an exchange whose sends must be completed before the epoch ends."""
        self._pending.append(ex)
        return ex

    def reap(self, block: bool = False) -> None:
        """Drop completed tracked exchanges; with ``block``, wait for the rest first."""
        keep = []
        for ex in self._pending:
            if ex.done or ex.is_completed():
                ex.wait()  # cheap when complete; releases buffers and copies staged receives
            elif block:
                ex.wait()
            else:
                keep.append(ex)
        while len(keep) > self.max_pending:
            keep.pop(0).wait()
        self._pending = keep

    @property
    def pending(self) -> int:
        return len(self._pending)
