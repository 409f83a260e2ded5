"""The optimizer every method builds, and gradient clipping, written once for all methods.

``optim.grad_clip`` (0 = off) has one meaning for every method: **before the optimizer step,
the gradient of the whole network is scaled so that its global 2-norm is at most
``grad_clip``**, exactly what ``torch.nn.utils.clip_grad_norm_(whole_net.parameters(),
grad_clip)`` computes in serial training (coefficient ``grad_clip / (norm + 1e-6)``, capped at 1).

* Where the network is split over ranks (penalty/AL, pipeline, MGRIT stages) each rank adds the
  squared norm of the parameters it holds, and one all-reduce over the stage (layer) axis sums
  them: every rank then scales its gradients by the same coefficient. Replicas of the same
  parameters (DDP ranks, MGRIT ``--dp`` replicas, whose gradients are already averaged) are
  counted once: the sum runs over the stage axis only.
* Penalty/AL: "the whole network's gradient" is the concatenation of every stage's gradient of
  its own local objective (penalty term or cross-entropy), in parallel and serial phases alike.
* The norm is summed in float64 (one 0-dim float64 tensor per all-reduce). With ``grad_clip = 0``
  nothing is computed and no collective is issued; a step the NaN guard drops is not clipped.
  The all-reduce is issued at the same point of the step on every rank of the group (after the
  guard, whose verdict is the same everywhere), as NCCL's ordering rule requires.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def make_sgd(params, cfg) -> torch.optim.SGD:
    o = cfg.optim
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def clip_global_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                      reduce: Callable[[torch.Tensor], object] | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor | None:
    """Scale the gradients of ``params`` in place so that the global 2-norm is at most ``max_norm``.

    ``reduce(sq)`` sums the 0-dim float64 squared norm ``sq`` in place over the ranks that hold
    the rest of the network (None: these parameters are the whole network). ``device``: where
    ``sq`` lives when this rank has no gradient (an NCCL collective needs the rank's device).
    Returns the global norm (0-dim float64), or None when ``max_norm <= 0`` (then nothing is
    computed and ``reduce`` is not called).
    """
    if max_norm <= 0:
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if device is None:
        device = grads[0].device if grads else "cpu"
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        sq += g.detach().double().pow(2).sum()
    if reduce is not None:
        reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm
