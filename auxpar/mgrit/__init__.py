"""Multigrid reduction in time (MGRIT) over the block grid of a residual network.

torch.distributed only (gloo or nccl), no MPI, no compiled extension. The pieces:

* :mod:`auxpar.mgrit.grid`: points, coarse grids, lumped coarse steps (how transitions,
  stem and head are treated), the cut of the grid into per-rank chunks, and the settings checks;
* :mod:`auxpar.mgrit.solver`: nonlinear FAS V-cycles with F/FCF relaxation, serial coarsest
  solve, final sweep -- one solver for the forward and the adjoint solve;
* :mod:`auxpar.mgrit.propagators`: the forward block steps and the adjoint (vector-Jacobian)
  steps, batch-norm switches;
* :mod:`auxpar.mgrit.chain`: the neighbour exchange of a solve over the 2-D mesh (:mod:`auxpar.mesh`).

The training method that uses them is :class:`auxpar.coupling.mgrit.MgritMethod`.
"""

from auxpar.mgrit.grid import GridHierarchy, LevelView, build_hierarchy, level_views, mgrit_split
from auxpar.mgrit.solver import MgritSolver, Settings, SolveResult

__all__ = ["GridHierarchy", "LevelView", "MgritSolver", "Settings", "SolveResult", "build_hierarchy",
           "level_views", "mgrit_split"]
