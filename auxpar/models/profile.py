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


def neighbour_cuts(counts: list[int]) -> list[list[int]]:
    """``counts`` and every cut that moves one of its K - 1 boundaries by one block (no empty stage)."""
    out = [list(counts)]
    for i in range(len(counts) - 1):
        for d in (-1, 1):  # move boundary i (between stage i and i + 1) by d blocks
            c = list(counts)
            c[i] += d
            c[i + 1] -= d
            if min(c) >= 1 and c not in out:
                out.append(c)
    return out


def time_stage_cuts(net: StagedNet, candidates: list[list[int]], batch_size: int, device: torch.device,
                    repeats: int = 3, channels_last: bool = False) -> list[list[float]]:
    """Forward + backward seconds of every stage of every candidate cut, each stage timed whole.

    Block times measured one block at a time can mislead: a block runs at a different speed
    inside its stage than alone (caches, the memory format of its neighbours' outputs;
    ``bench_parallel.py --channels-last`` measured a cut that isolated block times called
    balanced at 82 / 108 ms per step). A stage timed as a unit is what a rank runs. Stages that
    several candidates share are timed once. BN statistics are restored as in :func:`measure_costs`.
    """
    if channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buffers = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("weight") and not k.endswith("bias")}
    was_training = net.training
    net.train()
    seen: dict[tuple, float] = {}
    out = []
    for counts in candidates:
        times = []
        for k in range(len(counts)):
            stage = net._make_stage(k, counts)
            key = (stage.block_range, stage.is_first, stage.is_last)
            if key not in seen:
                x = torch.randn(batch_size, *stage.in_shape, device=device)
                seen[key] = _time_module(stage, x.contiguous(memory_format=fmt) if x.dim() == 4 else x, repeats)
            times.append(seen[key])
        out.append(times)
    net.load_state_dict(buffers, strict=False)
    net.train(was_training)
    return out


def best_cut(candidates: list[list[int]], stage_times: list[list[float]]) -> int:
    """Index of the candidate whose slowest stage is fastest (the first such one on a tie)."""
    return min(range(len(candidates)), key=lambda i: (max(stage_times[i]), i))


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
