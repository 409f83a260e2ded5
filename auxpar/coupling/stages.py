"""What every staged method (pipeline, penalty/AL, MGRIT) does the same way with its stage.

* :func:`global_stage_state`: a stage's tensors under the whole network's key names;
* :func:`gather_state`: the stages' tensors gathered on one rank (model.pt at the end of a run);
* :func:`layer_serial_evaluate`: test-set forward through the stages, one batch after another.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from auxpar.coupling.comm import TAG_EVAL


def global_stage_state(stage: torch.nn.Module, block_start: int) -> dict:
    """``stage.state_dict()`` on CPU with blocks renumbered to their index in the whole network."""
    out = {}
    for key, v in stage.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            key = f"blocks.{block_start + int(i)}.{rest}"
        out[key] = v.detach().cpu()
    return out


def gather_state(mine: dict, me: int, dst: int, senders: list[int]) -> dict | None:
    """Point-to-point gather of the ``senders``' state dicts (tensors only) on rank ``dst``;
    returns the merged dict there (with ``mine``), None on the senders."""
    if me != dst:
        tdist.send_object_list([{key: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                                 for key, v in mine.items()}], dst=dst)
        for v in mine.values():
            tdist.send(v.contiguous(), dst=dst)
        return None
    full = {}
    for src in senders:
        meta = [None]
        tdist.recv_object_list(meta, src=src)
        for key, (shape, dtype) in meta[0].items():
            buf = torch.empty(shape, dtype=getattr(torch, dtype))
            tdist.recv(buf, src=src)
            full[key] = buf
    full.update(mine)
    return full


@torch.no_grad()
def layer_serial_evaluate(stage, nb, first: bool, last: bool, prev: int | None, nxt: int | None,
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
        inp = b.x if first else nb.recv((n, *stage.in_shape), torch.float32, device, prev, TAG_EVAL, count="eval")
        out = stage(inp)
        if not last:
            nb.isend(out, nxt, TAG_EVAL, count="eval")
            if i % 4 == 3:
                nb.reap_sends()
        else:
            loss_sum += F.cross_entropy(out, b.y, reduction="sum")
            correct += (out.argmax(1) == b.y).sum()
            count += n
    nb.reap_sends(block=True)
    return loss_sum, correct, count
