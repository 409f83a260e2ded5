"""What every staged method (pipeline, penalty/AL, MGRIT) does the same way with its stage.

* :class:`StagedMethod`: the hooks they share, written once (keep this rank's stage of a net
  built whole, the clipped optimizer step, layer-serial evaluation, the model.pt gather, the
  epoch-end barrier, the checkpointed byte and time counters);
* :func:`global_stage_state`: a stage's tensors under the whole network's key names;
* :func:`stage_layouts`: every stage's (key, shape, dtype) list, known on every rank before the
  net is sliced, so a gather needs no metadata messages;
* :func:`gather_state`: the stages' tensors gathered on one rank (model.pt at the end of a run);
* :func:`layer_serial_evaluate`: test-set forward through the stages, one batch after another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from auxpar.coupling.base import Method
from auxpar.coupling.optim import clip_global_norm_, make_sgd
from auxpar.distributed import all_reduce_, barrier
from auxpar.models.staged import original_key


def global_stage_state(stage, device: torch.device | None = None) -> dict:
    """``stage.state_dict()`` with blocks renumbered to their index in the whole (uncut) network
    (``Stage.block_ids``); on CPU (checkpoints, export) unless ``device`` is given (the gather
    sends from the device)."""
    dev = torch.device("cpu") if device is None else device
    return {original_key(key, stage.block_ids): v.detach().to(dev) for key, v in stage.state_dict().items()}


def stage_layouts(stages) -> dict[int, list[tuple[str, tuple, torch.dtype]]]:
    """{stage index: [(global key, shape, dtype)]} in state_dict order, for every stage."""
    return {s.index: [(original_key(key, s.block_ids), tuple(v.shape), v.dtype)
                      for key, v in s.state_dict().items()] for s in stages}


def gather_state(p2p, mine: dict, me: int, dst: int, senders: dict[int, list]) -> dict | None:
    """Gather the ``senders``' state dicts on rank ``dst`` through the p2p primitive; returns
    the merged dict on CPU there (with ``mine``), None on the senders.

    ``senders`` maps each sending rank to its layout (:func:`stage_layouts`), which every rank
    knows, so no metadata travels: a sender posts one exchange with all its tensors (on its
    device) and the receiver one exchange per sender, in rank order.
    """
    if me != dst:
        layout = senders[me]
        p2p.exchange(sends=[(mine[key], dst) for key, _, _ in layout]).wait()
        return None
    full = {}
    for src in sorted(senders):
        layout = senders[src]
        bufs = p2p.exchange(recvs=[(shape, dtype, src) for _, shape, dtype in layout]).wait()
        for (key, _, _), buf in zip(layout, bufs):
            full[key] = buf.cpu()
    full.update({key: v.cpu() for key, v in mine.items()})
    return full


@torch.no_grad()
def layer_serial_evaluate(stage, p2p, first: bool, last: bool, prev: int | None, nxt: int | None,
                          batches, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward the test batches through the stages (running BN statistics, no DS filter): the
    first stage reads the images, each stage sends its output to ``nxt``, the last stage sums
    the loss and the correct predictions. Evaluation traffic is counted apart (``count='eval'``)."""
    stage.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for i, b in enumerate(batches):
        n = b.y.numel()
        inp = b.x if first else p2p.recv((n, *stage.in_shape), torch.float32, prev, count="eval")
        out = stage(inp)
        if not last:
            p2p.send_async(out.float(), nxt, count="eval")
            if i % 4 == 3:
                p2p.reap()
        else:
            loss_sum += F.cross_entropy(out, b.y, reduction="sum")
            correct += (out.argmax(1) == b.y).sum()
            count += n
    p2p.reap(block=True)
    return loss_sum, correct, count


class StagedMethod(Method):
    """A method whose rank holds one stage of K (``self.k``, ``self.K``) of a net built whole from
    one seed and then sliced, so the parameters do not depend on K.

    A subclass sets ``K``, ``k``, ``device`` and ``mesh`` (:class:`auxpar.mesh.Mesh`; with
    ``--dp`` also ``dp`` and ``d``, the data-parallel replica), calls :meth:`keep_stage`, and makes
    ``p2p`` (the one door for its point-to-point traffic) and ``clock`` (its time split). The
    last stage of replica 0 owns the loss and the accuracy (``log_rank = K - 1``); only replica
    0 holds the model's tensors for model.pt.
    """

    d = 0
    dp = 1
    """Data-parallel replicas of the stages (``--dp``; a subclass with a mesh sets it, and
    ``self.mesh``)."""

    def keep_stage(self, stages) -> None:
        """Keep stage ``self.k`` of ``stages`` (on this rank's device) and build its optimizer;
        remember every stage's tensor layout for the model.pt gather."""
        self.layouts = stage_layouts(stages)  # every stage's tensors, for the model.pt gather
        self.stage = self.amp.module(stages[self.k].to(self.device))
        self.block_range = self.stage.block_range
        self.net = None
        self.opt = make_sgd(self.stage.parameters(), self.cfg)
        self.log_rank = self.K - 1  # the last stage owns the loss and the accuracy

    # The 2-D mesh (auxpar/mesh.py) every staged method has: ``self.mesh`` (a subclass makes
    # it; dp = 1 without --dp), rank = d * K + k. Neighbours on the layer axis of this replica
    # (None at the ends) and the replica's shard of the data:
    @property
    def prev_rank(self) -> int | None:
        return self.mesh.prev

    @property
    def next_rank(self) -> int | None:
        return self.mesh.next

    def sampler_layout(self):
        return self.dp, self.d  # replica d trains on its slice of every global batch

    def eval_layout(self):
        return self.dp, self.d

    # ---- the optimizer step ----------------------------------------------------------------
    def reduce_over_stages(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the ranks that hold the other stages of this rank's network:
        the K stages of its replica (replicas of the same parameters count once)."""
        return self.mesh.all_reduce_layer(t)

    def clip_and_step(self) -> None:
        """The optimizer step, after clipping the whole network's gradient to ``optim.grad_clip``
        (auxpar.coupling.optim: one float64 all-reduce over the stages when it is > 0, none at
        0). Call it at the same point on every rank: after the guard, only when it said ok."""
        clip_global_norm_(self.stage.parameters(), self.cfg.optim.grad_clip, self.reduce_over_stages, self.device)
        self.opt.step()

    def end_epoch(self, epoch):
        self.p2p.reap(block=True)
        super().end_epoch(epoch)
        # One barrier per epoch: the epoch ends when the slowest stage has finished, so the
        # epoch time the last rank reports is the job's, not the fastest rank's.
        barrier(self.info)
        self.average_bn_over_replicas()

    @torch.no_grad()
    def average_bn_over_replicas(self) -> None:
        """Average the floating buffers (BN running statistics) of this stage over its replicas
        (``--dp``: per-replica batch statistics in training), so that evaluation and model.pt
        see one network; once per epoch, one all-reduce on the replica group; no-op at dp = 1."""
        if self.dp == 1:
            return
        bufs = [b for b in self.stage.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1).float() for b in bufs])
        self.mesh.all_reduce_dp(flat)
        flat /= self.dp
        off = 0
        for b in bufs:
            b.copy_(flat[off:off + b.numel()].view_as(b))
            off += b.numel()

    def evaluate(self, batches):
        """Layer-serial forward over the stages (running BN statistics, no DS); any test-batch size."""
        return layer_serial_evaluate(self.stage, self.p2p, self.k == 0, self.k == self.K - 1, self.prev_rank,
                                     self.next_rank, batches, self.device)

    def comm_bytes(self):
        """Training traffic this rank sent (evaluation apart)."""
        return self.p2p.bytes_sent

    def eval_bytes_total(self) -> int:
        """Evaluation traffic of all ranks (a collective)."""
        t = torch.tensor([float(self.p2p.bytes_sent_eval)], dtype=torch.float64, device=self.device)
        all_reduce_(self.info, t)
        return int(t.item())

    # ---- state ----------------------------------------------------------------------------
    def local_model_state(self):
        return global_stage_state(self.stage) if self.d == 0 else {}

    def model_state(self):
        """Gather every stage's tensors on the last rank (p2p, tensors only) as one state_dict;
        None on the other ranks (and on every rank of replicas d > 0, which do not take part)."""
        if self.d != 0:
            return None
        if self.info.world_size == 1:
            return self.local_model_state()
        mine = global_stage_state(self.stage, self.device)  # sent from the device
        return gather_state(self.p2p, mine, self.k, self.log_rank, {r: self.layouts[r] for r in range(self.K - 1)})

    def state_dict(self):
        """Stage tensors, optimizer, skipped steps, precision state and the counters (bytes,
        times); a subclass adds its own state."""
        return {"stage": self.stage.state_dict(), "optimizer": self.opt.state_dict(),
                "skipped_steps": self.skipped_steps, "amp": self.amp.state_dict(),
                "counters": {"bytes_sent": self.p2p.bytes_sent, "bytes_sent_eval": self.p2p.bytes_sent_eval,
                             **self.clock.state_dict()}}

    def load_state_dict(self, state):
        self.stage.load_state_dict(state["stage"])
        self.opt.load_state_dict(state["optimizer"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp.load_state_dict(state.get("amp"))
        c = state.get("counters") or {}
        self.p2p.bytes_sent, self.p2p.bytes_sent_eval = int(c.get("bytes_sent", 0)), int(c.get("bytes_sent_eval", 0))
        self.clock.load_state_dict(c)
