"""Per-rank time split (compute / comm / wait) that means the same on CUDA as on CPU.

On CPU an interval is two ``perf_counter`` readings. On CUDA the work is asynchronous, so a
host clock would measure kernel *launches*; an interval is instead a pair of CUDA events
recorded on the current stream, and ``elapsed_time`` is read when the totals are asked for
(:meth:`Clock.totals`, once per epoch, after the epoch has synchronized the device). Recording
an event does not synchronize, so a training step holds no extra host-device sync.

Meaning of the buckets (both devices):

* ``compute``: the rank's own forward, backward, optimizer and aux-state work;
* ``comm``: posting point-to-point exchanges and preparing their buffers;
* ``wait``: blocked until a message has arrived (on CUDA with NCCL: the stream stalled on
  the exchange; with gloo staging or on CPU: the host blocked).

A method may keep more buckets (MGRIT: ``step`` and ``dp``, compute = step - comm - wait - dp).

Usage::

    tok = clock.start(); ...; clock.stop("compute", tok)
    with clock.section("compute"): ...
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

BUCKETS = ("compute", "comm", "wait")


class Clock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._total = {b: 0.0 for b in BUCKETS}
        self._pending: list[tuple[str, object, object]] = []  # CUDA: (bucket, start, end) events

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, bucket: str, tok) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((bucket, tok, end))
            if len(self._pending) > 4096:  # bound the list in very long epochs (one sync per 4096)
                self._resolve()
        else:
            self._total[bucket] = self._total.get(bucket, 0.0) + time.perf_counter() - tok

    @contextmanager
    def section(self, bucket: str):
        tok = self.start()
        try:
            yield
        finally:
            self.stop(bucket, tok)

    def _resolve(self) -> None:
        if self._pending:
            self._pending[-1][2].synchronize()
            for bucket, a, b in self._pending:
                self._total[bucket] = self._total.get(bucket, 0.0) + a.elapsed_time(b) / 1000.0
            self._pending = []

    def add(self, bucket: str, seconds: float) -> None:
        self._total[bucket] = self._total.get(bucket, 0.0) + seconds

    def totals(self) -> dict[str, float]:
        """Seconds per bucket so far (resolves pending CUDA events: off the hot path)."""
        self._resolve()
        return dict(self._total)

    def state_dict(self) -> dict:
        return self.totals()

    def load_state_dict(self, state: dict) -> None:
        self._pending = []
        self._total = {b: 0.0 for b in BUCKETS}
        self._total.update({b: float(v) for b, v in state.items() if isinstance(v, (int, float))
                            and b not in ("bytes_sent", "bytes_sent_eval")})


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it is true (used at the
    measurement points outside the hot loop: epoch ends, re-initialization, checkpoints)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
