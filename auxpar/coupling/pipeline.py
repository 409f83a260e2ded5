"""The pipeline baseline, ``--method pipeline``, and the pipeline executor of the SPH serial phase.

The same K stages as penalty/AL (``net.partition(K, split)`` of a net built once from the run's
seed, then sliced, so the parameters do not depend on K) run one batch as M micro-batches
through ``torch.distributed.pipelining`` (``PipelineStage`` with ``ScheduleGPipe`` or
``Schedule1F1B``)::

    batch B -> M micro-batches of B/M  ->  stage 0 -> stage 1 -> ... -> stage K-1 (CE loss)
    gradients flow back micro-batch by micro-batch; every stage sums them, divides by M,
    then all ranks take one optimizer step (after the cross-rank NaN guard).

This is ordinary backprop: with equal micro-batches, the mean of the M micro-batch mean losses is
the batch mean loss, so the update equals serial backprop on the same batch (tested at 1e-5 on
a model without batch norm). Differences, all deliberate:

* BatchNorm normalizes each micro-batch with its own statistics and updates its running
  statistics once per micro-batch (M momentum updates per step). This is GPipe's semantics;
  with M = 1 the update is serial backprop's exactly (up to float rounding).
* Gradient clipping (``optim.grad_clip``) uses the global norm over all stages (one
  all-reduce), as ``clip_grad_norm_`` of the whole network would (auxpar/coupling/optim.py).
* Evaluation is a layer-serial forward over the ranks (no micro-batching, running BN
  statistics), the same as penalty/AL's: test batches may have any size.

Configurations torch.distributed.pipelining cannot run raise before the first step:
batch size not divisible by ``--microbatches`` (its static micro-batch shapes, and the
mean-of-means equality, need equal micro-batches), 1F1B with fewer micro-batches than stages
(``Schedule1F1B`` refuses it), world size != K, and a torch without the module.

Precision (``--precision``, ``--channels-last``; auxpar/precision.py): the schedule runs each
stage inside a thin wrapper that converts its input to channels_last, runs the forward under
autocast and hands the schedule fp32 outputs (what is sent, and the logits the fp32 loss sees).
Under fp16 the wrapper multiplies the gradient entering the stage's output by the rank's loss
scale and divides the gradient leaving its input by it, so the schedule sends true fp32
gradients and each rank scales its own backward; overflow flags ride on the NaN guard.

Accounting: ``comm_bytes`` counts every activation and gradient tensor this rank hands to a
send of the schedule (measured from the send ops, not derived from shapes; after each step the
schedule's count is added to the P2P primitive's training-traffic counter, which evaluation and
the model.pt gather use). Time per rank:
``compute`` = forward and backward of each micro-batch plus the optimizer step (timed around
the stage's own calls); ``wait`` = the rest of the step, i.e. posting sends and receives,
blocking on them and the pipeline bubble. torch.distributed.pipelining posts and waits inside
its schedule, so posting (``comm``) cannot be told apart from waiting there: ``time_comm_s``
is 0 and ``time_wait_s`` holds both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from auxpar.coupling.base import StepOut
from auxpar.coupling.comm import P2P, needs_staging
from auxpar.coupling.stages import StagedMethod
from auxpar.distributed import all_reduce_
from auxpar.errors import ConfigError, DistributedError
from auxpar.mesh import Mesh
from auxpar.timing import Clock


# ---------------------------------------------------------------------------- checks

def pipeline_problems(batch_size: int, microbatches: int, schedule: str, K: int, flag: str,
                      schedule_flag: str = "--pipeline-schedule") -> str | None:
    """Why torch.distributed.pipelining cannot run this configuration (None when it can)."""
    M = microbatches
    if batch_size % M:
        lo = max(M, batch_size - batch_size % M)
        divisors = [m for m in range(1, min(batch_size, 64) + 1) if batch_size % m == 0]
        return (f"{flag}: --batch-size {batch_size} does not split into --microbatches {M} equal "
                f"micro-batches; the pipeline needs equal micro-batches (static shapes, and the mean of "
                f"the micro-batch losses equals the batch loss only then). Use --microbatches in "
                f"{divisors[:8]} or --batch-size {lo}")
    if schedule == "1f1b" and M < K:
        return (f"{flag}: the 1F1B schedule needs at least as many micro-batches as stages "
                f"(torch.distributed.pipelining.Schedule1F1B), but --microbatches {M} < --stages {K}; "
                f"use --microbatches {K} or more, or {schedule_flag} gpipe")
    return None


@functools.lru_cache(maxsize=1)
def check_transport(backend: str, device: torch.device, flag: str) -> None:
    """torch.distributed.pipelining sends the stage's device tensors itself, past auxpar's
    host staging (auxpar/coupling/comm.py), and gloo moves CPU tensors only."""
    if needs_staging(backend, device):
        raise DistributedError(
            f"{flag} cannot run on {device} over gloo: torch.distributed.pipelining sends device tensors "
            "directly and gloo moves CPU tensors only; use --backend nccl (one GPU per rank), or for "
            "several ranks on one GPU --serial-executor layer / --method penalty")


def _pipelining():
    """(PipelineStage, {schedule name: class}); a clear error when this torch lacks the module."""
    try:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    except ImportError as exc:  # pragma: no cover - torch >= 2.4 has it
        raise DistributedError(
            f"the pipeline needs torch.distributed.pipelining, which torch {torch.__version__} does not "
            f"provide ({exc}); install torch >= 2.4, or use --serial-executor layer / --method penalty"
        ) from None

    class CountingStage(PipelineStage):
        """A PipelineStage that counts the bytes it sends and times its own compute (bucket
        ``chunk`` of the runner's :class:`~auxpar.timing.Clock`: CUDA events on a GPU)."""

        bytes_sent = 0
        clock = None

        def get_fwd_send_ops(self, fwd_chunk_id):
            ops = super().get_fwd_send_ops(fwd_chunk_id)
            self.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

        def get_bwd_send_ops(self, bwd_chunk_id):
            ops = super().get_bwd_send_ops(bwd_chunk_id)
            self.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

        def forward_one_chunk(self, *args, **kwargs):
            with self.clock.section("chunk"):
                return super().forward_one_chunk(*args, **kwargs)

        def backward_one_chunk(self, *args, **kwargs):
            with self.clock.section("chunk"):
                return super().backward_one_chunk(*args, **kwargs)

    return CountingStage, {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def _mean_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


class _AmpStage(torch.nn.Module):
    """The stage as the pipelining schedule runs it under bf16/fp16 or channels_last: input in
    channels_last, forward under autocast, output fp32 contiguous (what the schedule sends and
    what the loss sees). Under fp16 the gradient entering the stage's output is multiplied by
    the loss scale and the gradient leaving its input divided by it, so the schedule moves true
    fp32 gradients between ranks and the last stage's loss stays unscaled (auxpar/precision.py)."""

    def __init__(self, stage: torch.nn.Module, amp):
        super().__init__()
        self.stage, self.amp = stage, amp

    def forward(self, x):
        amp = self.amp
        x = amp.input(amp.grad_unscaled(x))
        with amp.autocast():
            out = self.stage(x)
        return amp.grad_scaled(out.float().contiguous())


class PipelineRunner:
    """One stage of a K-stage micro-batched pipeline: ``step(x, y)`` runs forward and backward of
    one batch on every rank (gradients accumulate in the stage's parameters, averaged over the M
    micro-batches); the optimizer step is the caller's.

    One PipelineStage + schedule per micro-batch size, built on first use with static shapes
    (no metadata-inference forward, which would touch BN statistics). Every rank sees the same
    batch sizes, so every rank builds the same ones.
    """

    def __init__(self, stage, k: int, K: int, device: torch.device, microbatches: int, schedule: str,
                 amp=None, clock: Clock | None = None, group=None, module=None):
        self.stage, self.k, self.K, self.device = stage, k, K, device
        self.group = group  # the K ranks of this pipeline (a replica's layer group under --dp; None = world)
        self.clock = clock if clock is not None else Clock(device)  # chunk compute goes to "chunk"
        # fp32 without channels_last runs the stage itself (the unchanged default path);
        # ``module``: what to run instead (the stage in DDP under --dp: the schedule then
        # all-reduces the gradients over the replicas once, during the last micro-batch's backward)
        if module is not None:
            self.module = module
        else:
            self.module = (_AmpStage(stage, amp) if amp is not None and (amp.enabled or amp.channels_last)
                           else stage)
        self.M, self.schedule_name = microbatches, schedule
        self._built: dict[int, tuple] = {}

    def _get(self, b: int):
        if b not in self._built:
            problem = pipeline_problems(b, self.M, self.schedule_name, self.K, "pipeline")
            if problem:
                raise ConfigError(problem)
            stage_cls, schedules = _pipelining()
            mb = b // self.M
            inp = torch.empty((mb, *self.stage.in_shape), device="meta").requires_grad_(self.k > 0)
            out = torch.empty((mb, *self.stage.out_shape), device="meta").requires_grad_(True)
            pstage = stage_cls(self.module, self.k, self.K, self.device, input_args=inp, output_args=out,
                               group=self.group)
            pstage.clock = self.clock
            sched = schedules[self.schedule_name](pstage, n_microbatches=self.M, loss_fn=_mean_ce,
                                                  scale_grads=True)
            self._built[b] = (pstage, sched)
        return self._built[b]

    @property
    def bytes_sent(self) -> int:
        """Bytes the schedule's send ops handed over so far in this process."""
        return sum(p.bytes_sent for p, _ in self._built.values())

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward + backward of one batch; returns (mean loss, logits) on the last rank, else (None, None)."""
        pstage, sched = self._get(y.numel())
        if self.k == self.K - 1:
            losses: list = []
            logits = sched.step(target=y, losses=losses)
            return torch.stack([v.detach() for v in losses]).mean(), logits
        if self.k == 0:
            sched.step(x)
        else:
            sched.step()
        return None, None


# ---------------------------------------------------------------------------- the baseline

class PipelineMethod(StagedMethod):
    name = "pipeline"

    def __init__(self, cfg, info, net):
        super().__init__(cfg, info, net)
        self.K, self.k = cfg.dist.stages, info.rank
        self.mesh = Mesh(info, self.K, 1)  # one replica: no groups, rank = k
        self.device = info.device
        # Build-then-slice: the whole net came from one seed; keep this rank's stage only.
        stages = net.partition(self.K, cfg.dist.split or None)
        self.ranges = [s.block_range for s in stages]
        self.keep_stage(stages)
        self.p2p = P2P(info.rank, self.device, info.backend)  # evaluation and the model gather
        # Time split (CUDA events on a GPU): "chunk" = the schedule's forward/backward compute,
        # "optim" = clipping and the optimizer step, "step" = the whole step; wait = step - both.
        self.clock = Clock(self.device)
        self.runner = PipelineRunner(self.stage, self.k, self.K, self.device, cfg.dist.microbatches,
                                     cfg.dist.pipeline_schedule, self.amp, self.clock)

    @classmethod
    def check_layout(cls, cfg, info):
        K = cfg.dist.stages
        if K < 2:
            raise DistributedError(
                f"--method pipeline runs K >= 2 stages, one process each, but --stages {K} was given; "
                "use --stages 2 or more, or --method serial"
            )
        if cfg.dist.dp != 1:
            raise DistributedError(
                f"--method pipeline has no data-parallel replicas (--dp {cfg.dist.dp}); use --dp 1")
        if info.world_size != K:
            raise DistributedError(
                f"--stages {K} needs exactly {K} processes (one per stage), but {info.world_size} were started; "
                f"use --nproc {K} or torchrun --nproc_per_node={K}"
            )
        problem = pipeline_problems(cfg.data.batch_size, cfg.dist.microbatches, cfg.dist.pipeline_schedule,
                                    K, "--method pipeline")
        if problem:
            raise ConfigError(problem)
        check_transport(info.backend, info.device, "--method pipeline")
        _pipelining()

    def stage_name(self, rank: int) -> str:
        a, b = self.ranges[rank]
        return f"stage {rank} of {self.K} (blocks {a}-{b - 1})"

    # ---- training --------------------------------------------------------------------------
    def train_step(self, batch, phase, next_idx=None):
        with self.clock.section("step"):
            return self._step(batch)

    def _step(self, batch):
        b = batch.y.numel()
        self.stage.train()
        self.opt.zero_grad(set_to_none=True)
        bytes0 = self.runner.bytes_sent
        loss, logits = self.runner.step(batch.x, batch.y)
        self.p2p.bytes_sent += self.runner.bytes_sent - bytes0  # the schedule's sends: training traffic
        last = self.k == self.K - 1
        if not last:
            loss = torch.zeros((), device=self.device)
        overflow = self.amp.unscale_(self.opt)  # fp16: this rank's overflow flag (else None)
        ok = self.guard.wait(self.guard.post(loss, overflow=overflow))  # every rank, before any update
        if ok:
            with self.clock.section("optim"):
                self.clip_and_step()
        self.amp.update(skipped=not ok)
        if not ok:  # --on-nan skip: the step is dropped and counts no samples
            return StepOut(torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long,
                                                                             device=self.device), 0)
        correct = ((logits.detach().argmax(1) == batch.y).sum() if last
                   else torch.zeros((), dtype=torch.long, device=self.device))
        return StepOut(loss, correct, b)

    # ---- accounting ------------------------------------------------------------------------
    def _times(self) -> list[list[float]]:
        K, k = self.K, self.k
        t = torch.zeros(4, K, dtype=torch.float64, device=self.device)
        c = self.clock.totals()
        compute, step = c.get("chunk", 0.0) + c.get("optim", 0.0), c.get("step", 0.0)
        t[0, k], t[1, k] = compute, 0.0
        t[2, k], t[3, k] = max(step - compute, 0.0), step
        all_reduce_(self.info, t)
        return t.tolist()

    def epoch_metrics(self) -> dict:
        rows = self._times()
        return {"time_compute_s": rows[0], "time_comm_s": rows[1], "time_wait_s": rows[2]}

    def summary_extras(self) -> dict:
        rows = self._times()
        M, K = self.cfg.dist.microbatches, self.K
        return {
            "microbatches": M, "pipeline_schedule": self.cfg.dist.pipeline_schedule,
            "bubble_fraction": (K - 1) / (M + K - 1), "eval_comm_bytes": self.eval_bytes_total(),
            "time_compute_s": rows[0], "time_comm_s": rows[1], "time_wait_s": rows[2], "time_step_s": rows[3],
            "time_split_note": "time_wait_s holds posting, waiting and the bubble: torch.distributed."
                               "pipelining posts and waits inside its schedule, so time_comm_s is not measured",
        }


# ---------------------------------------------------------------------------- SPH serial phase

class PipelineSerialExecutor:
    """The SPH serial phase of penalty/AL as a micro-batched pipeline (``--serial-executor pipeline``).

    Same interface and same update as :class:`~auxpar.coupling.layer_parallel.LayerSerialExecutor`
    (backprop of the whole network over the K ranks on the same batch): equal up to float
    rounding on a model without BN; with BN, each micro-batch is normalized with its own
    statistics and running statistics move once per micro-batch (GPipe semantics), so with
    M > 1 the update differs as micro-batch BN differs from batch BN. The optimizer step is the
    method's (``clip_and_step``: the global clip, as the layer executor does). Its bytes go
    into the method's training traffic, its time into the method's compute and wait.
    """

    name = "pipeline"

    def __init__(self, method):
        self.m = method
        cfg = method.cfg
        # (under --dp each replica pipelines its B / dp samples)
        problem = pipeline_problems(cfg.data.batch_size // method.dp, cfg.dist.microbatches,
                                    cfg.dist.pipeline_schedule, method.K, "--serial-executor pipeline")
        if problem:  # (a dataset recipe may have chosen this executor: name the way out of it too)
            raise ConfigError(f"{problem}; or --serial-executor layer (no micro-batches)")
        check_transport(method.info.backend, method.device, "--serial-executor pipeline")
        _pipelining()
        # chunk compute goes to the method's clock as "chunk", the schedule's whole run as "pipe"
        # (the method's epoch metrics count chunk as compute and pipe - chunk as waiting)
        self.runner = PipelineRunner(method.stage, method.k, method.K, method.device, cfg.dist.microbatches,
                                     cfg.dist.pipeline_schedule, method.amp, method.clock,
                                     group=method.mesh.layer_group,
                                     module=method.model if method.model is not method.stage else None)

    def train_step(self, batch) -> StepOut:
        m, k, K = self.m, self.m.k, self.m.K
        b = batch.y.numel()
        m.stage.train()
        m.opt.zero_grad(set_to_none=True)
        bytes0 = self.runner.bytes_sent
        with m.clock.section("pipe"):
            loss, logits = self.runner.step(batch.x, batch.y)
        m.p2p.bytes_sent += self.runner.bytes_sent - bytes0
        if k < K - 1:
            loss = torch.zeros((), device=m.device)
        overflow = m.amp.unscale_(m.opt)  # fp16: this rank's overflow flag (else None)
        ok = m.guard.wait(m.guard.post(loss, overflow=overflow))
        m.amp.update(skipped=not ok)
        if not ok:
            return StepOut(torch.zeros((), device=m.device), torch.zeros((), dtype=torch.long, device=m.device), 0)
        with m.clock.section("compute"):
            m.clip_and_step()
        correct = ((logits.detach().argmax(1) == batch.y).sum() if k == K - 1
                   else torch.zeros((), dtype=torch.long, device=m.device))
        return StepOut(loss, correct, b)
