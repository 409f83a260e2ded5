"""Mixed precision (--precision fp32|bf16|fp16) and --channels-last: the Precision service, the
guard's skip-on-every-rank rule for fp16 overflows, config errors, and every method's wiring.

fp32 (the default) must stay bitwise what it was: the serial step is compared with a plain
forward / cross-entropy / backward / SGD step written out here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import auxpar.precision as precision_mod
from auxpar.config import build_config
from auxpar.coupling import get_method
from auxpar.coupling.base import Method
from auxpar.data.loader import Batch
from auxpar.distributed import DistInfo
from auxpar.errors import ConfigError, TrainingError
from auxpar.models import build_model
from auxpar.precision import Precision
from conftest import read_summary, run_cli
from mp_harness import run_ranks

B = 16


def _cfg(method="serial", norm="bn", **run):
    over = {"run": {"method": method, **run}, "model": {"name": "resnet20", "norm": norm},
            "data": {"dataset": "synthetic", "batch_size": B, "synthetic_num_train": 3 * B,
                     "synthetic_shape": [1, 8, 8]},
            "optim": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}}
    return build_config(over)


def _net(norm="bn"):
    torch.manual_seed(0)
    return build_model("resnet20", in_channels=1, input_size=8, num_classes=10, norm=norm)


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.arange(B), torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g))
            for _ in range(n)]


def _serial(lr=0.1, **run):
    norm = run.pop("norm", "bn")
    m = get_method("serial")(_cfg(norm=norm, **run), DistInfo(), _net(norm))
    m.set_lr(lr)
    return m


# ---------------------------------------------------------------------------- the service

def test_fp32_service_is_the_identity():
    amp = Precision(_cfg(), torch.device("cpu"))
    assert not amp.enabled and not amp.scaling and amp.scaler is None
    x = torch.randn(2, 3)
    with amp.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x.T).dtype == torch.float32
    assert amp.scale(x) is x and amp.unscale_tensor(x) is x and amp.input(x) is x
    assert amp.unscale_(torch.optim.SGD([torch.nn.Parameter(x)], lr=0.1)) is None
    assert amp.state_dict() == {} and amp.get_scale() == 1.0


def test_bf16_autocast_and_wire_dtype():
    amp = Precision(_cfg(precision="bf16"), torch.device("cpu"))
    assert amp.enabled and not amp.scaling  # bf16 needs no scaler
    x = torch.randn(4, 4)
    with amp.autocast():
        y = x @ x
    assert y.dtype == torch.bfloat16
    assert amp.wire(y).dtype == torch.float32 and amp.wire(y, torch.bfloat16).dtype == torch.bfloat16


def test_fp16_scale_unscale_and_state_round_trip():
    amp = Precision(_cfg(precision="fp16"), torch.device("cpu"))
    assert amp.scaling and amp.get_scale() == 65536.0
    loss = torch.tensor(2.0)
    assert amp.scale(loss).item() == 2.0 * 65536
    # Stage-to-stage gradients: a received true gradient g is scaled into the backward; the input
    # gradient sent upstream is unscaled back to the true fp32 gradient.
    lin = torch.nn.Linear(5, 3)
    inp = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 3) * 1e-3  # small enough that g x 65536 fits fp16 (else: an overflow)
    with amp.autocast():
        out = lin(inp)
    out.float().backward(amp.scale(g))
    sent = amp.unscale_tensor(inp.grad)
    assert sent.dtype == torch.float32
    torch.testing.assert_close(sent, g @ lin.weight.detach(), rtol=2e-3, atol=2e-6)
    # update(skipped) follows the found-inf semantics: back off x0.5; a good step counts to growth.
    amp.update(skipped=True)
    assert amp.get_scale() == 32768.0
    amp.update(skipped=False)
    state = copy.deepcopy(amp.state_dict())
    amp2 = Precision(_cfg(precision="fp16"), torch.device("cpu"))
    amp2.load_state_dict(state)
    assert amp2.get_scale() == 32768.0 and amp2.state_dict() == state
    assert state["scaler"]["_growth_tracker"] == 1


def test_grad_scaled_and_unscaled_layers():
    amp = Precision(_cfg(precision="fp16"), torch.device("cpu"))
    x = torch.randn(3, requires_grad=True)
    amp.grad_unscaled(amp.grad_scaled(x) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    y = torch.randn(3, requires_grad=True)
    amp.grad_scaled(y).sum().backward()
    assert y.grad[0].item() == 65536.0


class _OneRank(Method):
    """A fake 1-rank method: only what the guard needs."""

    def stage_name(self, rank):
        return f"stage {rank}"


def test_overflow_skips_the_step_without_error_and_backs_off():
    cfg = _cfg(precision="fp16")
    m = _OneRank(cfg, DistInfo(), torch.nn.Linear(2, 2))
    amp = m.amp
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = amp.scale(torch.tensor([1.0, float("inf"), 1.0]))
    overflow = amp.unscale_(opt)
    assert overflow.dim() == 0 and overflow.item() == 1.0
    handle = m.guard.post(torch.tensor(0.3), overflow=overflow)
    assert handle[0].numel() == 2  # 2W flags: W loss flags, then W overflow flags
    ok = m.guard.wait(handle)  # no TrainingError: an fp16 overflow is not a NaN loss
    assert ok is False and m.amp.overflow_steps == 1 and m.skipped_steps == 0
    amp.step(opt, ok)
    amp.update(skipped=not ok)
    assert torch.equal(p.detach(), torch.ones(3)) and amp.get_scale() == 32768.0
    # A finite step goes through; the unscaled gradient is the true one.
    p.grad = amp.scale(torch.tensor([1.0, 2.0, 3.0]))
    overflow = amp.unscale_(opt)
    assert overflow.item() == 0.0 and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    ok = m.guard.wait(m.guard.post(torch.tensor(0.3), overflow=overflow))
    amp.step(opt, ok)
    amp.update(skipped=not ok)
    assert ok and torch.allclose(p.detach(), torch.tensor([0.9, 0.8, 0.7]))
    # A non-finite unscaled stage gradient (sent upstream) counts as this rank's overflow too
    # (unless check=False); it must be unscaled before unscale_(opt), which folds the flag in.
    amp.unscale_tensor(amp.scale(torch.tensor([float("nan")])), check=False)
    p.grad = torch.ones(3)
    assert amp.unscale_(opt).item() == 0.0
    amp.update(skipped=False)
    amp.unscale_tensor(amp.scale(torch.tensor([float("nan")])))
    p.grad = torch.ones(3)
    assert amp.unscale_(opt).item() == 1.0
    amp.update(skipped=True)
    # A non-finite *loss* keeps run.on_nan: stop raises, even with an overflow flag alongside.
    with pytest.raises(TrainingError, match="non-finite loss"):
        m.guard.wait(m.guard.post(torch.tensor(float("nan")), overflow=torch.tensor(1.0)))
    # Under --on-nan off the loss is not checked, but an overflow still skips every rank.
    m.cfg.run.on_nan = "off"
    assert m.guard.post(torch.tensor(float("nan"))) is None
    assert m.guard.wait(m.guard.post(torch.tensor(float("nan")), overflow=torch.tensor(0.0)))
    assert not m.guard.wait(m.guard.post(torch.tensor(1.0), overflow=torch.tensor(1.0)))


def _guard_ranks(rank, world):
    """2 gloo ranks: rank 1 overflows; both must skip, back off and not raise."""
    cfg = _cfg(precision="fp16")
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    m = _OneRank(cfg, info, torch.nn.Linear(2, 2))
    ov = torch.tensor(1.0 if rank == 1 else 0.0)
    ok = m.guard.wait(m.guard.post(torch.tensor(0.5), overflow=ov))
    m.amp.update(skipped=not ok)
    return {"ok": ok, "scale": m.amp.get_scale()}


@pytest.mark.slow
def test_overflow_on_one_rank_skips_on_every_rank():
    res = run_ranks(_guard_ranks, 2)
    assert [r["ok"] for r in res] == [False, False]
    assert [r["scale"] for r in res] == [32768.0, 32768.0]


# ---------------------------------------------------------------------------- config errors

def test_config_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"run.precision = 'fp8' is not valid; choose one of fp32, bf16, fp16"):
        _cfg(precision="fp8")
    with pytest.raises(ConfigError, match=r"--precision fp16 does not run with --method mgrit.*--precision bf16"):
        build_config({"run": {"method": "mgrit", "precision": "fp16"}})
    build_config({"run": {"method": "mgrit", "precision": "bf16"}})  # fine
    amp = Precision(_cfg(channels_last=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"--channels-last needs 4-D.*drop --channels-last"):
        amp.input(torch.randn(3, 5))
    # A torch that cannot autocast the device to the dtype: a clear error, never silent fp32.
    monkeypatch.setattr(precision_mod, "autocast_problem", lambda d, t: "no fp16 kernels here")
    with pytest.raises(ConfigError, match=r"--precision fp16 cannot run here: no fp16 kernels here; "
                                          r"use --precision bf16"):
        Precision(_cfg(precision="fp16"), torch.device("cpu"))


def test_torch_autocasts_cpu_to_bf16_and_fp16():
    """torch 2.13 CPU autocast supports both (fp16 runs, slowly: see --precision help)."""
    assert precision_mod.autocast_problem("cpu", torch.bfloat16) is None
    assert precision_mod.autocast_problem("cpu", torch.float16) is None
    assert precision_mod.autocast_problem("cpu", torch.float32) is None


def test_cli_flags_reach_the_config(tmp_path):
    r = run_cli("train", "--precision", "bf16", "--channels-last", "--print-config")
    assert r.returncode == 0, r.stderr
    assert 'precision = "bf16"' in r.stdout and "channels_last = true" in r.stdout
    r = run_cli("train", "--method", "mgrit", "--stages", "2", "--precision", "fp16", "--print-config")
    assert r.returncode != 0 and "does not run with --method mgrit" in r.stderr


# ---------------------------------------------------------------------------- serial / ddp

def test_fp32_default_is_bitwise_the_plain_step():
    m = _serial()
    assert m.cfg.run.precision == "fp32" and not m.cfg.run.channels_last
    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for b in _batches():
        out = m.train_step(b, "serial")
        ref.train()
        loss = F.cross_entropy(ref(b.x), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.equal(out.loss, loss.detach())
    sa, sb = m.net.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "amp" in m.state_dict()


def test_channels_last_and_bf16_steps_track_fp32():
    ref, cl, bf = _serial(0.02), _serial(0.02, channels_last=True), _serial(0.02, precision="bf16")
    convs = [p for p in cl.net.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in ref.net.parameters() if p.dim() == 4)
    for b in _batches():
        lr_, lc, lb = (m.train_step(b, "serial").loss.item() for m in (ref, cl, bf))
        assert lc == pytest.approx(lr_, rel=1e-4, abs=1e-5)
        assert lb == pytest.approx(lr_, rel=5e-2)
    for (k, a), c in zip(ref.net.state_dict().items(), cl.net.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-4, msg=k)


def test_fp16_serial_steps_and_resumes_exactly():
    m = _serial(precision="fp16")
    batches = _batches(4)
    for b in batches[:2]:
        assert torch.isfinite(m.train_step(b, "serial").loss)
    assert m.amp.overflow_steps + m.skipped_steps <= 2
    state = copy.deepcopy(m.state_dict())
    assert state["amp"]["scaler"]["scale"] == m.amp.get_scale()
    m2 = _serial(precision="fp16")
    m2.load_state_dict(state)
    for b in batches[2:]:
        m.train_step(b, "serial")
        m2.train_step(b, "serial")
    assert m2.amp.get_scale() == m.amp.get_scale()
    sa, sb = m.net.state_dict(), m2.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_bf16_serial_digits_reaches_fp32_accuracy(tmp_path):
    accs = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / p
        r = run_cli("train", "--config", "experiments/configs/serial-resnet20-digits.toml", "--epochs", "6",
                    "--precision", p, "--out", str(out), "--threads", "1", "--progress", "off", timeout=200)
        assert r.returncode == 0, r.stderr + r.stdout
        accs[p] = read_summary(out)["final_test_acc"]
    assert accs["bf16"] >= 0.95 and accs["bf16"] >= accs["fp32"] - 0.02, accs


# ---------------------------------------------------------------------------- pipeline / mgrit

def _staged_vs_serial(rank, world, method, prec, **dist):
    """Two serial-phase steps of a staged method (norm none) against serial backprop under the
    same precision: how far this rank's parameters moved, and how far they are from serial's."""
    cfg = _cfg(method, norm="none", precision=prec)
    cfg.dist.stages = world
    for key, value in dist.items():
        setattr(cfg.dist, key, value)
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    m = get_method(method)(cfg, info, _net("none"))
    m.set_lr(0.1)
    ref = _serial(precision=prec, norm="none")
    start = m.block_range[0]
    before = {k: v.detach().clone() for k, v in m.stage.named_parameters()}
    for b in _batches(2):
        m.train_step(b, "serial")
        ref.train_step(b, "serial")
    refp = dict(ref.net.named_parameters())
    out = {"moved": 0.0, "diff": 0.0}
    for name, p in m.stage.named_parameters():
        g = name
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            g = f"blocks.{start + int(i)}.{rest}"
        out["diff"] = max(out["diff"], (p.detach() - refp[g].detach()).abs().max().item())
        out["moved"] = max(out["moved"], (p.detach() - before[name]).abs().max().item())
    out["scale"] = m.amp.get_scale()
    out["ref_scale"] = ref.amp.get_scale()
    return out


def _pipeline_vs_serial(rank, world, prec):
    return _staged_vs_serial(rank, world, "pipeline", prec, microbatches=2, pipeline_schedule="gpipe")


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_pipeline_mixed_precision_tracks_serial(prec):
    """The schedule moves true fp32 gradients; a wrongly scaled one would be off by 65536x."""
    res = run_ranks(_pipeline_vs_serial, 2, prec)
    for r in res:
        assert r["moved"] > 1e-3
        # (bf16 keeps 8 bits: micro-batches of 8 instead of a batch of 16 round differently)
        assert r["diff"] < (0.05 if prec == "fp16" else 0.25) * r["moved"], r
        assert r["scale"] == r["ref_scale"]


def test_mgrit_bf16_step_is_close_to_fp32():
    def make(prec):
        cfg = build_config({"run": {"method": "mgrit", "precision": prec}, "model": {"name": "resnet20", "norm": "bn"},
                            "data": {"batch_size": B}, "optim": {"lr": 0.01},
                            "dist": {"stages": 1}, "mgrit": {"fwd_iters": 2, "bwd_iters": 1}})
        m = get_method("mgrit")(cfg, DistInfo(), _net())
        m.set_lr(0.01)
        return m

    def rel(ps, qs):  # |p - q| / |p - p0| over all parameters
        p0 = list(_net().parameters())
        d = sum((p - q).pow(2).sum() for p, q in zip(ps, qs)).sqrt()
        return (d / sum((p - q).pow(2).sum() for p, q in zip(ps, p0)).sqrt()).item()

    # The MGRIT step: bf16 moves the parameters about as bf16 moves serial backprop's (on 2 steps
    # of random data with BN, bf16 vs fp32 updates differ by ~30% for serial backprop too).
    a, b = make("fp32"), make("bf16")
    for bt in _batches(2):
        assert b.train_step(bt, "parallel").loss.item() == pytest.approx(a.train_step(bt, "parallel").loss.item(),
                                                                       rel=3e-2)
    assert rel(list(a.stage.parameters()), list(b.stage.parameters())) < 0.6
    assert b.warm["fwd"] and all(t.dtype == torch.float32 for t in b.warm["fwd"].values())  # states stay fp32
    # The SPH serial phase under bf16 is serial backprop under bf16 (one stage here).
    c, ref = make("bf16"), _serial(0.01, precision="bf16")
    for bt in _batches(2):
        c.train_step(bt, "serial")
        ref.train_step(bt, "serial")
    for p, q in zip(c.stage.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fp16_checkpoint_resume_is_bitwise(tmp_path):
    """The scaler state (scale, growth tracker) is in every checkpoint: a resumed fp16 run ends
    with the same model bits as an uninterrupted one."""
    args = ("train", "--dataset", "synthetic", "--model", "resnet20", "--batch-size", "16", "--epochs", "3",
            "--set", "data.synthetic_num_train=64", "--set", "data.synthetic_num_test=32",
            "--set", "data.synthetic_shape=[3, 8, 8]", "--threads", "1", "--progress", "off",
            "--precision", "fp16", "--lr-schedule", "constant", "--checkpoint-every", "1")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = run_cli(*args, "--out", str(out))
        assert r.returncode == 0, r.stderr
    state = torch.load(next((a / "checkpoints").glob("step-000000008")) / "rank-00000.pt", weights_only=True)
    assert state["method"]["amp"]["scaler"]["scale"] > 0
    import shutil

    shutil.rmtree(b / "checkpoints" / "step-000000012")
    (b / "summary.json").unlink()
    r = run_cli(*args, "--out", str(b), "--resume")
    assert r.returncode == 0, r.stderr
    ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    ma, mb = ma.get("model", ma), mb.get("model", mb)
    assert all(torch.equal(ma[k], mb[k]) for k in ma if isinstance(ma[k], torch.Tensor))


# ---------------------------------------------------------------------------- penalty / AL

def _layer_serial_vs_serial(rank, world, prec):
    """The SPH serial phase of penalty (layer executor) under autocast equals serial under the
    same precision: the gradients between ranks travel unscaled in fp32."""
    return _staged_vs_serial(rank, world, "penalty", prec)


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_penalty_serial_phase_mixed_precision_tracks_serial(prec):
    for r in run_ranks(_layer_serial_vs_serial, 2, prec):
        # a gradient sent scaled (or unscaled twice) would be off by the 65536x loss scale
        assert r["moved"] > 1e-3 and r["diff"] < (0.25 if prec == "bf16" else 0.05) * r["moved"], r
        assert r["scale"] == r["ref_scale"]


# An accuracy comparison (23 s): a benchmark. CI runs penalty K = 2 under bf16 + channels_last in
# test_gpu_check's dry run, and serial bf16's accuracy in test_bf16_serial_digits_reaches_fp32_accuracy.
@pytest.mark.benchmark
def test_penalty_k2_digits_bf16_within_one_point_of_fp32(tmp_path):
    """The issue's bar: penalty K = 2 on digits (package defaults, seed 0) under bf16 autocast
    lands within 1 point of fp32 (measured: 99.17% fp32, 98.61% bf16)."""
    accs = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / p
        r = run_cli("train", "--method", "penalty", "--stages", "2", "--dataset", "digits", "--precision", p,
                    "--out", str(out), "--progress", "off", timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
        accs[p] = read_summary(out)["final_test_acc"]
    assert abs(accs["bf16"] - accs["fp32"]) <= 0.01, accs
