"""What every staged method (pipeline, penalty/AL, MGRIT) does the same way with its stage.

* :func:`global_stage_state`: a stage's tensors under the whole network's key names;
* :func:`stage_layouts`: every stage's (key, shape, dtype) list, known on every rank before the
  net is sliced, so a gather needs no metadata messages;
* :func:`gather_state`: the stages' tensors gathered on one rank (model.pt at the end of a run);
* :func:`layer_serial_evaluate`: test-set forward through the stages, one batch after another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _global_key(key: str, block_start: int) -> str:
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return f"blocks.{block_start + int(i)}.{rest}"
    return key


def global_stage_state(stage: torch.nn.Module, block_start: int, device: torch.device | None = None) -> dict:
    """``stage.state_dict()`` with blocks renumbered to their index in the whole network; on
    CPU (checkpoints, export) unless ``device`` is given (the gather sends from the device)."""
    dev = torch.device("cpu") if device is None else device
    return {_global_key(key, block_start): v.detach().to(dev) for key, v in stage.state_dict().items()}


def stage_layouts(stages) -> dict[int, list[tuple[str, tuple, torch.dtype]]]:
    """{stage index: [(global key, shape, dtype)]} in state_dict order, for every stage."""
    return {s.index: [(_global_key(key, s.block_range[0]), tuple(v.shape), v.dtype)
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
