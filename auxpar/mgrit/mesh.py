"""The 2-D process mesh of ``--method mgrit --stages K --dp N`` and the solver's neighbour exchange.

Layout: world = K * N ranks; global rank ``g = d * K + k`` is layer rank k (stage k, blocks of
chunk k) of data-parallel replica d. A replica's K layer ranks are consecutive global ranks, so
the chatty neighbour traffic of the solves stays inside one node when a node holds a replica;
the gradient all-reduce (once per step) crosses replicas.

Groups (``torch.distributed.new_group``, created by every rank in the same order: first the K
data-parallel groups ``{d * K + k : d}`` for k = 0..K-1, then the N layer groups ``{d * K + k : k}``
for d = 0..N-1). With N = 1 no group is created: the layer group is the world and there is
nothing to average.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as tdist

from auxpar.coupling.comm import P2P
from auxpar.distributed import DistInfo


class Mesh:
    def __init__(self, info: DistInfo, K: int, dp: int):
        self.info, self.K, self.dp = info, K, dp
        self.k, self.d = info.rank % K, info.rank // K
        self.dp_group = None
        self.layer_group = None
        if info.distributed and dp > 1:
            for k in range(K):
                g = tdist.new_group([d * K + k for d in range(dp)])
                if k == self.k:
                    self.dp_group = g
            for d in range(dp):
                g = tdist.new_group([d * K + k for k in range(K)])
                if d == self.d:
                    self.layer_group = g

    def rank_of(self, k: int, d: int | None = None) -> int:
        return (self.d if d is None else d) * self.K + k

    @property
    def prev(self) -> int | None:
        return self.rank_of(self.k - 1) if self.k > 0 else None

    @property
    def next(self) -> int | None:
        return self.rank_of(self.k + 1) if self.k < self.K - 1 else None

    def all_reduce_layer(self, t: torch.Tensor) -> torch.Tensor:
        if self.info.distributed and self.K > 1:
            tdist.all_reduce(t, group=self.layer_group)
        return t

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        if self.info.distributed and self.dp > 1:
            tdist.all_reduce(t, group=self.dp_group)
        return t

    def all_reduce_world(self, t: torch.Tensor) -> torch.Tensor:
        if self.info.distributed and self.info.world_size > 1:
            tdist.all_reduce(t)
        return t


class ChainComm:
    """Neighbour exchange of one solve: ``up`` is the rank before this one in solve order
    (forward: stage k-1; adjoint: stage k+1), ``down`` the one after it. Each message is one
    exchange of the p2p primitive; the solver's sweep order fixes the message order, which is
    the same on both ends of a link (see ``tests/test_protocol.py``)."""

    def __init__(self, p2p: P2P, mesh: Mesh, up: int | None, down: int | None,
                 shape_of, batch: int, dtype: torch.dtype):
        self.p2p, self.mesh, self.up, self.down = p2p, mesh, up, down
        self.shape_of, self.batch, self.dtype = shape_of, batch, dtype
        self.has_up, self.has_down = up is not None, down is not None
        self.messages = 0

    def send_down(self, t: torch.Tensor) -> None:
        self.p2p.send_async(t.detach().to(self.dtype), self.down)
        self.messages += 1
        if self.messages % 8 == 0:
            self.p2p.reap()

    def recv_up(self, point: int) -> torch.Tensor:
        return self.p2p.recv((self.batch, *self.shape_of(point)), self.dtype, self.up)

    def global_norm(self, sq: torch.Tensor) -> float:
        t = sq.detach().double().reshape(1).clone()
        self.mesh.all_reduce_world(t)
        return math.sqrt(max(float(t.item()), 0.0))
