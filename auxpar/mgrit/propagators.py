"""Forward and adjoint propagators over one rank's blocks, and the batch-norm switches.

Forward step of level l from point a to point b: the lumped ops of
:mod:`auxpar.mgrit.grid` (block n at step ``multiplier * h``, by setting the block's ``step``
attribute for the call; the block's own ``forward`` does the rest). The final sweep runs every
fine step once on a detached leaf that requires grad and keeps the graph ``(leaf_n, y_n)``.

Adjoint step from point a back to point b (a > b): ``lambda_b = (dPhi_{b->a}/du at u_b)^T
lambda_a``, a vector-Jacobian product through autograd. On level 0 it reuses the graph of the
forward final sweep; on coarse levels the coarse forward step is rebuilt once per training step
from the forward state u_b (a leaf) and its graph kept for the solve, so the coarse adjoint
is exactly the adjoint of the linearized coarse forward propagator (TorchBraid's choice). The
final sweep's adjoint step is one ``torch.autograd.backward`` with ``inputs = [leaf_b, block
parameters]``: it returns lambda_b and accumulates ``dLoss/dtheta_b = (dPhi_b/dtheta_b)^T
lambda_{b+1}`` into the parameters' ``.grad``.

Batch norm. Every block evaluation normalizes with the statistics of the batch it is given
(train mode). Running statistics must change once per training step, from the final sweep
only, so a solve runs inside :func:`frozen_bn` (``track_running_stats = False``: PyTorch then
passes no running buffers to ``F.batch_norm``, so nothing is updated and
``num_batches_tracked`` does not move) and the forward final sweep switches tracking back on for
the one block it runs (:func:`tracking_bn`). Stem and head run once per step with tracking on.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from auxpar.mgrit.grid import GridHierarchy


def batchnorms(module: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def bn_tracking(bns: list[_BatchNorm], on: bool):
    """Set ``track_running_stats`` of ``bns`` inside the block (restored after)."""
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = on
    try:
        yield
    finally:
        for m, s in zip(bns, saved):
            m.track_running_stats = s


def frozen_bn(bns: list[_BatchNorm]):
    """Batch statistics for normalization, no running-statistics update, inside the block."""
    return bn_tracking(bns, False)


def tracking_bn(bns: list[_BatchNorm]):
    """Running statistics updated (once) by the block's forward."""
    return bn_tracking(bns, True)


class StageBlocks:
    """This rank's blocks by global index, the step h, their BN layers and parameters."""

    def __init__(self, blocks: list[torch.nn.Module], start: int, h: float):
        self.blocks = {start + i: b for i, b in enumerate(blocks)}
        self.h = float(h)
        self.bns = {n: batchnorms(b) for n, b in self.blocks.items()}
        self.all_bns = [m for n in sorted(self.bns) for m in self.bns[n]]
        self.params = {n: [p for p in b.parameters() if p.requires_grad] for n, b in self.blocks.items()}

    def run(self, n: int, x: torch.Tensor, mult: int = 1) -> torch.Tensor:
        blk = self.blocks[n]
        if mult == 1:
            return blk(x)
        old = blk.step
        blk.step = mult * self.h
        try:
            return blk(x)
        finally:
            blk.step = old


class ForwardProp:
    """Forward propagator: ``step`` for the relaxation sweeps, ``step_final`` keeps graphs."""

    def __init__(self, blocks: StageBlocks, grid: GridHierarchy, keep_graph: bool = True):
        self.b, self.grid, self.keep_graph = blocks, grid, keep_graph
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.evals = 0
        """Block evaluations in this solve (ops of coarse steps count once each)."""

    def apply(self, level: int, src: int, dst: int, x: torch.Tensor) -> torch.Tensor:
        for n, mult in self.grid.ops[level][(src, dst)]:
            x = self.b.run(n, x, mult)
            self.evals += 1
        return x

    def step(self, level, src, dst, x):
        return self.apply(level, src, dst, x)

    def step_final(self, src, dst, x):
        n = src  # the fine step src -> src + 1 is block src
        self.evals += 1
        if not self.keep_graph:
            with torch.no_grad(), tracking_bn(self.b.bns[n]):
                return self.b.run(n, x)
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), tracking_bn(self.b.bns[n]):
            y = self.b.run(n, leaf)
        self.graphs[n] = (leaf, y)
        return y.detach()

    def state(self, n: int) -> torch.Tensor:
        """The forward state u_n the final sweep linearized block n at."""
        return self.graphs[n][0].detach()


class AdjointProp:
    """Adjoint propagator over the forward final sweep's graphs (points visited backward)."""

    def __init__(self, fwd: ForwardProp):
        self.fwd = fwd
        self.coarse: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.evals = 0
        """Vector-Jacobian products in this solve (a coarse step's rebuild counts its ops too)."""

    def step(self, level, src, dst, lam):
        # src > dst: lambda_dst = (dPhi_{dst -> src} / du at u_dst)^T lambda_src
        self.evals += 1
        if level == 0:
            leaf, y = self.fwd.graphs[dst]
        else:
            key = (level, dst, src)
            g = self.coarse.get(key)
            if g is None:
                leaf = self.fwd.state(dst).requires_grad_(True)
                with torch.enable_grad():
                    y = self.fwd.apply(level, dst, src, leaf)
                g = self.coarse[key] = (leaf, y)
            leaf, y = g
        return torch.autograd.grad(y, leaf, lam, retain_graph=True)[0]

    def step_final(self, src, dst, lam):
        self.evals += 1
        leaf, y = self.fwd.graphs.pop(dst)
        torch.autograd.backward(y, lam, inputs=[leaf, *self.fwd.b.params[dst]])
        return leaf.grad

    def release(self) -> None:
        self.coarse.clear()
        self.fwd.graphs.clear()
