"""Mixed precision and memory format: one small service every method *has* (``method.amp``).

``run.precision`` (``--precision``) = fp32 | bf16 | fp16 and ``run.channels_last``
(``--channels-last``). fp32 is the default and changes nothing: no autocast, no scaler, every
call below is the identity (the fp32 path is bitwise the path without this module).

* bf16 / fp16: forwards run under ``torch.autocast(device_type, dtype)``; losses, penalties and
  everything sent between ranks are fp32 (or ``coupling.aux_dtype``), cast explicitly
  (:meth:`Precision.wire`). Parameters, gradients and optimizer state stay fp32.
* fp16 only: one ``torch.amp.GradScaler`` per rank (per process). All ranks start from the same
  scale and, by the rule below, update it identically, so every rank holds the same scale.
* Evaluation runs in fp32 for every method (no autocast), so test accuracies compare across
  methods and precisions.
* channels_last: the stage/model is converted once (:meth:`Precision.module`), every input of a
  forward goes through :meth:`Precision.input`.

Call sequence of one training step (every method; ``amp = self.amp``)::

    opt.zero_grad(set_to_none=True)
    with amp.autocast():                       # nullcontext under fp32
        out = stage(amp.input(x))              # x: batch input or the received fp32 activation
    send(amp.wire(out), ...)                   # fp32 (or aux dtype), contiguous, detached
    loss = loss_fn(out.float(), ...)           # losses / penalties in fp32, outside autocast
    guard = None if amp.scaling else self.guard.post(loss)    # fp32/bf16: overlaps backward
    amp.scale(loss).backward()                 # or out.backward(amp.scale(g)) for a received g
    send(amp.unscale_tensor(inp.grad), ...)    # upstream: the true (unscaled) fp32 gradient
    overflow = amp.unscale_(opt)               # fp16: 0-dim device flag, no host sync; else None
    if amp.scaling:
        guard = self.guard.post(loss, overflow=overflow)
    ok = self.guard.wait(guard)                # one all-reduce of 2W flags, one host read
    if ok:
        clip(...)                              # on unscaled gradients
    amp.step(opt, ok)                          # opt.step() only when ok
    amp.update(skipped=not ok)                 # same decision on every rank -> same scale
    if ok: aux / multiplier updates (layer-parallel methods)

Rule: **a step skipped on any rank is skipped on all ranks.** The NaN guard's all-reduce
(:meth:`auxpar.coupling.guard.NanGuard.post`) carries W loss flags and, under fp16, W
overflow flags. An fp16 overflow on any rank makes ``guard.wait`` return False on every rank
without raising (overflow is normal under fp16: the scale was too large); every rank then
skips its optimizer step and its aux/multiplier updates and backs its scale off
(``update(skipped=True)``: GradScaler's found-inf semantics). A non-finite *loss* keeps
``run.on_nan`` (stop raises, skip drops the step, off does not check the loss; an overflow is
still skipped under off). Under fp16 the flags can only be posted after backward and
unscale (the overflow is known only then), so fp16 loses the overlap of the guard's
all-reduce with the backward pass that fp32/bf16 have.

An overflow-skipped step keeps the BN running statistics of its (finite) forward, as
``torch.amp`` does; a step the guard rejects for a non-finite loss restores them.

Ordering rule: :meth:`unscale_tensor` must run *before* :meth:`unscale_` (its non-finite
flag is folded into the overflow flag that ``unscale_`` returns, and ``update`` clears it).

Layer-parallel penalty / AL, parallel step on rank k (the aux update needs the true input
gradient ``g``)::

    with amp.autocast():
        out = stage(amp.input(inp))            # inp = up(z_b), z_b the fp32 aux state (requires grad)
    o = ds_out.down(out.float())               # fp32 boundary output
    isend(amp.wire(o, send_dtype))             # aux dtype on the wire
    loss = penalty(o, t.float()) | CE(out.float(), y)          # fp32
    guard = None if amp.scaling else self.guard.post(loss)
    opt.zero_grad(set_to_none=True)
    amp.scale(loss).backward()
    g = amp.unscale_tensor(z_b.grad) * b       # true per-sample gradient, BEFORE unscale_(opt)
    overflow = amp.unscale_(opt)
    if amp.scaling:
        guard = self.guard.post(loss, overflow=overflow)
    ok = self.guard.wait(guard)
    if ok:
        clip_and_step()
    amp.update(skipped=not ok)
    if ok (k > 0): aux / multiplier update with g

Layer-serial executor (SPH serial phase) on rank k::

    inp = batch.x if k == 0 else recv(fp32).requires_grad_(True)
    with amp.autocast():
        out = stage(amp.input(inp)).float()
    if k < K - 1:
        send(amp.wire(out)); grad = recv(fp32)
        opt.zero_grad(set_to_none=True); out.backward(amp.scale(grad))
    else:
        loss = CE(out, y); opt.zero_grad(set_to_none=True); amp.scale(loss).backward()
    if k > 0:
        send(amp.unscale_tensor(inp.grad))     # true fp32 gradient upstream
    overflow = amp.unscale_(opt)
    ok = self.guard.wait(self.guard.post(check, overflow=overflow))
    if ok:
        clip_and_step()
    amp.update(skipped=not ok)

Gradients between stages: a stage receiving an upstream gradient ``g`` (true, fp32) runs
``out.backward(amp.scale(g))``; a stage sending its input gradient sends
``amp.unscale_tensor(inp.grad)``. What travels between ranks is therefore always the true
fp32 gradient, independent of the scale. (The pipelining executor, whose schedule moves the
gradients itself, gets the same effect from :meth:`grad_scaled` / :meth:`grad_unscaled`
identity layers around its stage.) A non-finite unscaled gradient counts as an overflow of
the rank that produced it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from auxpar.errors import ConfigError

log = logging.getLogger(__name__)
_warned: set = set()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why this torch cannot autocast ``device_type`` to ``dtype`` (None when it can): probed by
    running one small matmul under autocast (torch disables an unsupported autocast with only
    a warning, which would silently train in fp32)."""
    if dtype == torch.float32:
        return None
    if not torch.amp.is_autocast_available(device_type):
        return f"torch {torch.__version__} has no autocast for device type {device_type!r}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = torch.ones(2, 2, device=device_type)
            with torch.autocast(device_type, dtype=dtype):
                got = (a @ a).dtype
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot run
        return f"torch.autocast({device_type!r}, {dtype}) failed: {exc}"
    if got != dtype:
        msg = "; ".join(str(w.message) for w in caught) or f"a matmul came out {got}"
        return f"torch {torch.__version__} does not autocast {device_type} to {dtype} ({msg})"
    return None


class _GradMul(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``factor`` (a 0-dim tensor)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (factor,) = ctx.saved_tensors
        return g * factor.to(g.dtype), None


class Precision:
    """The precision / memory-format service of one rank; see the module docstring for the
    step's call sequence. ``Precision(cfg, device)``; every method has one as ``self.amp``."""

    def __init__(self, cfg, device: torch.device):
        self.name = cfg.run.precision
        self.dtype = DTYPES[self.name]
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.channels_last = bool(cfg.run.channels_last)
        self.enabled = self.dtype != torch.float32
        if self.enabled:
            problem = autocast_problem(self.device_type, self.dtype)
            if problem:
                other = "bf16" if self.name == "fp16" else "fp32"
                raise ConfigError(f"--precision {self.name} cannot run here: {problem}; use --precision {other}"
                                  + (" or train on a CUDA device" if self.device_type == "cpu" else ""))
        if self.name == "fp16" and self.device_type == "cpu" and "fp16-cpu" not in _warned:
            _warned.add("fp16-cpu")
            # Measured (torch 2.13, digits ResNet-20, 6 epochs): 57 s of training vs 1.6 s in fp32
            # or bf16; correct, but CPUs have few fp16 kernels. Meant for testing the fp16 path.
            log.warning("auxpar: --precision fp16 on CPU runs, but far slower than fp32 or bf16 "
                        "(few fp16 CPU kernels); use --precision bf16 on CPU")
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None
        self._bad: torch.Tensor | None = None  # non-finite unscaled stage gradients of this step
        self.overflow_steps = 0
        """Steps skipped because of an fp16 overflow on some rank (counted by the guard)."""

    # ---- forward ---------------------------------------------------------------------------
    @property
    def scaling(self) -> bool:
        """True under fp16 (loss scaling; the guard is posted after backward + unscale)."""
        return self.scaler is not None

    def autocast(self):
        """Context manager for forwards: ``torch.autocast`` under bf16/fp16, a nullcontext under fp32."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        """Convert a model / stage to channels_last when enabled (in place; returns it)."""
        if self.channels_last:
            m.to(memory_format=torch.channels_last)
        return m

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A forward's input in channels_last when enabled (identity otherwise)."""
        if not self.channels_last:
            return x
        if x.dim() != 4:
            raise ConfigError(f"--channels-last needs 4-D (N, C, H, W) inputs, but a stage got shape "
                              f"{tuple(x.shape)}; drop --channels-last (run.channels_last = false)")
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def wire(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What is sent between ranks: detached, ``dtype`` (fp32 or the aux dtype), contiguous
        NCHW, whatever autocast / channels_last produced."""
        return t.detach().to(dtype).contiguous()

    # ---- fp16 loss scaling -----------------------------------------------------------------
    def _scale_tensor(self) -> torch.Tensor:
        s = self.scaler
        if s._scale is None:  # GradScaler creates its scale lazily
            s._lazy_init_scale_growth_tracker(self.device)
        return s._scale

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` times the loss scale (a loss, or a received upstream gradient); identity without fp16."""
        if self.scaler is None:
            return t
        return t * self._scale_tensor().to(t.dtype)

    def unscale_tensor(self, t: torch.Tensor | None, check: bool = True) -> torch.Tensor | None:
        """A scaled gradient (e.g. ``inp.grad``) divided by the scale, in fp32: what is sent upstream.
        With ``check``, a non-finite result counts as this rank's overflow of the step (call it
        before :meth:`unscale_`, which folds the flag in)."""
        if self.scaler is None or t is None:
            return t
        out = t.float() * self._scale_tensor().double().reciprocal().float()
        if check:
            bad = (~torch.isfinite(out)).any()
            self._bad = bad if self._bad is None else (self._bad | bad)
        return out

    def grad_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Identity whose backward multiplies the gradient by the scale (put after a stage's output)."""
        if self.scaler is None or not x.requires_grad:
            return x
        return _GradMul.apply(x, self._scale_tensor())

    def grad_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """Identity whose backward divides the gradient by the scale (put before a stage's input)."""
        if self.scaler is None or not x.requires_grad:
            return x
        return _GradMul.apply(x, self._scale_tensor().double().reciprocal().float())

    def unscale_(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Unscale the optimizer's gradients in place; returns this rank's overflow flag (0-dim
        float device tensor, 1 = non-finite gradients; no host sync), None without fp16."""
        if self.scaler is None:
            return None
        self._scale_tensor()
        self.scaler.unscale_(optimizer)
        found = list(self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
        flag = torch.zeros((), dtype=torch.float32, device=self.device)
        for f in found:
            flag = flag + f.to(self.device).float()
        if self._bad is not None:
            flag = flag + self._bad.float()
            self._bad = None
        return (flag > 0).float()

    def step(self, optimizer: torch.optim.Optimizer, ok: bool) -> None:
        """The optimizer step, taken only when ``ok`` (the guard's verdict, the same on every rank)."""
        if ok:
            optimizer.step()

    def update(self, skipped: bool) -> None:
        """Update the scale with GradScaler's found-inf semantics from the *global* verdict:
        skipped -> scale x backoff (0.5); else count towards growth (x2 after 2000 good steps)."""
        self._bad = None
        if self.scaler is None:
            return
        s = self.scaler
        scale = self._scale_tensor()
        found = torch.full((), 1.0 if skipped else 0.0, dtype=torch.float32, device=scale.device)
        torch._amp_update_scale_(scale, s._growth_tracker, found, s.get_growth_factor(),
                                 s.get_backoff_factor(), s.get_growth_interval())
        s._per_optimizer_states.clear()  # the next step's unscale_ starts fresh

    def get_scale(self) -> float:
        """The current loss scale (host read; 1.0 without fp16). For logs and tests, not the step."""
        return float(self._scale_tensor().item()) if self.scaler is not None else 1.0

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Scaler state (scale, growth tracker, factors) and the overflow count; {} under fp32/bf16."""
        if self.scaler is None:
            return {}
        self._scale_tensor()
        return {"scaler": self.scaler.state_dict(), "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is None or not state:
            return
        self.scaler.load_state_dict(state["scaler"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
