"""Layer-parallel training with auxiliary-variable coupling: ``--method penalty`` and ``--method al``.

One stage per rank (K = world size). A parallel-phase step on rank k, batch ids B::

    input  = x[B] (k = 0)  or  U(z_k[B])                         # N x C x H x W
    out    = F_k(input)
    loss   = (beta/2) mean_i ||D(out_i) - t_{k+1,i}||^2 / n_{k+1}  (k < K-1)   or   CE(out, y)  (k = K-1)
    backward, optimizer step                                      # all ranks at the same time
    exchange: t_k[B] down to k-1 (posted one step early), o_{k+1} = D(out) up to k+1 (right after forward)
    aux update of z_k[B] (and mu_k[B]) with o_k from k-1, applied after this rank's compute

Definitions and deviations from algorithms.md, all deliberate:

* ``rho`` is beta, normalized per element: beta_k = rho / n_k, n_k the values of one stored state
  at boundary k. Every per-sample formula of §3 holds with beta_k. Default aux step eta_z =
  1/beta_k, which makes stage k-1's penalty gradient equal the (one-step stale) backprop gradient.
* dL_k/dz_k is the per-sample, sum-reduced input gradient (batch-mean gradient x |B|).
* AL: mu <- (1 - mu_damping) mu + beta_k (o - z_new); multipliers are reset when the aux states
  are re-initialized (``mu_reset``), which bounds their build-up to one parallel phase.
* Re-initialization: z_{k+1} = D(F_k(U(z_k))) in id order over the un-augmented training set,
  BatchNorm in train mode (batch statistics, as in training; running statistics are updated
  as in a training forward), dropout off. The input of stage k is U of the *stored* (rounded)
  z, so the residuals are exactly 0 right after a re-initialization, in any storage dtype.
* ``stage_input = "output"`` (an option, not algorithms.md's problem): stage k > 0 reads x_k[B],
  the last o_k that arrived for those samples (the true activation one visit ago), instead of
  z_k[B]; g is the input gradient there, z_k = o_k - g/beta_k stays stage k-1's target, and
  x_k[B] <- o_k in the aux update. No extra message; one more stored state.
* Clipping (``optim.grad_clip``): the global 2-norm of the concatenation of every stage's
  gradient of its own local objective (penalty or CE), one float64 all-reduce over the K ranks
  after the guard, in both phases (auxpar/coupling/optim.py); not a per-stage norm.

BatchNorm: every stage keeps its own BN layers. Parallel phase: stage k normalizes with the
batch statistics of its own input (x or U(z_k)) and updates its running statistics from it.
Serial phase: the true activations flow through, so running statistics track the real
network. Re-initialization: train-mode pass, updates running statistics once more from clean
data. Evaluation: running statistics (eval mode), layer-serial through all stages, no DS.

Data parallelism (``--dp D``; the 2-D mesh of :mod:`auxpar.mesh`, rank = d * K + k): everything
above runs per replica, on B/D samples of every global batch, with neighbours ``mesh.prev`` /
``mesh.next`` of the replica. Replica d owns the samples ``id % D == d`` for the whole run (the
sampler's strata, auxpar/data/loader.py), so its store holds only their aux states and
multipliers (row ``id // D``) and its re-initialization covers only them. The training forward
of both phases runs through DistributedDataParallel on the stage's replica group (``self.model``):
its bucketed all-reduces average the stage's gradients over the D replicas during backward (the
hook :func:`replica_allreduce_hook` counts their bytes). The guard spans the world, the clip's
norm the replica's K stages. BN: per-replica batch statistics; running statistics averaged over
the replicas at the end of every epoch. With D = 1 no group, no wrapper: the code above exactly.
"""

from __future__ import annotations

import functools
import inspect
import time

import torch
import torch.nn.functional as F

from auxpar.coupling.aux_store import DTYPES, AuxStore
from auxpar.coupling.base import StepOut
from auxpar.coupling.comm import P2P
from auxpar.coupling.ds import DSFilter
from auxpar.coupling.stages import StagedMethod
from auxpar.distributed import all_reduce_
from auxpar.errors import ConfigError, DistributedError
from auxpar.mesh import Mesh
from auxpar.phases import beta_at, parse_phases, phase_at
from auxpar.timing import Clock, sync


def aux_update(rule: str, z: torch.Tensor, o: torch.Tensor, g: torch.Tensor, mu: torch.Tensor | None,
               beta: float, aux_lr: float = 0.0, damping: float = 0.0, mu_first: bool = False):
    """One aux-state (and multiplier) update, per sample; returns (z_new, mu_new or None).

    z: current states, o = F_{k-1}(z_{k-1}) from the stage below, g = per-sample sum-reduced
    dL_k/dz_k, mu: multipliers (None for the pure penalty), beta: per-element beta_k.

    * gradient: z - eta (beta (z - o) - mu + g), eta = aux_lr or 1/beta
    * prox:     (beta o + mu + z/tau - g) / (beta + 1/tau), tau = aux_lr or 1/beta
    * forward:  o
    then mu_new = (1 - damping) mu + beta (o - z_new).

    ``mu_first`` (AL only) swaps the order: mu_new = (1 - damping) mu + beta (o - z) from the
    current residual, then the z step with mu_new. With eta = 1/beta the target sent upstream is
    then t = z_new - mu_new/beta = o - g/beta at every step (the penalty's target), while the
    stage input z_new = o + (mu_new - g)/beta stays close to o once mu has tracked g.
    """
    if mu is not None and mu_first:
        mu = _multiplier(mu, o, z, beta, damping)
        z_new, _ = aux_update(rule, z, o, g, mu, beta, aux_lr)
        return z_new, mu
    # Both steps are z + w (o - z) + c (mu - g): one lerp and one or two in-place adds, one new
    # tensor (the boundary state of a whole batch: 6.4 MB at ResNet-20's 16x28x28 boundary, where
    # the textbook expression's seven temporaries took 7 ms of a 110 ms step on one CPU core).
    if rule == "gradient":  # z - eta (beta (z - o) - mu + g)
        eta = aux_lr if aux_lr > 0 else 1.0 / beta
        w, c = eta * beta, eta
    elif rule == "prox":  # (beta o + mu + z / tau - g) / (beta + 1 / tau)
        inv_tau = 1.0 / (aux_lr if aux_lr > 0 else 1.0 / beta)
        w, c = beta / (beta + inv_tau), 1.0 / (beta + inv_tau)
    elif rule == "forward":  # drops the downstream term: a baseline, no learning signal upstream
        z_new = o.clone()
        return z_new, (None if mu is None else _multiplier(mu, o, z_new, beta, damping))
    else:
        raise ValueError(f"unknown aux update rule {rule!r}")
    z_new = torch.lerp(z, o, w) if w != 1.0 else o.clone()  # (lerp at weight 1 is o exactly, too)
    z_new.add_(g, alpha=-c)
    if mu is not None:
        z_new.add_(mu, alpha=c)
    return z_new, (None if mu is None else _multiplier(mu, o, z_new, beta, damping))


def _multiplier(mu: torch.Tensor, o: torch.Tensor, z: torch.Tensor, beta: float, damping: float) -> torch.Tensor:
    """(1 - damping) mu + beta (o - z), with one new tensor."""
    out = torch.sub(o, z).mul_(beta)
    return out.add_(mu, alpha=1.0 - damping)


class LayerSerialExecutor:
    """The serial phase over the same K ranks: activations forward, gradients back, one batch at a time.

    This is ordinary backprop of the whole network, split across ranks; the result equals
    serial training (same batch, same augmentation). The small interface (``train_step``) is
    where a micro-batched pipeline executor plugs in.
    """

    name = "layer"

    def __init__(self, method: "LayerParallelMethod"):
        self.m = method

    def train_step(self, batch) -> StepOut:
        m, p2p, clock, amp, k, K = self.m, self.m.p2p, self.m.clock, self.m.amp, self.m.k, self.m.K
        b = batch.y.numel()
        m.stage.train()
        m.guard.snapshot(m.stage)
        # Messages with each neighbour, in order: activation k -> k+1, then gradient k+1 -> k.
        # Both travel as true fp32 values (no autocast dtype, no loss scale on the wire).
        if k == 0:
            inp = batch.x
        else:
            inp = p2p.recv((b, *m.stage.in_shape), torch.float32, m.prev_rank)
            inp.requires_grad_(True)
        tok = clock.start()
        with amp.autocast():
            out = m.model(amp.input(inp)).float()  # (the DDP wrapper under --dp: all-reduce in backward)
        if k < K - 1:
            clock.stop("compute", tok)
            p2p.send(amp.wire(out), m.next_rank)
            grad = p2p.recv((b, *m.stage.out_shape), torch.float32, m.next_rank)
            tok = clock.start()
            m.opt.zero_grad(set_to_none=True)
            out.backward(amp.scale(grad))
            loss = torch.zeros((), device=m.device)
            correct = torch.zeros((), dtype=torch.long, device=m.device)
        else:
            loss = F.cross_entropy(out, batch.y)
            m.opt.zero_grad(set_to_none=True)
            amp.scale(loss).backward()
            loss = loss.detach()
            correct = (out.detach().argmax(1) == batch.y).sum()
        clock.stop("compute", tok)
        if k > 0:
            p2p.send(amp.unscale_tensor(inp.grad), m.prev_rank)
        # NaN guard after the gradient went upstream (every rank must reach it): the last stage
        # checks its loss, the others their output, so the first rank named is where it started.
        check = loss if k == K - 1 else out.detach().float().sum()
        overflow = amp.unscale_(m.opt)  # fp16: this rank's overflow flag; else None
        ok = m.guard.wait(m.guard.post(check, overflow=overflow))
        if ok:
            with clock.section("compute"):
                m.clip_and_step()
        amp.update(skipped=not ok)
        return StepOut(loss, correct, b)


class LayerParallelMethod(StagedMethod):
    name = "penalty"
    multipliers = False

    def __init__(self, cfg, info, net):
        super().__init__(cfg, info, net)
        c = cfg.coupling
        # The 2-D mesh (auxpar/mesh.py): rank = d * K + k; one replica's K stages are
        # consecutive ranks. dp = 1: one replica, no groups, rank = k.
        self.K, self.dp = cfg.dist.stages, cfg.dist.dp
        self.mesh = Mesh(info, self.K, self.dp)
        self.k, self.d = self.mesh.k, self.mesh.d
        self.device = info.device
        # Build-then-slice: the whole net came from one seed; keep this rank's stage only.
        stages = net.partition(self.K, cfg.dist.split or None)
        for s in stages[:-1]:  # every rank checks every boundary, so all ranks fail alike
            DSFilter(s.out_shape, c.ds_factor, c.ds_mode, c.upsample, where=f"boundary {s.index + 1}")
        self.keep_stage(stages)
        self.model = self._replicate(self.stage)
        self.clock = Clock(self.device)
        self.p2p = P2P(info.rank, self.device, info.backend, clock=self.clock)
        self.send_dtype = DTYPES[c.aux_dtype]
        self.ds_in = (DSFilter(self.stage.in_shape, c.ds_factor, c.ds_mode, c.upsample,
                               where=f"boundary {self.k} (input of stage {self.k})") if self.k > 0 else None)
        self.ds_out = (DSFilter(self.stage.out_shape, c.ds_factor, c.ds_mode, c.upsample,
                                where=f"boundary {self.k + 1} (output of stage {self.k})")
                       if self.k < self.K - 1 else None)
        self.phases = parse_phases(c.phases)
        if c.serial_executor == "pipeline":  # micro-batched serial phase (torch.distributed.pipelining)
            from auxpar.coupling.pipeline import PipelineSerialExecutor

            self.executor = PipelineSerialExecutor(self)
        else:
            self.executor = LayerSerialExecutor(self)
        self.beta = c.rho
        self.store: AuxStore | None = None
        self.train_set = None
        self.stale = True  # aux states must be (re-)initialized before the next parallel step
        self._posted: dict[int, dict] = {}
        self._j = 0
        self._epoch_acc = self._zero_acc()

    # ---- layout -------------------------------------------------------------------------
    @classmethod
    def check_layout(cls, cfg, info):
        K, dp = cfg.dist.stages, cfg.dist.dp
        if K < 2:
            raise DistributedError(
                f"--method {cfg.run.method} couples K >= 2 stages, but --stages {K} was given; "
                "use --stages 2 or more (one process per stage), or --method serial"
            )
        if dp == 1 and info.world_size != K:
            raise DistributedError(
                f"--stages {K} needs exactly {K} processes (one per stage), but {info.world_size} were started; "
                f"use --nproc {K} or torchrun --nproc_per_node={K}"
            )
        if info.world_size != K * dp:
            raise DistributedError(
                f"--method {cfg.run.method} --stages {K} --dp {dp} needs exactly stages x dp = {K * dp} processes "
                f"(a {K} x {dp} mesh: layer axis x data axis), but {info.world_size} were started; start "
                f"{K * dp} (drop --nproc to let auxpar start them, or torchrun with {K * dp} processes in all), "
                f"or change --stages / --dp so that their product is {info.world_size}")
        if dp > 1:
            if cfg.data.batch_size % dp:
                raise ConfigError(
                    f"--batch-size {cfg.data.batch_size} is the global batch and must divide evenly over "
                    f"--dp {dp} replicas; use a multiple of {dp}")
            if cfg.data.strata not in (0, dp):
                raise ConfigError(
                    f"data.strata = {cfg.data.strata} with --dp {dp}: the aux states of a sample live with the "
                    f"replica that owns it (id % dp), so the sampler's strata must be the replicas; use "
                    f"data.strata = 0 (auto) or {dp}")
            if cfg.coupling.serial_executor == "pipeline" and (cfg.run.precision != "fp32" or cfg.run.channels_last):
                raise ConfigError(
                    f"--serial-executor pipeline with --dp {dp} runs in fp32 without channels_last only (the "
                    "replicas' gradient all-reduce wraps the stage itself, and the pipeline's precision wrapper "
                    "would sit outside it); use --precision fp32, or --serial-executor layer")

    def sampler_strata(self):
        # the slice always holds the samples id % dp == d: the ones whose aux states live here
        return self.cfg.data.strata or self.dp

    def logged_loss(self, out):
        if self.dp == 1 or self.k != self.K - 1:
            return float(out.loss)
        t = torch.stack([out.loss.double() * out.count,
                         torch.tensor(float(out.count), dtype=torch.float64, device=self.device)])
        self.mesh.all_reduce_dp(t)  # the last stages of the replicas: the global batch's loss
        return float(t[0] / t[1].clamp(min=1.0))

    def reduce_epoch_stats(self, stats):
        # the last stage of every replica holds its shard's loss and accuracy; the others hold
        # their penalty terms, which are not the training loss
        if self.dp == 1:
            return False
        if self.k != self.K - 1:
            stats.zero_()
        all_reduce_(self.info, stats)
        return True

    def _replicate(self, stage):
        """The module the training forwards run through: the stage itself (dp = 1) or the stage
        in DistributedDataParallel on its replica group, which averages the gradients over the D
        replicas with bucketed all-reduces that start during backward (one per bucket, issued
        in the same order on every replica). Buffers are not broadcast: BN statistics are per
        replica in training and averaged over the replicas at the end of each epoch."""
        if self.dp == 1 or not self.info.distributed:
            return stage
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer sync in forward (the replicas start equal: one seed; see average_bn_over_replicas)
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(stage, device_ids=ids, process_group=self.mesh.dp_group, **sync)
        self._hook_state = ReplicaHookState(self.mesh.dp_group, self.dp)
        ddp.register_comm_hook(self._hook_state, replica_allreduce_hook)
        return ddp

    @property
    def dp_bytes(self) -> int:
        """Bytes this rank sent on the data axis: the ring volume 2 (D-1)/D x payload."""
        st = getattr(self, "_hook_state", None)
        if st is None:
            return 0
        return int(round(st.payload * 2 * (self.dp - 1) / self.dp))

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of this replica's aux store for the sample ids ``idx`` (all owned here: id % dp == d)."""
        return idx if self.dp == 1 else torch.div(idx, self.dp, rounding_mode="floor")


    def phase(self, epoch):
        return phase_at(self.phases, epoch)

    def uses_augmentation(self, phase):
        # Aux states belong to one fixed version of each sample: no augmentation in parallel phases.
        return phase == "serial"

    # ---- set-up and per-epoch hooks -------------------------------------------------------
    def prepare(self, train_set) -> None:
        self.train_set = train_set
        if self.k > 0:
            c = self.cfg.coupling
            rows = len(range(self.d, len(train_set), self.dp))  # this replica's samples only
            self.store = AuxStore(rows, self.ds_in.shape, dtype=c.aux_dtype,
                                  placement=c.aux_device, device=self.device, multipliers=self.multipliers,
                                  inputs=c.stage_input == "output")

    def begin_epoch(self, epoch: int, phase: str) -> dict[str, float]:
        self.beta = beta_at(self.cfg.coupling, epoch)
        self._j = 0
        self._epoch_acc = self._zero_acc()
        spent = {}
        if phase == "parallel" and self.stale:
            t0 = time.perf_counter()
            self.reinitialize()
            sync(self.device)  # a host clock after queued device work is only true once it ran
            spent["reinit"] = time.perf_counter() - t0
        if phase == "serial":
            self.stale = True  # the parameters move: the states no longer match F
        return spent

    # per-element beta of the boundary this rank reads (in) and the one it writes (out)
    @property
    def beta_in(self) -> float:
        return self.beta / self.ds_in.numel

    @property
    def beta_out(self) -> float:
        return self.beta / self.ds_out.numel

    # ---- aux-state (re)initialization: one serial forward pass ----------------------------
    def reinit_threads(self) -> int:
        """CPU threads of this rank during :meth:`reinitialize` (``coupling.reinit_threads``).

        The last stage of a replica computes nothing then (it receives and stores), so under
        auto (0) the computing ranks of a node share the idle ranks' threads: with L local
        ranks of T threads each, I of them last stages, a computing rank gets T + (I T) // (L - I).
        Ranks are assumed to be numbered node by node (torchrun's assignment). The last stage,
        GPU ranks and single-process runs keep their threads."""
        now = torch.get_num_threads()
        if self.device.type != "cpu" or self.k == self.K - 1:
            return now
        want = self.cfg.coupling.reinit_threads
        if want > 0:
            return int(want)
        L = max(1, self.info.local_world_size)
        first = (self.info.rank // L) * L
        idle = sum(1 for r in range(first, first + L) if r % self.K == self.K - 1)
        return now + (idle * now) // max(1, L - idle)

    @torch.no_grad()
    def reinitialize(self) -> None:
        """z_{k+1} <- D(F_k(U(z_k))) over the un-augmented training set, in id order; mu reset.
        Under --dp each replica does its own samples (id % dp == d), B/dp at a time. On CPU the
        computing ranks borrow the idle last stage's cores for it (:meth:`reinit_threads`)."""
        before, threads = torch.get_num_threads(), self.reinit_threads()
        if threads != before:
            torch.set_num_threads(threads)
        try:
            self._reinitialize()
        finally:
            if threads != before:
                torch.set_num_threads(before)

    def _reinitialize(self) -> None:
        from auxpar.data import eval_batches

        self.stage.train()
        dropouts = [mod for mod in self.stage.modules() if isinstance(mod, torch.nn.Dropout)]
        for mod in dropouts:
            mod.eval()
        bs = self.cfg.data.batch_size // self.dp
        p2p, clock = self.p2p, self.clock
        for i, batch in enumerate(eval_batches(self.train_set, bs, self.device, shards=self.dp, shard=self.d)):
            b = batch.y.numel()
            # One message per batch, k -> k+1: the stored boundary state of stage k+1.
            o = p2p.recv((b, *self.ds_in.shape), self.send_dtype, self.prev_rank) if self.k > 0 else None
            tok = clock.start()
            if self.k == 0:
                inp = batch.x
            else:
                rows = self._rows(batch.idx)
                self.store.put_z(rows, o)
                self.store.put_x(rows, o)  # (stage_input = output: the true activation)
                inp = self.ds_in.up(self.store.get_z(rows))
            out = None
            if self.k < self.K - 1:
                with self.amp.autocast():
                    out = self.stage(self.amp.input(inp)).float()
            clock.stop("compute", tok)
            if out is not None:
                p2p.send_async(self.amp.wire(self.ds_out.down(out), self.send_dtype), self.next_rank)
                if i % 4 == 3:
                    p2p.reap()
        p2p.reap(block=True)
        for mod in dropouts:
            mod.train()
        if self.store is not None and self.cfg.coupling.mu_reset:
            self.store.reset_mu()
        self.stale = False

    # ---- training steps -------------------------------------------------------------------
    def train_step(self, batch, phase, next_idx=None):
        if phase == "serial":
            return self.executor.train_step(batch)
        return self._parallel_step(batch, next_idx)

    # The parallel step's protocol. Two exchanges per step j, each ONE batched exchange, issued
    # in the same order on every rank:
    #   T(j): target t_k[B_j] down to k-1, t_{k+1}[B_j] from k+1  (posted one step early)
    #   O(j): output o_{k+1}[B_j] = D(F_k(.)) up to k+1, o_k[B_j] from k-1  (after the forward)
    # so every rank issues ... T(j+1), O(j), guard(j), T(j+2), O(j+1), guard(j+1) ... and two
    # neighbours always agree on the n-th message between them (NCCL matches in issue order).
    # With optim.grad_clip > 0 the clip's all-reduce follows the guard on every rank.
    def _parallel_step(self, batch, next_idx) -> StepOut:
        """One parallel-phase step on rank k for the batch ids B (the data flow of the module
        docstring). Time: this rank's own work is timed as ``compute`` (``with compute()``);
        posting and waiting for messages are timed by the P2P primitive (``comm``, ``wait``)."""
        j, k, K, amp, guard, p2p = self._j, self.k, self.K, self.amp, self.guard, self.p2p
        compute = functools.partial(self.clock.section, "compute")
        B, b = batch.idx, batch.y.numel()

        # T(j+1): the next batch's targets, posted now so they arrive during this step's compute
        if j not in self._posted:  # (T(j) was posted by the previous step, except at the first)
            self._post_targets(B, j)
        if next_idx is not None:
            self._post_targets(next_idx, j + 1)
        rec = self._posted.pop(j)

        # forward: input = x[B] (k = 0) or U(z_k[B]); out = F_k(input); o_{k+1} = D(out)
        with compute():
            self.stage.train()
            guard.snapshot(self.stage)  # BN running stats come back if the guard rejects the step
            # N x C x H/s x W/s, fp32: z_k[B], or (stage_input = output) the stored true input
            zb = batch.x if k == 0 else rec.get("x", rec["z"]).requires_grad_(True)
            inp = zb if k == 0 else self.ds_in.up(zb)
            with amp.autocast():
                out = self.model(amp.input(inp)).float()  # (DDP under --dp: all-reduce in backward)
            o = self.ds_out.down(out) if k < K - 1 else None  # N x C' x H'/s x W'/s

        # O(j): our output o_{k+1}[B] up, the output o_k[B] of the stage below (for the aux update) in
        up = [(amp.wire(o, self.send_dtype), self.next_rank)] if o is not None else []
        down = [((b, *self.ds_in.shape), self.send_dtype, self.prev_rank)] if k > 0 else []
        out_ex = p2p.keep(p2p.exchange(up, down))
        t = rec["T"].wait()[0] if k < K - 1 else None  # t_{k+1}[B] from the stage above

        # local loss and backward. Every stage's loss is checked across all ranks before any
        # update; the guard's all-reduce runs during the backward pass (under fp16 after it,
        # with the overflow flag: see precision.py).
        with compute():
            if k < K - 1:
                # (beta/2) mean_i ||o_i - t_i||^2, as one fused kernel each way
                loss = F.mse_loss(o.float(), t.float(), reduction="sum") * (0.5 * self.beta_out / b)
                correct = torch.zeros((), dtype=torch.long, device=self.device)
            else:
                loss = F.cross_entropy(out, batch.y)
                correct = (out.detach().argmax(1) == batch.y).sum()
            handle = None if amp.scaling else guard.post(loss)
            self.opt.zero_grad(set_to_none=True)
            amp.scale(loss).backward()
            # per-sample, sum-reduced input gradient of this stage's own loss (unscaled before unscale_)
            g = amp.unscale_tensor(zb.grad) * b if k > 0 else None
            overflow = amp.unscale_(self.opt)
            if amp.scaling:
                handle = guard.post(loss, overflow=overflow)
        ok = guard.wait(handle)  # the same verdict on every rank (or TrainingError on every rank)

        # optimizer step, then the aux (and multiplier) update of z_k[B] with o_k[B]
        if ok:
            with compute():
                self.clip_and_step()
        amp.update(skipped=not ok)
        o_below = out_ex.wait()[0] if k > 0 else None
        if ok and k > 0:
            with compute():
                self._update_aux(B, rec["z"].detach(), o_below.float(), g, rec["mu"])

        acc = self._epoch_acc  # (residuals are summed in _update_aux)
        if k < K - 1:
            acc["penalty"] += loss.detach()
        acc["steps"] += 1
        p2p.reap()
        self._j += 1
        return StepOut(loss.detach(), correct, b)

    def _post_targets(self, idx: torch.Tensor, j: int) -> None:
        """Post T(j): send t_k[B_j] down, receive t_{k+1}[B_j] from above."""
        b = idx.numel()
        rec, sends, recvs = {}, [], []
        if self.k > 0:
            # Rows of B cannot change before step j uses them (an epoch's batches are disjoint
            # and updates only touch the current batch), so this gather serves step j too.
            rows = self._rows(idx)
            z = self.store.get_z(rows)
            mu = self.store.get_mu(rows)
            rec["z"], rec["mu"] = z, mu
            if self.store.x is not None:
                rec["x"] = self.store.get_x(rows)
            t = z if mu is None else z - mu / self.beta_in
            sends.append((t.to(self.send_dtype), self.prev_rank))
        if self.k < self.K - 1:
            recvs.append(((b, *self.ds_out.shape), self.send_dtype, self.next_rank))
        rec["T"] = self.p2p.keep(self.p2p.exchange(sends, recvs))  # kept: its send must finish by epoch end
        self._posted[j] = rec

    @torch.no_grad()
    def _update_aux(self, idx, z, o, g, mu) -> None:
        """Aux-state and multiplier update at boundary k for the samples idx (algorithms.md §3)."""
        c = self.cfg.coupling
        acc = self._epoch_acc
        acc["residual"] += (o - z).flatten(1).norm(dim=1).sum()
        acc["samples"] += z.shape[0]
        z_new, mu_new = aux_update(c.aux_update, z, o, g, mu, self.beta_in, c.aux_lr, c.mu_damping,
                                   mu_first=c.mu_order == "before")
        rows = self._rows(idx)
        self.store.put_z(rows, z_new)
        if mu_new is not None:
            self.store.put_mu(rows, mu_new)
        self.store.put_x(rows, o)  # stage_input = output: read the fresh true activation next visit

    # ---- accounting -----------------------------------------------------------------------
    def _zero_acc(self) -> dict:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"residual": z(), "samples": 0, "penalty": z(), "steps": 0}

    def epoch_metrics(self) -> dict:
        """Per-boundary and per-rank numbers of the epoch (a collective: every rank calls it)."""
        K, k, acc = self.K, self.k, self._epoch_acc
        t = torch.zeros(6, K, dtype=torch.float64, device=self.device)
        if k > 0 and acc["samples"]:
            t[0, k] = acc["residual"] / acc["samples"]
        if k < K - 1 and acc["steps"]:
            t[1, k + 1] = acc["penalty"] / acc["steps"]
        if self.store is not None:
            t[2, k] = self.store.mean_mu_norm()
        tt = self.clock.totals()
        # (the pipeline serial executor's schedule: "chunk" is compute, the rest of "pipe" waiting)
        chunk, pipe = tt.get("chunk", 0.0), tt.get("pipe", 0.0)
        t[3, k], t[4, k], t[5, k] = tt["compute"] + chunk, tt["comm"], tt["wait"] + max(pipe - chunk, 0.0)
        all_reduce_(self.info, t)
        if self.dp > 1:
            t /= self.dp  # each replica's stage k filled column k: the mean over the replicas
        rows = t.tolist()
        ran_parallel = acc["steps"] > 0
        return {
            "beta": self.beta,
            # boundary k = 1..K-1 (index 0 of each list is boundary 1)
            "residual": rows[0][1:] if ran_parallel else None,
            "penalty": rows[1][1:] if ran_parallel else None,
            "mu_norm": rows[2][1:] if self.multipliers else None,
            "time_compute_s": rows[3], "time_comm_s": rows[4], "time_wait_s": rows[5],
        }

    def summary_extras(self) -> dict:
        W = self.info.world_size
        t = torch.zeros(2 * W + 1, dtype=torch.float64, device=self.device)
        t[self.info.rank] = float(self.store.nbytes if self.store is not None else 0)
        t[W] = float(self.dp_bytes)
        t[W + 1 + self.info.rank] = float(self.reinit_threads())
        all_reduce_(self.info, t)
        m = self.epoch_metrics()
        return {
            "aux_store_bytes": int(t[:W].sum().item()), "aux_store_bytes_max_rank": int(t[:W].max().item()),
            "dp": self.dp, "dp_comm_bytes": int(t[W].item()), "ds_factor": self.cfg.coupling.ds_factor,
            "rho": self.cfg.coupling.rho, "final_beta": self.beta, "phases": self.cfg.coupling.phases,
            "serial_executor": self.executor.name, "stage_input": self.cfg.coupling.stage_input,
            "reinit_threads": [int(v) for v in t[W + 1:].tolist()],  # per rank
            "eval_comm_bytes": self.eval_bytes_total(),
            "time_compute_s": m["time_compute_s"], "time_comm_s": m["time_comm_s"],
            "time_wait_s": m["time_wait_s"],
        }

    # ---- state ----------------------------------------------------------------------------
    def stage_name(self, rank: int) -> str:
        k, d = rank % self.K, rank // self.K
        rep = f", replica {d} of {self.dp}" if self.dp > 1 else ""
        return f"stage {k} of {self.K}" + (" (the loss)" if k == self.K - 1 else "") + rep

    def comm_bytes(self):
        """Training traffic this rank sent on both axes: neighbour messages and the replicas'
        gradient all-reduce (ring volume)."""
        return self.p2p.bytes_sent + self.dp_bytes

    def state_dict(self):
        """The stage's state (stages.StagedMethod), beta, and the aux states and multipliers (in
        their storage dtype: a bf16 store checkpoints at half the fp32 size)."""
        return {**super().state_dict(), "beta": self.beta, "stale": self.stale, "dp_payload": (
                    self._hook_state.payload if getattr(self, "_hook_state", None) is not None else 0),
                "aux": self.store.state_dict() if self.store is not None else None}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.beta, self.stale = state["beta"], state["stale"]
        if getattr(self, "_hook_state", None) is not None:
            self._hook_state.payload = int(state.get("dp_payload", 0))
        if self.store is not None and state.get("aux") is not None:
            self.store.load_state_dict(state["aux"])

    def epoch_state(self):
        return {"j": self._j, "acc": dict(self._epoch_acc)}

    def load_epoch_state(self, state):
        if state:
            self._j = int(state["j"])
            self._epoch_acc = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in state["acc"].items()}


class PenaltyMethod(LayerParallelMethod):
    name = "penalty"
    multipliers = False


class AugmentedLagrangianMethod(LayerParallelMethod):
    name = "al"
    multipliers = True


class ReplicaHookState:
    """State of the replicas' gradient all-reduce hook: the stage's replica group, its size, and
    the gradient bytes handed to the all-reduce so far (for ``comm_bytes``)."""

    def __init__(self, group, size: int):
        self.group, self.size, self.payload = group, size, 0


def replica_allreduce_hook(state: ReplicaHookState, bucket):
    """Average one gradient bucket over the stage's D replicas (DDP's default hook, on the replica
    group, through ``torch.distributed.all_reduce`` so the protocol recorder sees it) and count it."""
    buf = bucket.buffer()
    state.payload += buf.numel() * buf.element_size()
    fut = torch.distributed.all_reduce(buf.div_(state.size), group=state.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
