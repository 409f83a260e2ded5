"""Nonlinear MGRIT (FAS V-cycles) on one rank's chunk of the layer grid.

The same solver runs the forward solve (states u, forward in layer-time) and the adjoint solve
(lambda, backward in layer-time): it only sees a chain of points in solve order
(:class:`~auxpar.mgrit.grid.LevelView` per level), a propagator and a neighbour exchange.

Level-l system, for every point p with predecessor q in solve order::

    u_p = Phi^l_{q->p}(u_q) + g^l_p          (g^0 = 0; g^{l+1} from FAS, below)

The right-hand side is kept as a pair (T, B) with ``g = T - B`` and every update evaluated as
``T_p + (Phi(u_q) - B_p)``: when the iterate at q has not changed since B was computed, the two
propagations are bitwise equal and the update returns T exactly. This is what makes the
exactness tests bitwise, not just 1e-6, at the exactness bound.

One iteration (cycle) on level l:

1. relaxation: F (propagate every F-point from its interval's C-point) or FCF (F, then a
   weighted Jacobi C-relaxation ``u_c <- u_c + w (T_c + Phi(u_{c-1}) - B_c - u_c)``, then F);
2. restriction (FAS, injection): for each C-point c, ``T^{l+1}_c = T_c + (Phi^l(u_{c-1}) - B_c)``
   (the value C-relaxation would give; ``T^{l+1}_c - u_c`` is the level-l residual at c) and
   ``B^{l+1}_c = Phi^{l+1}(u_{c'})`` with c' the previous C-point; the coarse iterate starts
   at the injected C-values;
3. coarse solve: serial across ranks on the coarsest level (each rank waits for its upstream
   neighbour's last value), else one V-cycle on level l + 1 recursively;
4. correction: ``u_c <- v_c`` (FAS with injection), then on levels l >= 1 an F-relaxation so
   that the F-points (C-points of level l - 1) carry the correction down. On level 0 the next
   relaxation (or the final sweep) does that F-relaxation.

All sweeps are Jacobi across intervals (every interval starts from its C-point's value before
the sweep), exactly as XBraid computes with one interval per process, so the iterates do not
depend on the number of ranks.

Residual norms (logged): after each iteration's relaxation, ``sum_c ||T^1_c - u_c||^2`` over
level 0's C-points of this rank (XBraid's global 2-norm once summed over ranks and rooted), and
once more in the final sweep (the residual after the last coarse-grid correction).

Final sweep (level 0): every step of the chunk runs exactly once through ``prop.step_final``
(the forward keeps autograd graphs and updates BN running statistics; the adjoint accumulates
parameter gradients): F-points are propagated, each C-point's step is evaluated, and with
``final_relax = FC`` the C-points take the (weighted) C-relaxation value; with ``F`` they keep
their coarse-corrected value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from auxpar.mgrit.grid import LevelView


class Propagator(Protocol):
    def step(self, level: int, src: int, dst: int, x: torch.Tensor) -> torch.Tensor:
        """Level-level step from point src to the next point dst in solve order (no graph kept)."""

    def step_final(self, src: int, dst: int, x: torch.Tensor) -> torch.Tensor:
        """The fine step of the final sweep (keeps what training needs)."""


class Exchange(Protocol):
    has_up: bool
    has_down: bool

    def send_down(self, t: torch.Tensor) -> None: ...

    def recv_up(self, point: int) -> torch.Tensor: ...

    def global_norm(self, sq: torch.Tensor) -> float: ...


@dataclass
class SolveResult:
    states: dict
    """Level-0 values after the final sweep: every local point and the ghost."""
    iters: int
    """Coarse-grid corrections done (MGRIT cycles)."""
    residual_sq: list = field(default_factory=list)
    """This rank's squared residual norms (0-dim device tensors): one per iteration, then the final sweep's."""


@dataclass
class Settings:
    iters: int = 1
    relax: str = "FCF"
    cweight: float = 1.0
    final_relax: str = "F"
    tol: float = 0.0
    nested: bool = False


class MgritSolver:
    def __init__(self, views: list[LevelView], prop: Propagator, comm: Exchange,
                 zeros: Callable[[int], torch.Tensor]):
        self.views, self.prop, self.comm, self.zeros = views, prop, comm, zeros
        self.L = len(views)
        self.u: list[dict | None] = [None] * self.L
        self.T: list[dict | None] = [None] * self.L
        self.B: list[dict | None] = [None] * self.L
        self.fixed: torch.Tensor | None = None

    # ---- building blocks ------------------------------------------------------------------
    def _update(self, lvl: int, p: int, y: torch.Tensor) -> torch.Tensor:
        T = self.T[lvl]
        if T is None:
            return y
        return T[p] + (y - self.B[lvl][p])

    def _level_dict(self, lvl: int) -> dict:
        d = {}
        if not self.comm.has_up:
            d[self.views[lvl].ghost] = self.fixed
        return d

    def _exchange(self, lvl: int) -> None:
        v, u = self.views[lvl], self.u[lvl]
        if self.comm.has_down:
            self.comm.send_down(u[v.points[-1]])
        if self.comm.has_up:
            u[v.ghost] = self.comm.recv_up(v.ghost)

    def _f_relax(self, lvl: int) -> None:
        self._exchange(lvl)
        v, u, step = self.views[lvl], self.u[lvl], self.prop.step
        prev = v.ghost
        for p, c in zip(v.points, v.coarse):
            if not c:
                u[p] = self._update(lvl, p, step(lvl, prev, p, u[prev]))
            prev = p

    def _c_values(self, lvl: int) -> dict:
        """T_c + (Phi(u_{c-1}) - B_c) for every C-point, from the current values (Jacobi)."""
        v, u, step = self.views[lvl], self.u[lvl], self.prop.step
        out = {}
        prev = v.ghost
        for p, c in zip(v.points, v.coarse):
            if c:
                out[p] = self._update(lvl, p, step(lvl, prev, p, u[prev]))
            prev = p
        return out

    def _c_relax(self, lvl: int, w: float) -> None:
        u = self.u[lvl]
        for p, y in self._c_values(lvl).items():
            u[p] = y if w == 1.0 else u[p] + w * (y - u[p])

    def _relax(self, lvl: int, s: Settings) -> None:
        self._f_relax(lvl)
        if s.relax == "FCF":
            self._c_relax(lvl, s.cweight)
            self._f_relax(lvl)

    def _restrict(self, lvl: int) -> torch.Tensor:
        """FAS restriction to level lvl + 1; returns this rank's squared level-lvl residual at C-points."""
        v, u = self.views[lvl], self.u[lvl]
        nv = self.views[lvl + 1]
        t_new = self._c_values(lvl)
        sq = torch.zeros((), dtype=torch.float64, device=self._device())
        for p, y in t_new.items():
            sq = sq + (y - u[p]).double().pow(2).sum()
        un = self._level_dict(lvl + 1)
        un[nv.ghost] = u[v.ghost]
        for p in nv.points:
            un[p] = u[p]
        b_new = {}
        prev = nv.ghost
        for p in nv.points:
            b_new[p] = self.prop.step(lvl + 1, prev, p, un[prev])
            prev = p
        self.u[lvl + 1], self.T[lvl + 1], self.B[lvl + 1] = un, t_new, b_new
        return sq

    def _serial(self, lvl: int) -> None:
        v, u, step = self.views[lvl], self.u[lvl], self.prop.step
        if self.comm.has_up:
            u[v.ghost] = self.comm.recv_up(v.ghost)
        prev = v.ghost
        for p in v.points:
            u[p] = self._update(lvl, p, step(lvl, prev, p, u[prev]))
            prev = p
        if self.comm.has_down:
            self.comm.send_down(u[v.points[-1]])

    def _correct(self, lvl: int) -> None:
        u, uc = self.u[lvl], self.u[lvl + 1]
        for p in self.views[lvl + 1].points:
            u[p] = uc[p]
        self.u[lvl + 1] = self.T[lvl + 1] = self.B[lvl + 1] = None

    def _cycle(self, lvl: int, s: Settings) -> None:
        """Approximately solve level lvl (>= 1) from its current iterate: serial on the coarsest
        level, else one V-cycle."""
        if lvl == self.L - 1:
            self._serial(lvl)
            return
        self._relax(lvl, s)
        self._restrict(lvl)
        self._cycle(lvl + 1, s)
        self._correct(lvl)
        self._f_relax(lvl)

    def _nested(self) -> None:
        """Nested iteration: solve the coarsest grid's own problem (no FAS right-hand side)
        serially, then interpolate up by injection + F-relaxation on every finer level."""
        top = self.L - 1
        self.u[top] = self._level_dict(top)
        self._serial(top)
        for lvl in range(top - 1, -1, -1):
            u = self._level_dict(lvl)
            for p in self.views[lvl + 1].points:
                u[p] = self.u[lvl + 1][p]
            self.u[lvl] = u
            self.u[lvl + 1] = None
            if lvl > 0:
                self._f_relax(lvl)

    def _device(self) -> torch.device:
        return self.zeros(self.views[0].ghost).device

    def _final(self, s: Settings) -> torch.Tensor:
        v, u, fin = self.views[0], self.u[0], self.prop.step_final
        self._exchange(0)
        prev = v.ghost
        for p, c in zip(v.points, v.coarse):
            if not c:
                u[p] = fin(prev, p, u[prev])
            prev = p
        ys = {}
        prev = v.ghost
        for p, c in zip(v.points, v.coarse):
            if c:
                ys[p] = fin(prev, p, u[prev])
            prev = p
        sq = torch.zeros((), dtype=torch.float64, device=self._device())
        for p, y in ys.items():
            sq = sq + (y - u[p]).double().pow(2).sum()
        if s.final_relax == "FC":
            w = s.cweight
            for p, y in ys.items():
                u[p] = y if w == 1.0 else u[p] + w * (y - u[p])
        return sq

    def _serial_final(self) -> None:
        v, u, fin = self.views[0], self.u[0], self.prop.step_final
        if self.comm.has_up:
            u[v.ghost] = self.comm.recv_up(v.ghost)
        prev = v.ghost
        for p in v.points:
            u[p] = fin(prev, p, u[prev])
            prev = p
        if self.comm.has_down:
            self.comm.send_down(u[v.points[-1]])

    # ---- the solve ----------------------------------------------------------------------
    def solve(self, fixed: torch.Tensor | None, guess: dict | None, s: Settings) -> SolveResult:
        """``fixed``: the initial (forward) or terminal (adjoint) condition on the first rank in
        solve order (None elsewhere); ``guess``: initial values of level-0 C-points (missing
        ones start at zero); ``s``: iteration count (a cap when ``s.tol > 0``: stop once the
        global residual is at or below ``tol`` times the first iteration's), relaxation etc."""
        self.fixed = fixed
        self.u = [None] * self.L
        self.T = [None] * self.L
        self.B = [None] * self.L
        u = self._level_dict(0)
        self.u[0] = u
        if self.L == 1:  # one level: serial propagation, exact, no iteration
            self._serial_final()
            return SolveResult(dict(u), 0, [])
        v = self.views[0]
        with torch.no_grad():
            if s.nested:
                self._nested()
                u = self.u[0]
            else:
                for p, c in zip(v.points, v.coarse):
                    if c:
                        g = guess.get(p) if guess else None
                        u[p] = g if g is not None else self.zeros(p)
            res = []
            done = 0
            r0 = None
            for _ in range(s.iters):
                self._relax(0, s)
                sq = self._restrict(0)
                res.append(sq)
                if s.tol > 0:  # relative: the forward and the adjoint residuals differ by orders of magnitude
                    r = self.comm.global_norm(sq)
                    r0 = r if r0 is None else r0
                    if r <= s.tol * r0:
                        self.u[1] = self.T[1] = self.B[1] = None
                        break
                self._cycle(1, s)
                self._correct(0)
                done += 1
        res.append(self._final(s))
        self.u[0] = None
        return SolveResult(u, done, res)

