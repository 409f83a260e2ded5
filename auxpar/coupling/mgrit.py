"""Layer-parallel training with MGRIT: ``--method mgrit --stages K [--dp N]``.

The blocks are time steps ``u_{n+1} = Phi_n(u_n) = shortcut(u_n) + h f_n(u_n)`` (algorithms.md
§6; h = ``mgrit.step``, 1 = the standard ResNet). Layer rank k owns a contiguous chunk of blocks
(stem on rank 0, head on rank K-1; the cut puts every stage boundary on the coarsest grid, see
:mod:`auxpar.mgrit.grid`). A parallel-phase training step on every rank::

    u_0 = stem(x)                                   (rank 0, once, BN running stats updated)
    forward MGRIT: fwd_iters FAS cycles, then the final sweep (every block once, graphs kept,
                   BN running stats updated once, from this sweep only)
    loss = CE(head(u_N), y); lambda_N = dLoss/du_N  (rank K-1, once)
    adjoint MGRIT: bwd_iters cycles backward in layer-time, then the final sweep, which
                   accumulates dLoss/dtheta_n = (dPhi_n/dtheta_n)^T lambda_{n+1} for every block
    stem backward with lambda_0                     (rank 0)
    gradient average over the data-parallel axis, NaN guard (all ranks), SGD step

With ``fwd_iters = bwd_iters = N_c`` (the number of level-1 intervals), two levels and
F-relaxation the step is exact: the same loss, gradients and BN running statistics as serial
backprop. With the defaults (one-shot training) the gradients are inexact.

Coarse grid (details in :mod:`auxpar.mgrit.grid`): a coarse step lumps its interval's ordinary
blocks into the interval's first block at the summed step (``u + m h f(u)``) and applies the
interval's transitions (stride 2 / channel change) as they are, in place, so coarse steps map
shapes exactly like the fine steps they replace. Stem and head are never part of a grid: the
stem gives the fixed initial condition u_0, the head the adjoint's terminal condition.

Warm start (``mgrit.warm_start``, on): the forward solve starts its level-0 C-points from the
previous step's final C-point states -- by default their batch mean at each point
(``warm_mode = mean``), because the previous batch holds other samples: measured on digits
(ResNet-20 and ResNet-56 with BN, two FCF iterations, 9 batches each) the per-sample states as
they are (``states``, TorchBraid's choice) lower the first residual (ResNet-56: 920 -> 508) but
not the residual after the iterations (138 -> 149) and raise the gradient error (0.42 -> 0.44,
relative to the exact gradient), while the means lower both the final residual (138 -> 129) and
the gradient error (0.416 -> 0.407): a small gain, but free. The adjoint starts from zero
(``warm_adjoint`` off): warm-started adjoints raised the gradient error to 0.52. Cold starts are
zeros; ``mgrit.nested`` instead starts every solve from a serial coarsest-grid solve
interpolated up (and then ignores the warm states). Under ``--dp`` the means are per replica.

SPH phases: ``parallel`` = the MGRIT step above; ``serial`` = exact layer-serial backprop over
the K ranks of each replica (activations forward, gradients back, one batch at a time).
MGRIT states are not tied to samples, so both phases train on augmented data. The phase list
is ``mgrit.phases`` (default ``parallel``: serial phases buy exact gradients for the time of
serial backprop plus communication, and MGRIT needs no re-initialization); ``--schedule``
sets it when the method is mgrit.

Data parallelism (``--dp N``): see :mod:`auxpar.mesh` for the 2-D mesh. Each replica
solves its slice of the global batch; gradients (and the loss statistics) are averaged over the
data-parallel group before the guard and the step. BN batch statistics are per replica, as in
DDP; the running statistics are averaged over the replicas at the end of every epoch (StagedMethod).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from auxpar.coupling.base import StepOut
from auxpar.coupling.comm import P2P
from auxpar.coupling.stages import StagedMethod
from auxpar.errors import ConfigError, DistributedError
from auxpar.mgrit.grid import build_hierarchy, level_views, mgrit_split
from auxpar.mesh import Mesh
from auxpar.mgrit.chain import ChainComm
from auxpar.mgrit.propagators import AdjointProp, ForwardProp, StageBlocks, frozen_bn
from auxpar.mgrit.solver import MgritSolver, Settings
from auxpar.phases import parse_phases, phase_at
from auxpar.timing import Clock


class _AmpBlocks(StageBlocks):
    """StageBlocks whose block evaluations run under the rank's autocast (and channels_last)
    and return fp32 states, so MGRIT states, residuals and messages stay fp32 (--precision bf16)."""

    def __init__(self, blocks, start, h, amp):
        super().__init__(blocks, start, h)
        self.amp = amp

    def run(self, n, x, mult=1):
        with self.amp.autocast():
            y = super().run(n, self.amp.input(x), mult)
        return y.float()


class MgritMethod(StagedMethod):
    name = "mgrit"

    def __init__(self, cfg, info, net):
        super().__init__(cfg, info, net)
        mg = cfg.mgrit
        if cfg.model.dropout > 0:
            raise ConfigError(
                f"--method mgrit needs deterministic blocks, but model.dropout = {cfg.model.dropout}: every "
                "block runs many times per step and each run would draw another dropout mask, so the "
                "relaxation would chase a moving target; use --dropout 0")
        self.K, self.dp = cfg.dist.stages, cfg.dist.dp
        self.mesh = Mesh(info, self.K, self.dp)
        self.k, self.d = self.mesh.k, self.mesh.d
        self.device = info.device
        net.set_step(mg.step)
        self.grid = build_hierarchy(net.num_blocks, net.transition_indices(), mg.levels, mg.cfactor, net.name)
        stem_c, block_c, head_c = net.costs()
        self.counts = mgrit_split(self.grid, self.K, block_c, list(cfg.dist.split) or None, stem_c, head_c,
                                  net.name)
        cfg.dist.split = list(self.counts)  # the cut used, for summary.json / config.toml / resume
        self.shapes = [tuple(s) for s in net.boundary_shapes()]
        stages = net.partition(self.K, self.counts)
        self.keep_stage(stages)  # (log_rank: the last stage of replica 0 owns the loss and the accuracy)
        self.blocks = (_AmpBlocks(list(self.stage.blocks), self.block_range[0], mg.step, self.amp)
                       if self.amp.enabled or self.amp.channels_last
                       else StageBlocks(list(self.stage.blocks), self.block_range[0], mg.step))
        self.clock = Clock(self.device)
        self.p2p = P2P(info.rank, self.device, info.backend, clock=self.clock)
        self.fviews = level_views(self.grid, *self.block_range)
        self.bviews = level_views(self.grid, *self.block_range, reverse=True)
        self.phases_text = mg.phases
        self.phases = parse_phases(mg.phases)
        self.warm: dict[str, dict | None] = {"fwd": None, "bwd": None}
        self.dp_bytes = 0
        self.block_evals = 0
        self._last: dict | None = None
        self._epoch = self._zero_epoch()
        self._run = {"steps": 0, "fwd_iters": 0, "bwd_iters": 0, "rho_fwd": [], "rho_bwd": []}

    # ---- layout ---------------------------------------------------------------------------
    @classmethod
    def check_layout(cls, cfg, info):
        K, dp = cfg.dist.stages, cfg.dist.dp
        if info.world_size != K * dp:
            raise DistributedError(
                f"--method mgrit --stages {K} --dp {dp} needs exactly stages x dp = {K * dp} processes "
                f"(a {K} x {dp} mesh: layer axis x data axis), but {info.world_size} were started; "
                f"start {K * dp} (drop --nproc to let auxpar start them, or torchrun --nproc_per_node={K * dp}), "
                f"or change --stages / --dp so that their product is {info.world_size}")
        if cfg.data.batch_size % dp:
            raise ConfigError(
                f"--batch-size {cfg.data.batch_size} is the global batch and must divide evenly over "
                f"--dp {dp} replicas; use a multiple of {dp}")

    def phase(self, epoch):
        return phase_at(self.phases, epoch)

    def uses_augmentation(self, phase):
        return True  # MGRIT states belong to no sample: augmentation in every phase

    def stage_name(self, rank: int) -> str:
        k, d = rank % self.K, rank // self.K
        start = sum(self.counts[:k])
        stop = start + self.counts[k]
        parts = (["stem"] if k == 0 else []) + [f"blocks {start}-{stop - 1}"] + (["head"] if k == self.K - 1 else [])
        rep = f", replica {d} of {self.dp}" if self.dp > 1 else ""
        return f"MGRIT stage {k} of {self.K} ({' + '.join(parts)}{rep})"

    # ---- per-epoch hooks ------------------------------------------------------------------
    def begin_epoch(self, epoch, phase):
        self._epoch = self._zero_epoch()
        return {}

    # ---- training -------------------------------------------------------------------------
    def train_step(self, batch, phase, next_idx=None):
        with self.clock.section("step"):  # compute = step - comm - wait - dp (see _times)
            if phase == "serial":
                return self._serial_step(batch)
            return self._mgrit_step(batch)

    def _settings(self, iters: int) -> Settings:
        mg = self.cfg.mgrit
        return Settings(iters=iters, relax=mg.relax, cweight=mg.cweight, final_relax=mg.final_relax,
                        tol=mg.tol, nested=mg.nested)

    def _zeros_fn(self, b: int):
        return lambda p: torch.zeros((b, *self.shapes[p]), device=self.device)

    def _guess(self, key: str, b: int) -> dict | None:
        mg = self.cfg.mgrit
        g = self.warm[key]
        if not mg.warm_start or g is None or (key == "bwd" and not mg.warm_adjoint):
            return None
        if mg.warm_mode == "mean":
            return {p: t.expand(b, *t.shape[1:]) for p, t in g.items()}
        if any(t.shape[0] != b for t in g.values()):
            return None  # another batch size (e.g. a last partial batch): cold start
        return g

    def solve_forward(self, x: torch.Tensor, keep_graph: bool = True):
        """Stem (rank 0) and the forward MGRIT solve; returns (u_0 with its graph or None, result, prop)."""
        b = x.shape[0]
        k = self.k
        u0 = None
        fixed = None
        if k == 0:
            with torch.set_grad_enabled(keep_graph), self.amp.autocast():
                u0 = self.stage.stem(self.amp.input(x)).float()
            fixed = u0.detach()
        prop = ForwardProp(self.blocks, self.grid, keep_graph=keep_graph)
        comm = ChainComm(self.p2p, self.mesh, self.mesh.prev, self.mesh.next, self.shapes.__getitem__,
                         b, torch.float32)
        solver = MgritSolver(self.fviews, prop, comm, self._zeros_fn(b))
        with frozen_bn(self.blocks.all_bns):
            res = solver.solve(fixed, self._guess("fwd", b), self._settings(self.cfg.mgrit.fwd_iters))
        self.block_evals += prop.evals
        return u0, res, prop

    def solve_adjoint(self, lam_N: torch.Tensor | None, fprop: ForwardProp, b: int):
        prop = AdjointProp(fprop)
        comm = ChainComm(self.p2p, self.mesh, self.mesh.next, self.mesh.prev, self.shapes.__getitem__,
                         b, torch.float32)
        solver = MgritSolver(self.bviews, prop, comm, self._zeros_fn(b))
        with frozen_bn(self.blocks.all_bns):
            res = solver.solve(lam_N, self._guess("bwd", b), self._settings(self.cfg.mgrit.bwd_iters))
        self.block_evals += prop.evals
        prop.release()
        return res

    def _c_states(self, views, states) -> dict:
        """What the next step's warm start needs of this solve's final level-0 C-points."""
        v = views[0]
        mean = self.cfg.mgrit.warm_mode == "mean"
        return {p: (states[p].detach().mean(0, keepdim=True) if mean else states[p].detach())
                for p, c in zip(v.points, v.coarse) if c}

    def _mgrit_step(self, batch) -> StepOut:
        k, K = self.k, self.K
        x, y = batch.x, batch.y
        b = y.numel()
        self.stage.train()
        self.opt.zero_grad(set_to_none=True)
        self.guard.snapshot(self.stage)  # BN running stats come back if the guard rejects the step
        u0, fres, fprop = self.solve_forward(x)
        N = self.grid.num_blocks
        lam_N = None
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        if k == K - 1:
            leaf = fres.states[N].detach().requires_grad_(True)
            with self.amp.autocast():
                logits = self.stage.head(self.amp.input(leaf)).float()
            loss = F.cross_entropy(logits, y)
            loss.backward()
            lam_N = leaf.grad
            loss = loss.detach()
            correct = (logits.detach().argmax(1) == y).sum()
        bres = self.solve_adjoint(lam_N, fprop, b)
        if k == 0 and u0.requires_grad:  # (a parameter-free stem and an input without grad: nothing to do)
            u0.backward(bres.states[0])
        self.warm = {"fwd": self._c_states(self.fviews, fres.states), "bwd": self._c_states(self.bviews, bres.states)}
        # One reduction for the logged norms: fwd iterations, then bwd (global over all ranks and replicas).
        sq = torch.stack([t.double() for t in fres.residual_sq + bres.residual_sq]) if (
            fres.residual_sq or bres.residual_sq) else torch.zeros(0, dtype=torch.float64, device=self.device)
        local_sq = sq.sum() if sq.numel() else torch.zeros((), dtype=torch.float64, device=self.device)
        with self.clock.section("dp"):
            self.mesh.all_reduce_world(sq)
        nf = len(fres.residual_sq)
        self._last = {"fwd_iters": fres.iters, "bwd_iters": bres.iters, "sq": sq, "nf": nf}
        self._record(fres.iters, bres.iters, sq, nf)
        loss, correct, count = self._finish(loss, correct, b, local_sq)
        return StepOut(loss, correct, count)

    def _serial_step(self, batch) -> StepOut:
        """Exact layer-serial backprop over this replica's K ranks (the SPH serial phase)."""
        k, K, p2p, mesh = self.k, self.K, self.p2p, self.mesh
        b = batch.y.numel()
        self.stage.train()
        self.opt.zero_grad(set_to_none=True)
        self.guard.snapshot(self.stage)
        if k == 0:
            inp = batch.x
        else:
            inp = p2p.recv((b, *self.stage.in_shape), torch.float32, mesh.prev)
            inp.requires_grad_(True)
        with self.amp.autocast():
            out = self.stage(self.amp.input(inp)).float()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        if k < K - 1:
            p2p.send(out.detach().float(), mesh.next)
            grad = p2p.recv((b, *self.stage.out_shape), torch.float32, mesh.next)
            out.backward(grad)
        else:
            loss = F.cross_entropy(out, batch.y)
            loss.backward()
            loss = loss.detach()
            correct = (out.detach().argmax(1) == batch.y).sum()
        if k > 0:
            p2p.send(inp.grad, mesh.prev)
        self._last = None
        loss, correct, count = self._finish(loss, correct, b, None)
        return StepOut(loss, correct, count)

    def _finish(self, loss, correct, b, local_sq):
        """Data-parallel average, NaN guard on every rank, clipping, optimizer step."""
        params = [p for p in self.stage.parameters() if p.requires_grad]
        last = self.k == self.K - 1
        count = b
        if self.dp > 1:
            tok = self.clock.start()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            parts = [g.reshape(-1) for g in grads]
            if last:
                parts.append(torch.stack([loss.float() * b, correct.float(), torch.tensor(float(b), device=self.device)]))
            flat = torch.cat(parts)
            self.mesh.all_reduce_dp(flat)
            n = sum(g.numel() for g in grads)
            self.dp_bytes += int(round(flat.numel() * flat.element_size() * 2 * (self.dp - 1) / self.dp))
            off = 0
            for p, g in zip(params, grads):
                p.grad = (flat[off:off + g.numel()].view_as(g) / self.dp)
                off += g.numel()
            if last:
                s = flat[n:n + 3]
                loss = (s[0] / s[2]).detach()
                correct = s[1].round().long()
                count = int(round(float(s[2])))
            self.clock.stop("dp", tok)
        # Complete this step's sends first: every peer has received them by now (the residual
        # all-reduce, or in the serial phase the gradient that came back, ordered it), so this
        # costs no waiting, and a guard that raises leaves no send in flight (a gloo send still
        # pending when the process group is torn down aborts the process; one whose work object
        # is dropped unreceived is lost).
        self.flush()
        checks = [loss] + ([local_sq] if local_sq is not None else [])
        if self.guard.check(*checks):
            self.clip_and_step()  # the whole network's gradient norm (layer group), as serial clipping
        else:  # (the guard has restored the BN buffers)
            self.opt.zero_grad(set_to_none=True)
            self.warm = {"fwd": None, "bwd": None}  # non-finite states must not seed the next solve
        return loss, correct, count

    def flush(self) -> None:
        """Complete this rank's pending sends (the peers must be receiving them)."""
        self.p2p.reap(block=True)

    # ---- logging --------------------------------------------------------------------------
    def _record(self, fi: int, bi: int, sq: torch.Tensor, nf: int) -> None:
        e = self._epoch
        e["steps"] += 1
        e["fwd_iters"] += fi
        e["bwd_iters"] += bi
        e["per_step"].append((fi, bi, sq, nf))

    @staticmethod
    def _norms(sq: torch.Tensor, nf: int) -> tuple[list[float], list[float]]:
        vals = [math.sqrt(max(v, 0.0)) for v in sq.tolist()]
        return vals[:nf], vals[nf:]

    @staticmethod
    def _factor(res: list[float], iters: int) -> float | None:
        """Observed convergence factor of one solve: (r_final / r_first)^(1/iterations)."""
        if iters < 1 or len(res) < 2 or not res[0] > 0 or not all(math.isfinite(r) for r in res):
            return None
        return (res[-1] / res[0]) ** (1.0 / iters)

    def step_metrics(self) -> dict:
        if self._last is None:
            return {}
        f, bk = self._norms(self._last["sq"], self._last["nf"])
        return {"mgrit_iters": {"fwd": self._last["fwd_iters"], "bwd": self._last["bwd_iters"]},
                "mgrit_residuals": {"fwd": f, "bwd": bk}}

    def _zero_epoch(self) -> dict:
        return {"steps": 0, "fwd_iters": 0, "bwd_iters": 0, "per_step": []}

    def _epoch_summary(self) -> dict:
        e = self._epoch
        if not e["steps"]:
            return {"mgrit_iters": None, "mgrit_residuals": None, "rho": (None, None)}
        rf, rb = [], []
        for fi, bi, sq, nf in e["per_step"]:
            f, bk = self._norms(sq, nf)
            rf.append(self._factor(f, fi))
            rb.append(self._factor(bk, bi))
        f, bk = self._norms(e["per_step"][-1][2], e["per_step"][-1][3])
        mean = lambda xs: (sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))  # noqa: E731
                           if any(x is not None for x in xs) else None)
        return {"mgrit_iters": {"fwd": e["fwd_iters"] / e["steps"], "bwd": e["bwd_iters"] / e["steps"]},
                "mgrit_residuals": {"fwd": f, "bwd": bk}, "rho": (mean(rf), mean(rb)), "rho_lists": (rf, rb)}

    def _times(self) -> list[list[float]]:
        W = self.info.world_size
        t = torch.zeros(3, W, dtype=torch.float64, device=self.device)
        r = self.info.rank
        c = self.clock.totals()
        comm, wait, dp = c.get("comm", 0.0), c.get("wait", 0.0), c.get("dp", 0.0)
        t[0, r], t[1, r], t[2, r] = max(c.get("step", 0.0) - comm - wait - dp, 0.0), comm + dp, wait
        self.mesh.all_reduce_world(t)
        return t.tolist()

    def epoch_metrics(self) -> dict:
        s = self._epoch_summary()
        if s["mgrit_iters"] is not None:
            r = self._run
            r["steps"] += self._epoch["steps"]
            r["fwd_iters"] += self._epoch["fwd_iters"]
            r["bwd_iters"] += self._epoch["bwd_iters"]
            rf, rb = s["rho_lists"]
            r["rho_fwd"] += [x for x in rf if x is not None]
            r["rho_bwd"] += [x for x in rb if x is not None]
            r["last_residuals"] = s["mgrit_residuals"]
            self._epoch["per_step"] = self._epoch["per_step"][-1:]  # counted; keep the last for summaries
            self._epoch["steps"] = 0
            self._epoch["fwd_iters"] = self._epoch["bwd_iters"] = 0
        times = self._times()
        return {"mgrit_iters": s["mgrit_iters"], "mgrit_residuals": s["mgrit_residuals"],
                "time_compute_s": times[0], "time_comm_s": times[1], "time_wait_s": times[2]}

    def summary_extras(self) -> dict:
        r = self._run
        times = self._times()
        mg = self.cfg.mgrit
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        evals = torch.tensor([float(self.block_evals)], dtype=torch.float64, device=self.device)
        self.mesh.all_reduce_world(evals)
        return {
            "mgrit_iters": ({"fwd": r["fwd_iters"] / r["steps"], "bwd": r["bwd_iters"] / r["steps"]}
                            if r["steps"] else None),
            "mgrit_residuals": r.get("last_residuals"),
            "mgrit_convergence_factor": {"fwd": mean(r["rho_fwd"]), "bwd": mean(r["rho_bwd"])},
            "mgrit_settings": {"levels": mg.levels, "cfactor": list(self.grid.cfactors), "fwd_iters": mg.fwd_iters,
                               "bwd_iters": mg.bwd_iters, "tol": mg.tol, "relax": mg.relax, "cweight": mg.cweight,
                               "final_relax": mg.final_relax, "nested": mg.nested, "warm_start": mg.warm_start,
                               "warm_mode": mg.warm_mode, "warm_adjoint": mg.warm_adjoint, "step": mg.step,
                               "dp": self.dp},
            "mgrit_exact_iters": self.grid.coarse_intervals,
            "mgrit_block_evals": int(evals.item()),
            "phases": self.phases_text,
            "eval_comm_bytes": self.eval_bytes_total(),
            "time_compute_s": times[0], "time_comm_s": times[1], "time_wait_s": times[2],
        }

    def comm_bytes(self):
        """Training traffic this rank sent: neighbour messages (solves, serial phase) plus the
        data-parallel all-reduce at the ring volume 2 (N-1)/N x payload."""
        return self.p2p.bytes_sent + self.dp_bytes

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self):
        """The stage's state (stages.StagedMethod), the warm-start states and the run's counters."""
        warm = {key: (None if v is None else {int(p): t for p, t in v.items()}) for key, v in self.warm.items()}
        r = self._run
        return {**super().state_dict(), "warm": warm, "dp_bytes": self.dp_bytes, "block_evals": self.block_evals,
                "run": {"steps": r["steps"], "fwd_iters": r["fwd_iters"], "bwd_iters": r["bwd_iters"],
                        "rho_fwd": list(r["rho_fwd"]), "rho_bwd": list(r["rho_bwd"]),
                        "last_residuals": r.get("last_residuals")}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.warm = {key: (None if v is None else {int(p): t.to(self.device) for p, t in v.items()})
                     for key, v in state.get("warm", {}).items()} or {"fwd": None, "bwd": None}
        self.dp_bytes = int(state.get("dp_bytes", 0))
        self.block_evals = int(state.get("block_evals", 0))  # checkpoints before it was saved: counted from 0
        run = state.get("run")
        if run:
            self._run = {"steps": run["steps"], "fwd_iters": run["fwd_iters"], "bwd_iters": run["bwd_iters"],
                         "rho_fwd": list(run["rho_fwd"]), "rho_bwd": list(run["rho_bwd"])}
            if run.get("last_residuals") is not None:
                self._run["last_residuals"] = run["last_residuals"]

    def epoch_state(self):
        e = self._epoch
        return {"steps": e["steps"], "fwd_iters": e["fwd_iters"], "bwd_iters": e["bwd_iters"],
                "per_step": [[fi, bi, sq.detach().cpu(), nf] for fi, bi, sq, nf in e["per_step"]]}

    def load_epoch_state(self, state):
        if not state:
            return
        self._epoch = {"steps": state["steps"], "fwd_iters": state["fwd_iters"], "bwd_iters": state["bwd_iters"],
                       "per_step": [(fi, bi, sq.to(self.device), nf) for fi, bi, sq, nf in state["per_step"]]}
