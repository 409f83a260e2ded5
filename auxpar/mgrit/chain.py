"""The MGRIT solver's neighbour exchange over the 2-D mesh (:mod:`auxpar.mesh`).
"""

from __future__ import annotations

import math

import torch

from auxpar.coupling.comm import P2P
from auxpar.mesh import Mesh


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
