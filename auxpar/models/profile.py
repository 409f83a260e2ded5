"""Measured per-block cost: forward + backward time of the stem, every block and the head.

FLOPs are a poor proxy on some devices: on a CPU, ResNet-20's 16-channel 32x32 blocks take
about a third longer per FLOP than its 64-channel 8x8 blocks, so a FLOP-balanced cut left the
first stage the slowest (measured: 1.96 s vs 1.46 s compute per epoch at K = 2). The times
measured here can replace FLOPs in :func:`auxpar.models.partition_counts` (``--balance time``).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from auxpar.models.staged import StagedNet


def _time_module(mod: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward of ``mod`` on ``x`` (input gradient included)."""
    times = []
    for i in range(repeats + 1):  # the first run warms up kernels and allocators
        inp = x.detach().requires_grad_(True)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = mod(inp)
        out.float().sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i:
            times.append(time.perf_counter() - t0)
    mod.zero_grad(set_to_none=True)
    return statistics.median(times)


def measure_costs(net: StagedNet, batch_size: int, device: torch.device,
                  repeats: int = 3, channels_last: bool = False) -> tuple[float, list[float], float]:
    """(stem, [blocks], head) forward+backward seconds at the real batch size on ``device``.

    BatchNorm running statistics are saved and restored, so profiling leaves no trace on the model.
    ``channels_last`` times the blocks as ``--channels-last`` runs them (a copy of the network
    in that memory format): on a CPU it speeds the wide-image, few-channel blocks up more than
    the others (ResNet-20 on 28x28, ``bench_parallel.py --channels-last``: the first stage's
    compute -22%, the second's -7%), so the time-balanced cut depends on it.
    """
    if channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape):
        x = torch.randn(batch_size, *shape, device=device)
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    buffers = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("weight") and not k.endswith("bias")}
    was_training = net.training
    net.train()
    shapes = net.boundary_shapes()  # [stem out, block 0 out, ...]
    stem = _time_module(net.stem, rand(*net.input_shape), repeats)
    blocks = []
    for i, blk in enumerate(net.blocks):
        blocks.append(_time_module(blk, rand(*shapes[i]), repeats))
    head = _time_module(net.head, rand(*shapes[-1]), repeats)
    net.load_state_dict(buffers, strict=False)
    net.train(was_training)
    return stem, blocks, head
