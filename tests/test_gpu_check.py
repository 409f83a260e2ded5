"""Device checks and the end-to-end dry run of ``experiments/gpu_check.py``.

The checks marked ``device`` run on the device named by ``$AUXPAR_TEST_DEVICE`` (cpu when unset;
see ``conftest.device_under_test``): on CPU they are ordinary, fast unit tests; the GPU check
script runs them with ``AUXPAR_TEST_DEVICE=cuda`` and records each one's outcome. Results on
the device are compared with the same computation on the CPU (fp32, TF32 off), so on a CPU
run the cross-device comparisons are CPU against CPU (they still exercise every code path).

The dry run (``slow``) runs the whole script on CPU at tiny size and checks its report.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from auxpar.config import build_config
from auxpar.coupling import get_method
from auxpar.coupling.aux_store import AuxStore
from auxpar.coupling.ds import DSFilter
from auxpar.data import Augment
from auxpar.data.loader import Batch
from auxpar.distributed import DistInfo
from auxpar.models import build_model
from conftest import ROOT, cli_env

SCRIPT = ROOT / "experiments" / "gpu_check.py"
CPU = torch.device("cpu")


@contextlib.contextmanager
def exact_fp32():
    """TF32 off (cuDNN convolutions use TF32 by default on Ampere and later): fp32 is compared."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _net(name="resnet20", channels=1, size=8, classes=10, seed=0, norm="bn"):
    torch.manual_seed(seed)
    return build_model(name, in_channels=channels, input_size=size, num_classes=classes, norm=norm)


def _x(n, c, s, seed=1):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- device checks

@pytest.mark.parametrize("name, channels, size", [("resnet20", 1, 8), ("wrn-10-2", 3, 16)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_device_forward_backward_matches_cpu(device_under_test, name, channels, size, mode):
    dev = device_under_test
    ref, net = _net(name, channels, size), _net(name, channels, size).to(dev)
    ref.train(mode == "train")
    net.train(mode == "train")
    x, y = _x(8, channels, size), torch.arange(8) % 10
    with exact_fp32():
        out_ref = ref(x)
        F.cross_entropy(out_ref, y).backward()
        out = net(x.to(dev))
        F.cross_entropy(out, y.to(dev)).backward()
    torch.testing.assert_close(out.cpu(), out_ref, rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
    if mode == "train":  # BN running statistics moved the same way
        for b, c in zip(net.buffers(), ref.buffers()):
            torch.testing.assert_close(b.cpu(), c, rtol=1e-4, atol=1e-5)


def test_device_staged_net_equals_whole_net(device_under_test):
    dev = device_under_test
    net = _net("resnet20", 3, 16).to(dev)
    x, y = _x(6, 3, 16).to(dev), torch.tensor([0, 3, 5, 9, 1, 2], device=dev)
    net.train()
    with torch.no_grad():
        ref = net(x)
        for K in (1, 2, 3, 4):
            h = x
            for s in net.partition(K):
                assert tuple(h.shape[1:]) == s.in_shape and h.device.type == dev.type
                h = s(h)
            torch.testing.assert_close(h, ref, rtol=0, atol=1e-5)
    with exact_fp32():  # cuDNN's backward may sum in another order each call: near, not bitwise
        F.cross_entropy(net(x), y).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        h = x
        for s in net.partition(3):
            h = s(h)
        F.cross_entropy(h, y).backward()
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, upsample", [("avg", "nearest"), ("max", "bilinear")])
def test_device_ds_filters_match_cpu(device_under_test, mode, upsample):
    dev = device_under_test
    f = DSFilter((16, 8, 8), factor=2, mode=mode, upsample=upsample)
    x = _x(4, 16, 8)
    d_ref, d = f.down(x), f.down(x.to(dev))
    assert d.shape == (4, *f.shape) == (4, 16, 4, 4) and d.device.type == dev.type
    torch.testing.assert_close(d.cpu(), d_ref, rtol=1e-6, atol=1e-6)
    u_ref, u = f.up(d_ref), f.up(d)
    assert u.shape == x.shape
    torch.testing.assert_close(u.cpu(), u_ref, rtol=1e-6, atol=1e-6)
    one = DSFilter((16, 8, 8), factor=1)
    xd = x.to(dev)
    assert one.down(xd) is xd and one.up(xd) is xd  # factor 1: no filter at all


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_device_aux_store_put_get_and_placement(device_under_test, placement, dtype):
    dev = device_under_test
    store = AuxStore(20, (4, 3, 3), dtype=dtype, placement=placement, device=dev, multipliers=True)
    where = CPU if placement == "host" else dev
    assert store.z.device.type == where.type and store.mu.device.type == where.type
    if placement == "host" and dev.type == "cuda":
        assert store.z.is_pinned() and store.mu.is_pinned()
    assert store.nbytes == 2 * 20 * 36 * (4 if dtype == "fp32" else 2)
    idx = torch.tensor([3, 7, 11, 19], device=dev)
    vals = _x(4, 4, 3, seed=5).to(dev)
    store.put_z(idx, vals)
    store.put_mu(idx, 2 * vals)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    z, mu = store.get_z(idx), store.get_mu(idx)
    assert z.device.type == dev.type and z.dtype == torch.float32 and z.shape == vals.shape
    tol = dict(rtol=0, atol=0) if dtype == "fp32" else dict(rtol=2 ** -8, atol=1e-6)  # bf16: 8-bit mantissa
    torch.testing.assert_close(z, vals, **tol)
    torch.testing.assert_close(mu, 2 * vals, **tol)
    others = torch.tensor([0, 1, 2, 18], device=dev)
    assert float(store.get_z(others).abs().max()) == 0.0  # untouched rows stay zero
    store.reset_mu()
    assert store.mean_mu_norm() == 0.0


def test_device_augment_matches_cpu(device_under_test):
    """The same generator gives the same crops and flips on every device (loader guarantee)."""
    dev = device_under_test
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = Augment(crop_pad=2, pad_mode="reflect", flip=True)
    ref = aug(x, torch.Generator().manual_seed(3))
    out = aug(x.to(dev), torch.Generator().manual_seed(3))
    assert out.device.type == dev.type and out.dtype == torch.uint8
    assert torch.equal(out.cpu(), ref)


def _serial(dev):
    cfg = build_config({"run": {"method": "serial"}, "model": {"name": "resnet20"},
                        "data": {"dataset": "synthetic", "batch_size": 8, "synthetic_shape": [1, 8, 8]}})
    net = _net("resnet20", 1, 8)
    return get_method("serial")(cfg, DistInfo(device=dev), net)


def test_device_serial_training_steps_match_cpu(device_under_test):
    dev = device_under_test
    x, y = _x(8, 1, 8, seed=2), torch.arange(8) % 10
    idx = torch.arange(8)
    ref, m = _serial(CPU), _serial(dev)
    with exact_fp32():
        for _ in range(3):
            so_ref = ref.train_step(Batch(idx, x, y), "serial")
            so = m.train_step(Batch(idx.to(dev), x.to(dev), y.to(dev)), "serial")
            torch.testing.assert_close(so.loss.cpu(), so_ref.loss, rtol=1e-4, atol=1e-5)
    assert so.loss.device.type == dev.type
    for p, q in zip(m.net.parameters(), ref.net.parameters()):
        assert p.device.type == dev.type
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-3, atol=1e-4)


def test_device_mgrit_one_rank_exactness(device_under_test):
    dev = device_under_test

    def method(levels):
        over = {"run": {"method": "mgrit"}, "model": {"name": "resnet20", "norm": "none"},
                "data": {"batch_size": 6},
                "optim": {"lr": 1e-12, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
                "dist": {"stages": 1, "dp": 1}, "mgrit": {"levels": levels, "cfactor": [2]}}
        m = get_method("mgrit")(build_config(over), DistInfo(device=dev), _net("resnet20", 1, 8, norm="none"))
        m.set_lr(0.0)
        return m

    def states(m, iters):
        m.cfg.mgrit.fwd_iters = iters
        m.cfg.mgrit.relax = "F"
        m.warm = {"fwd": None, "bwd": None}
        _, res, _ = m.solve_forward(x, keep_graph=False)
        m.flush()
        return res.states

    x = _x(6, 1, 8).to(dev)
    net = _net("resnet20", 1, 8, norm="none").to(dev)
    with torch.no_grad():
        h = net.stem(x)
        ref = [h]
        for blk in net.blocks:
            h = blk(h)
            ref.append(h)
    with exact_fp32():
        one = states(method(1), 1)
        assert max((one[p] - ref[p]).abs().max().item() for p in range(10)) <= 1e-6
        two = method(2)
        nc = two.grid.coarse_intervals
        errs = [max((s[p] - ref[p]).abs().max().item() for p in range(10))
                for s in (states(two, it) for it in (1, nc))]
    assert errs[0] > 1e-2, errs  # one iteration is not the serial forward: the check can fail
    assert errs[-1] <= 1e-5, errs  # nc iterations are exact (up to rounding)


def test_device_bf16_autocast_channels_last_forward(device_under_test):
    """WRN forward + backward under bf16 autocast in channels_last: finite, close to fp32."""
    dev = device_under_test
    net = _net("wrn-10-2", 3, 16).to(dev)
    x = _x(8, 3, 16).to(dev)
    with exact_fp32():
        ref = net(x).detach()
    net_cl = net.to(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = net_cl(x.to(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)


# ---------------------------------------------------------------------------- the script, dry run

@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True,
                       timeout=300, env=cli_env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["dry_run"] is True and rep["ok"] is True
    sec = rep["sections"]
    assert set(sec) == {"unit_tests", "cli_runs", "profile", "throughput", "aux_store", "model_perf"}
    for name, s in sec.items():
        assert s["status"] == "ok", (name, s.get("error"))
        assert isinstance(s["seconds"], float)
    num = (int, float)
    # 1: what ran and passed, per test
    ut = sec["unit_tests"]
    assert ut["device"] == "cpu" and ut["failed"] == 0 and ut["passed"] >= 10 and ut["passed"] == len(
        [t for t in ut["tests"] if t["outcome"] == "passed"])
    # 2: CLI runs
    runs = sec["cli_runs"]["runs"]
    assert {"serial", "penalty", "al", "mgrit"} <= set(runs)
    for name in ("serial", "penalty", "al", "mgrit"):
        r = runs[name]
        assert r["rc"] == 0 and isinstance(r["final_test_acc"], float) and isinstance(r["train_time_s"], float)
    for name in ("penalty", "al", "mgrit"):
        for key in ("time_compute_s", "time_comm_s", "time_wait_s"):
            assert len(runs[name][key]) == 2 and all(isinstance(v, num) for v in runs[name][key])
    # 3: profiles, loadable by model-perf --profile
    for variant in ("fp32", "bf16_cl"):
        pr = sec["profile"]["variants"][variant]
        assert (out / pr["file"]).is_file()
        assert len(pr["per_block_ms"]) == pr["num_blocks"] + 2
        assert all(isinstance(v, float) and v > 0 for v in pr["per_block_ms"])
        assert isinstance(pr["step_ms"], float)
    # 4, 5: throughput and aux store
    for variant in ("fp32", "bf16_cl"):
        t = sec["throughput"]["variants"][variant]
        assert isinstance(t["images_per_s"], float) and t["images_per_s"] > 0
    assert sec["aux_store"]["rows"] and all(isinstance(r["get_gbs"], float) and isinstance(r["put_gbs"], float)
                                            for r in sec["aux_store"]["rows"])
    assert {r["placement"] for r in sec["aux_store"]["rows"]} == {"device", "host"}
    # 6: model-perf speedups from the saved profiles
    rows = sec["model_perf"]["rows"]
    assert {(r["method"], r["K"]) for r in rows if r["profile"] == "fp32" and r["link"] == "nvlink"} >= {
        (m, k) for m in ("penalty", "al", "pipeline", "ddp") for k in (2, 4, 8)}
    assert all(isinstance(r["speedup"], float) for r in rows if r["method"] in ("penalty", "al", "pipeline", "ddp"))
    md = (out / "gpu_check.md").read_text()
    for head in ("Machine", "Unit tests", "CLI runs", "Profile", "Throughput", "Aux store", "model-perf"):
        assert head in md


@pytest.mark.slow
def test_gpu_check_without_cuda_needs_dry_run(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=120, env=cli_env(), cwd=ROOT)  # cli_env hides every GPU
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--dry-run" in lines[0] and "CUDA" in lines[0], p.stderr
    assert not (tmp_path / "x" / "gpu_check.json").exists()
