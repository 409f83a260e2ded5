"""The layer grid of MGRIT, its coarse grids, and the cut of the grid into per-rank chunks.

Points and steps (algorithms.md §6). A network with N blocks has N + 1 *points*: point 0 is
the stem's output u_0, point n + 1 the output of block n, point N the input of the head. Block n
is the fine *step* from point n to point n + 1: ``u_{n+1} = Phi_n(u_n) = shortcut(u_n) + h f_n(u_n)``
(post-activation blocks add their outer ReLU; the blocks' own ``forward`` is used as is).

Level l has the points ``P_l``: ``P_0 = 0..N`` and ``P_{l+1}`` = every m_l-th point of ``P_l``
plus its last point N (so when m_l does not divide the number of level-l steps the last
level-(l+1) step is shorter). The C-points of level l are the points of level l + 1; the
others are its F-points.

Coarse steps. The step of level l + 1 from point a to point b replaces the level-l steps
between them. Written as a list of ops ``(block, multiplier)`` (run block with step
``multiplier * h``), it is the concatenation of those steps' ops, lumped:

* transitions (blocks that change shape: stride 2 or a channel change) are applied as they
  are, at the fine step h, in their place -- a coarse step always maps the shape of point a
  to the shape of point b, wherever the transitions are;
* all other ops of the interval become one op: the interval's *first* non-transition block,
  at its place, with the sum of the lumped multipliers (for an interval of m ordinary blocks:
  ``u + m h f_first(u)``, the rediscretization of algorithms.md §6).

So ``[a, b]`` -> ``[(a, 2)]``, ``[t, a, b]`` -> ``[(t, 1), (a, 2)]``, ``[a, t, b]`` -> ``[(a, 2), (t, 1)]``.

Stem and head are not steps of any grid. The stem makes the initial condition u_0, once per
training step, on the first rank; u_0 is fixed on every level. The head reads u_N (a point of
every level) after the forward solve on the last rank; it gives the adjoint's terminal
condition ``lambda_N = dLoss/du_N`` and is never part of a coarse propagator.

Chunks. Rank r owns the blocks ``s_r .. e_r - 1`` (its *chunk*). Every interior boundary
``s_r`` (r >= 1) must be a point of the coarsest grid, i.e. a multiple of
``M = m_0 * ... * m_{L-2}`` blocks; the last rank's chunk may have any length. Then every
rank's last point is a C-point on every level, F-relaxation never crosses a rank boundary, and
the iterates do not depend on the number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from auxpar.errors import ConfigError

Op = tuple[int, int]  # (global block index, step multiplier: the block runs with step multiplier * h)


def expand_cfactors(cfactor: list[int] | tuple[int, ...], levels: int) -> tuple[int, ...]:
    """One coarsening factor per coarsening (``levels - 1`` of them) from a global or per-level list."""
    cf = list(cfactor)
    if levels <= 1:
        return ()
    if len(cf) == 1:
        cf = cf * (levels - 1)
    if len(cf) != levels - 1:
        raise ConfigError(f"mgrit.cfactor has {len(cf)} entries for {levels} levels; "
                          f"give one value or {levels - 1} (one per coarsening)")
    return tuple(int(c) for c in cf)


def _lump(ops: list[Op], transitions: frozenset[int]) -> tuple[Op, ...]:
    out: list[list[int]] = []
    first = None
    total = 0
    for block, mult in ops:
        if block in transitions:
            out.append([block, mult])
            continue
        total += mult
        if first is None:
            first = len(out)
            out.append([block, 0])
    if first is not None:
        out[first][1] = total
    return tuple((b, m) for b, m in out)


@dataclass(frozen=True)
class GridHierarchy:
    """Points and coarse-step ops of every level (global; every rank builds the same)."""

    num_blocks: int
    cfactors: tuple[int, ...]
    points: tuple[tuple[int, ...], ...]
    """``points[l]`` = P_l, increasing fine indices from 0 to N."""
    ops: tuple[dict, ...]
    """``ops[l][(a, b)]`` = the ops of the level-l step from point a to the next level-l point b."""
    transitions: frozenset[int]

    @property
    def levels(self) -> int:
        return len(self.points)

    @property
    def coarse_intervals(self) -> int:
        """Intervals of level 1 (N_c): two-level MGRIT with F-relaxation is exact after this many
        iterations (0 for one level, which is exact without iterating)."""
        return len(self.points[1]) - 1 if self.levels > 1 else 0

    @property
    def coarsest_stride(self) -> int:
        """M = product of the coarsening factors: stage boundaries must be multiples of M."""
        return math.prod(self.cfactors) if self.cfactors else 1

    def is_point(self, level: int, p: int) -> bool:
        return p in self._sets[level]

    def __post_init__(self):
        object.__setattr__(self, "_sets", tuple(frozenset(p) for p in self.points))


def build_hierarchy(num_blocks: int, transitions, levels: int, cfactor, model: str = "the model") -> GridHierarchy:
    """Build P_0..P_{L-1} and the lumped coarse ops. Raises ConfigError when a level cannot be
    coarsened (it already is a single interval): "levels too deep for the grid"."""
    N = int(num_blocks)
    if levels < 1:
        raise ConfigError(f"mgrit.levels = {levels} must be >= 1 (1 = serial propagation)")
    cfs = expand_cfactors(cfactor, levels)
    trans = frozenset(int(t) for t in transitions)
    points = [tuple(range(N + 1))]
    ops = [{(n, n + 1): ((n, 1),) for n in range(N)}]
    for lvl, m in enumerate(cfs):
        prev = points[-1]
        if len(prev) <= 2:
            raise ConfigError(
                f"mgrit.levels = {levels} is too deep for {model}'s {N} blocks with mgrit.cfactor = "
                f"{list(cfactor)}: level {lvl} is already a single interval and cannot be coarsened; "
                f"use --mgrit-levels {lvl + 1} or smaller coarsening factors")
        nxt = list(prev[::m])
        if nxt[-1] != prev[-1]:
            nxt.append(prev[-1])
        fine_ops = ops[-1]
        level_ops = {}
        pos = {p: i for i, p in enumerate(prev)}
        for a, b in zip(nxt[:-1], nxt[1:]):
            seq: list[Op] = []
            for i in range(pos[a], pos[b]):
                seq.extend(fine_ops[(prev[i], prev[i + 1])])
            level_ops[(a, b)] = _lump(seq, trans)
        points.append(tuple(nxt))
        ops.append(level_ops)
    return GridHierarchy(N, cfs, tuple(points), tuple(ops), trans)


def mgrit_split(grid: GridHierarchy, K: int, block_costs, split=None, stem_cost: float = 0.0,
                head_cost: float = 0.0, model: str = "the model") -> list[int]:
    """Blocks per rank for K ranks, every interior boundary on the coarsest grid.

    ``split`` given (``--split`` / ``dist.split``, or the ``--balance time`` cut): validated and
    returned. Otherwise the coarsest intervals are dealt to the K ranks balancing the estimated
    forward cost (stem on rank 0, head on rank K-1), with the exact min-max partition of
    :func:`auxpar.models.staged.partition_counts`.
    """
    from auxpar.models.staged import partition_counts

    N = grid.num_blocks
    coarse = grid.points[-1]
    M = grid.coarsest_stride
    desc = f"levels = {grid.levels}, cfactor = {list(grid.cfactors) or '-'}"
    if split:
        counts = [int(c) for c in split]
        if len(counts) != K or any(c < 1 for c in counts) or sum(counts) != N:
            raise ConfigError(f"dist.split = {counts} must give {K} positive block counts summing to "
                              f"{model}'s {N} blocks")
        start = 0
        for r, c in enumerate(counts[:-1]):
            stop = start + c
            if not grid.is_point(grid.levels - 1, stop):
                suggestion = mgrit_split(grid, K, block_costs, None, stem_cost, head_cost, model) \
                    if len(coarse) - 1 >= K else None
                hint = (f"e.g. --split {','.join(map(str, suggestion))}, or drop --split (and --balance time) "
                        "to let auxpar choose such a cut" if suggestion else
                        "use fewer --mgrit-levels or a smaller --mgrit-cfactor")
                raise ConfigError(
                    f"mgrit.cfactor does not divide rank {r}'s chunk: dist.split = {counts} gives rank {r} "
                    f"blocks {start}-{stop - 1} ({c} blocks), but with mgrit {desc} every stage except the "
                    f"last needs a multiple of M = {M} blocks, so that each stage boundary is a point of "
                    f"every coarse grid; {hint}")
            start = stop
        return counts
    units = len(coarse) - 1
    if units < K:
        raise ConfigError(
            f"mgrit {desc} is too deep for {K} stages: {model}'s {N} blocks give only {units} coarsest-level "
            f"interval(s) of M = {M} blocks, and every stage needs at least one (its boundaries must be "
            f"coarsest-grid points); use fewer --mgrit-levels, a smaller --mgrit-cfactor or fewer --stages")
    costs = [float(sum(block_costs[a:b])) for a, b in zip(coarse[:-1], coarse[1:])]
    costs[0] += stem_cost
    costs[-1] += head_cost
    per_rank_units = partition_counts(costs, K)
    counts, i = [], 0
    for u in per_rank_units:
        counts.append(coarse[i + u] - coarse[i])
        i += u
    return counts


@dataclass(frozen=True)
class LevelView:
    """One rank's unknowns on one level, in solve order.

    ``points``: the rank's points of this level (fine indices) in the order the solve visits
    them; ``coarse[i]``: ``points[i]`` is a C-point (a point of the next level; all False on the
    coarsest level); ``ghost``: the point before ``points[0]`` -- owned by the upstream rank, or
    the fixed initial (forward) / terminal (adjoint) condition on the first rank.
    """

    points: tuple[int, ...]
    coarse: tuple[bool, ...]
    ghost: int


def level_views(grid: GridHierarchy, start: int, stop: int, reverse: bool = False) -> list[LevelView]:
    """The views of the chunk of blocks ``start..stop-1`` on every level.

    Forward (u): the unknowns are the points ``start+1 .. stop``, the ghost is ``start``.
    Adjoint (lambda, ``reverse``): the unknowns are the points ``stop-1 .. start`` (backward in
    layer-time), the ghost is ``stop``.
    """
    views = []
    for lvl, pts in enumerate(grid.points):
        nxt = grid.points[lvl + 1] if lvl + 1 < grid.levels else ()
        nxt_set = frozenset(nxt)
        if reverse:
            mine = tuple(p for p in reversed(pts) if start <= p < stop)
            ghost = stop
        else:
            mine = tuple(p for p in pts if start < p <= stop)
            ghost = start
        views.append(LevelView(mine, tuple(p in nxt_set for p in mine), ghost))
    return views
