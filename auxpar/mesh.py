"""The 2-D process mesh of every method with stages and data-parallel replicas
(``--method penalty|al|mgrit --stages K --dp D``).

Layout: world = K * D ranks; global rank ``g = d * K + k`` is layer rank k (stage k) of
data-parallel replica d. A replica's K layer ranks are consecutive global ranks, so with
``torchrun --nproc_per_node=K`` one node holds one replica and the neighbour traffic of the
stages (every step, both directions) stays inside the node; only the gradient all-reduce of
each stage over its D replicas (once per step) crosses nodes.

Groups (``torch.distributed.new_group``, created by every rank in the same order, as
``new_group`` requires: first the K data-parallel groups ``{d * K + k : d}`` for k = 0..K-1,
then the D layer groups ``{d * K + k : k}`` for d = 0..D-1). With D = 1 no group is created: the
layer group is the world and there is nothing to average.

Point-to-point messages between neighbouring stages use global ranks on the world group
(:attr:`Mesh.prev` / :attr:`Mesh.next`); collectives that belong to one axis use that axis's
group (:meth:`all_reduce_layer`, :meth:`all_reduce_dp`).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from auxpar.distributed import DistInfo


class Mesh:
    def __init__(self, info: DistInfo, K: int, dp: int):
        self.info, self.K, self.dp = info, K, dp
        self.k, self.d = info.rank % K, info.rank // K
        self.dp_group = None
        """This rank's data-parallel group (stage k of every replica); None when dp = 1."""
        self.layer_group = None
        """This rank's layer group (the K stages of replica d); None (= the world) when dp = 1."""
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
        """Global rank of stage ``k`` of replica ``d`` (this rank's replica by default)."""
        return (self.d if d is None else d) * self.K + k

    @property
    def prev(self) -> int | None:
        """Global rank of the stage before this one in this replica (None on stage 0)."""
        return self.rank_of(self.k - 1) if self.k > 0 else None

    @property
    def next(self) -> int | None:
        """Global rank of the stage after this one in this replica (None on the last stage)."""
        return self.rank_of(self.k + 1) if self.k < self.K - 1 else None

    def all_reduce_layer(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the K stages of this replica."""
        if self.info.distributed and self.K > 1:
            tdist.all_reduce(t, group=self.layer_group)
        return t

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the D replicas of this stage."""
        if self.info.distributed and self.dp > 1:
            tdist.all_reduce(t, group=self.dp_group)
        return t

    def all_reduce_world(self, t: torch.Tensor) -> torch.Tensor:
        if self.info.distributed and self.info.world_size > 1:
            tdist.all_reduce(t)
        return t
