"""Serial backprop (the baseline every speedup is measured against) and DDP.

``serial``: the whole network in one process, ordinary forward/backward/SGD step.
``ddp``: the same step replicated on every rank with gradients averaged by
``DistributedDataParallel``; every rank sees ``batch_size / world_size`` samples of the same
global batch, so one DDP step equals one serial step at the same global batch (tested on a
model without batch norm, where per-rank batch statistics cannot differ from the global ones).

Communication accounting for DDP: a comm hook records the size of every gradient bucket that
is all-reduced. ``comm_bytes`` reports the bytes a bandwidth-optimal ring all-reduce sends per
rank, ``2 (W-1)/W x payload``, which is what NCCL's ring and gloo's ring algorithms send; it is
a volume model of the collective, not a packet capture.

Clipping (``optim.grad_clip``): the whole network's gradient norm, as everywhere
(:mod:`auxpar.coupling.optim`); DDP replicas hold the same averaged gradient, so nothing is reduced.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from auxpar.coupling.base import Method, StepOut
from auxpar.coupling.optim import clip_global_norm_, make_sgd
from auxpar.distributed import all_reduce_
from auxpar.errors import DistributedError


class SerialMethod(Method):
    name = "serial"
    _payload = 0  # gradient bytes all-reduced (DDP); serial has none

    def __init__(self, cfg, info, net):
        super().__init__(cfg, info, net)
        self.net = self.amp.module(net.to(info.device))
        self.model = self.net  # what forward/backward run through (DDP wraps it)
        self.opt = make_sgd(self.net.parameters(), cfg)

    @classmethod
    def check_layout(cls, cfg, info):
        if cfg.dist.stages != 1:
            raise DistributedError(
                f"--method serial runs the whole network in one process, but --stages {cfg.dist.stages} was given; "
                "use --stages 1 (stages are for layer-parallel methods)"
            )
        if info.world_size != 1:
            raise DistributedError(
                f"--method serial runs the whole network in one process, but {info.world_size} processes "
                "were started; drop --nproc / torchrun, or use --method ddp for data parallelism"
            )

    def train_step(self, batch, phase, next_idx=None):
        amp, guard = self.amp, self.guard
        self.model.train()
        guard.snapshot(self.net)
        with amp.autocast():
            logits = self.model(amp.input(batch.x))
        loss = F.cross_entropy(logits.float(), batch.y)  # fp32 loss (a no-op cast under fp32)
        # Every rank's loss, checked before the optimizer step; under fp16 posted after backward
        # + unscale, with the overflow flag (see auxpar/precision.py).
        handle = None if amp.scaling else guard.post(loss)
        self.opt.zero_grad(set_to_none=True)
        amp.scale(loss).backward()
        overflow = amp.unscale_(self.opt)
        if amp.scaling:
            handle = guard.post(loss, overflow=overflow)
        ok = guard.wait(handle)
        if ok:  # DDP: every replica holds the whole (averaged) gradient, so no reduction
            clip_global_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        amp.step(self.opt, ok)
        amp.update(skipped=not ok)
        correct = (logits.detach().argmax(1) == batch.y).sum()
        return StepOut(loss.detach(), correct, batch.y.numel())

    @torch.no_grad()
    def evaluate(self, batches: Iterable):
        self.net.eval()
        loss_sum = torch.zeros((), device=self.info.device)
        correct = torch.zeros((), dtype=torch.long, device=self.info.device)
        count = 0
        for b in batches:  # fp32, as every method's evaluation (layer_serial_evaluate)
            logits = self.net(b.x)
            loss_sum += F.cross_entropy(logits, b.y, reduction="sum")
            correct += (logits.argmax(1) == b.y).sum()
            count += b.y.numel()
        return loss_sum, correct, count

    def local_model_state(self):
        if self.info.rank != 0:
            return {}  # data-parallel replicas hold the same tensors as rank 0
        return {self.net.original_key(k): v.detach().cpu() for k, v in self.net.state_dict().items()}

    def state_dict(self):
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "skipped_steps": self.skipped_steps, "payload": self._payload,
                "amp": self.amp.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp.load_state_dict(state.get("amp"))
        self._payload = int(state.get("payload", 0))


class DDPMethod(SerialMethod):
    name = "ddp"

    def __init__(self, cfg, info, net):
        super().__init__(cfg, info, net)
        # The hook's state is its own small object, not the method: a hook state that refers
        # back to the DDP module makes a reference cycle through C++ (reducer -> state -> DDP ->
        # reducer) that keeps the process group alive past destroy_process_group.
        self._hook_state = _HookState()
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
            self.model.register_comm_hook(self._hook_state, _counting_allreduce_hook)

    @property
    def _payload(self) -> int:
        return self._hook_state.payload

    @_payload.setter
    def _payload(self, value: int) -> None:
        self._hook_state.payload = value

    @classmethod
    def check_layout(cls, cfg, info):
        if cfg.dist.stages != 1:
            raise DistributedError(
                f"--method ddp replicates the whole network, but --stages {cfg.dist.stages} was given; "
                "use --stages 1 (layer-parallel methods use stages)"
            )
        if cfg.data.batch_size % info.world_size:
            raise DistributedError(
                f"--batch-size {cfg.data.batch_size} is the global batch and must divide evenly over "
                f"{info.world_size} DDP ranks; use a multiple of {info.world_size}"
            )

    def reduce_epoch_stats(self, stats):
        all_reduce_(self.info, stats)  # every rank holds a share of the batch: sum the epoch stats
        return True

    def sampler_layout(self):
        return self.info.world_size, self.info.rank

    def eval_layout(self):
        return self.info.world_size, self.info.rank

    def comm_bytes(self):
        w = self.info.world_size
        return int(round(self._payload * 2 * (w - 1) / w)) if w > 1 else 0


class _HookState:
    payload = 0
    """Gradient bytes handed to the all-reduce so far (this rank)."""


def _counting_allreduce_hook(state: _HookState, bucket):
    """Average the bucket across ranks (as DDP's default hook does) and record its size."""
    buf = bucket.buffer()
    state.payload += buf.numel() * buf.element_size()
    world = torch.distributed.get_world_size()
    fut = torch.distributed.all_reduce(buf.div_(world), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
