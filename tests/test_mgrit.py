"""MGRIT backend: grid, exactness, adjoint gradients, BN, linear convergence, on 1, 2 and 4 gloo ranks.

The exactness statements of algorithms.md §6-7, tested with the real exchange between processes:
one level is the serial forward; two-level MGRIT with F-relaxation is the serial forward after
N_c = N/m iterations (N_c = the number of level-1 intervals), with transitions inside coarse
intervals; at that bound the adjoint gives autograd's gradients for every parameter and the input,
and the BN running statistics equal serial training's. Every parallel check is also a
K-independence check: the iterates on K ranks equal those of one process, also when inexact.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxpar.config import build_config
from auxpar.coupling import get_method
from auxpar.data.loader import Batch
from auxpar.distributed import DistInfo
from auxpar.errors import ConfigError, DistributedError
from auxpar.mgrit.grid import build_hierarchy, level_views, mgrit_split
from auxpar.models import StagedNet, build_model
from auxpar.models.resnet import Head
from mp_harness import run_ranks

log = logging.getLogger("auxpar.tests")
B = 6  # batch: tiny, every block is a handful of 8x8 convolutions


def _cfg(mg: dict, norm="none", model="resnet20", K=1, dp=1, lr=0.0, extra=None):
    over = {"run": {"method": "mgrit"}, "model": {"name": model, "norm": norm},
            "data": {"batch_size": B * dp},
            "optim": {"lr": max(lr, 1e-12), "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
            "dist": {"stages": K, "dp": dp}, "mgrit": mg}
    for sec, vals in (extra or {}).items():
        over.setdefault(sec, {}).update(vals)
    return build_config(over)


def _net(model="resnet20", norm="none"):
    torch.manual_seed(0)
    return build_model(model, in_channels=1, input_size=8, num_classes=10, norm=norm)


def _method(mg, rank=0, world=1, norm="none", model="resnet20", net=None, dp=1):
    K = world // dp
    cfg = _cfg(mg, norm, model, K, dp)
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo" if world > 1 else "none")
    m = get_method("mgrit")(cfg, info, net if net is not None else _net(model, norm))
    m.set_lr(0.0)
    return m, cfg


def _data(seed=1, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def _serial_states(net, x):
    with torch.no_grad():
        h = net.stem(x)
        out = [h]
        for blk in net.blocks:
            h = blk(h)
            out.append(h)
    return out


def _forward_states(m, x, iters, relax="F"):
    """States of this rank's points (and the ghost) after a forward solve with ``iters`` cycles."""
    m.cfg.mgrit.fwd_iters = iters
    m.cfg.mgrit.relax = relax
    m.warm = {"fwd": None, "bwd": None}
    _, res, _ = m.solve_forward(x, keep_graph=False)
    m.flush()  # a send whose work is dropped unreceived is lost: complete them before m can go
    return res


def _max_err(states, ref, points):
    return max((states[p] - ref[p]).abs().max().item() for p in points)


# ---------------------------------------------------------------------- grid (no processes)
def test_coarse_grid_keeps_transitions_and_lumps_blocks():
    # resnet20: 9 blocks, transitions 3 and 6 (stride 2, channel change)
    g = build_hierarchy(9, [3, 6], levels=3, cfactor=[2])
    assert g.points == (tuple(range(10)), (0, 2, 4, 6, 8, 9), (0, 4, 8, 9))
    assert g.ops[1][(0, 2)] == ((0, 2),)               # u + 2h f_0(u)
    assert g.ops[1][(2, 4)] == ((2, 1), (3, 1))        # ordinary block, then the transition as it is
    assert g.ops[1][(8, 9)] == ((8, 1),)               # the short last interval
    assert g.ops[2][(0, 4)] == ((0, 3), (3, 1))        # 3 ordinary blocks lumped, transition kept
    assert g.ops[2][(4, 8)] == ((4, 3), (6, 1))        # lump sits at the interval's first ordinary block
    assert g.coarse_intervals == 5 and g.coarsest_stride == 4
    fwd = level_views(g, 4, 9)
    assert fwd[0].points == (5, 6, 7, 8, 9) and fwd[0].ghost == 4
    assert fwd[0].coarse == (False, True, False, True, True)
    bwd = level_views(g, 4, 9, reverse=True)
    assert bwd[1].points == (8, 6, 4) and bwd[1].ghost == 9 and bwd[1].coarse == (True, False, True)


def test_bad_settings_raise_clear_errors():
    g = build_hierarchy(9, [3, 6], 2, [2])
    with pytest.raises(ConfigError, match=r"cfactor does not divide rank 0's chunk.*multiple of M = 2.*--split"):
        mgrit_split(g, 2, [1.0] * 9, [3, 6])
    with pytest.raises(ConfigError, match=r"too deep.*--mgrit-levels"):
        build_hierarchy(9, [3, 6], levels=4, cfactor=[3])
    with pytest.raises(ConfigError, match=r"too deep for 4 stages.*coarsest-level interval"):
        mgrit_split(build_hierarchy(9, [3, 6], 2, [3]), 4, [1.0] * 9)
    with pytest.raises(ConfigError, match="mgrit.cfactor has 3 entries for 3 levels"):
        _cfg({"levels": 3, "cfactor": [2, 2, 2]})
    with pytest.raises(ConfigError, match="mgrit.cfactor"):
        _cfg({"cfactor": [1]})
    with pytest.raises(ConfigError, match=r"mgrit.cweight = 2.5 must be in \(0, 2\)"):
        _cfg({"cweight": 2.5})
    with pytest.raises(ConfigError, match="--dropout 0"):
        get_method("mgrit")(_cfg({}, extra={"model": {"dropout": 0.3}}), DistInfo(), _net())
    cls = get_method("mgrit")
    with pytest.raises(DistributedError, match=r"stages x dp = 4 processes.*--nproc|torchrun"):
        cls.check_layout(_cfg({}, K=2, dp=2), DistInfo(0, 3, 0, 3, torch.device("cpu"), "gloo"))
    with pytest.raises(ConfigError, match="multiple of 2"):
        cls.check_layout(_cfg({}, K=1, dp=2, extra={"data": {"batch_size": 7}}),
                         DistInfo(0, 2, 0, 2, torch.device("cpu"), "gloo"))
    # the cut auxpar chooses is legal: boundaries on the coarsest grid, balanced
    assert mgrit_split(build_hierarchy(9, [3, 6], 2, [2]), 4, [1.0] * 9) == [2, 2, 2, 3]


# ---------------------------------------------------------------------- one process
def test_one_rank_exactness_and_bound():
    net = _net()
    x, _ = _data()
    ref = _serial_states(net, x)
    one, _ = _method({"levels": 1}, net=net)
    assert _max_err(_forward_states(one, x, 1).states, ref, range(10)) == 0.0
    two, _ = _method({"levels": 2, "cfactor": [2]}, net=net)
    nc = two.grid.coarse_intervals
    assert nc == 5
    errs = [_max_err(_forward_states(two, x, it).states, ref, range(10)) for it in range(1, nc + 1)]
    assert errs[0] > 1e-2  # one iteration is not the serial forward: the test can fail
    assert errs[-1] <= 1e-6, errs


# ---------------------------------------------------------------------- 2 and 4 ranks
def _heat_net(n_blocks=32, channels=2, size=8):
    """Linear test problem: the 2-D heat equation u' = Laplace(u), forward Euler, as a StagedNet."""

    class HeatBlock(nn.Module):
        is_transition = False

        def __init__(self):
            super().__init__()
            self.step = 1.0
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=channels)
            with torch.no_grad():
                k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
                self.conv.weight.copy_(k.expand(channels, 1, 3, 3))

        def residual(self, x):
            return self.conv(x)

        def shortcut(self, x):
            return x

        def forward(self, x):
            r = self.residual(x)
            return x + (self.step * r if self.step != 1.0 else r)

    blocks = [HeatBlock() for _ in range(n_blocks)]
    return StagedNet(nn.Identity(), blocks, Head(channels, 10, "none", pre_act=False), name="heat",
                     in_channels=channels, input_size=size, num_classes=10)


def _global_name(name: str, start: int) -> str:
    if not name.startswith("blocks."):
        return name
    _, i, rest = name.split(".", 2)
    return f"blocks.{start + int(i)}.{rest}"


def _parallel_checks(rank, world):
    out = {}
    x, y = _data()
    net_ref = _net()
    ref = _serial_states(net_ref, x)
    # -- one level = serial forward (every rank's points)
    m, _ = _method({"levels": 1}, rank, world)
    start, stop = m.block_range
    pts = range(start + 1, stop + 1)
    out["one_level"] = _max_err(_forward_states(m, x, 1).states, ref, pts)
    # -- two levels, F-relaxation: serial forward after N_c iterations; K-independent iterates
    m, _ = _method({"levels": 2, "cfactor": [2]}, rank, world)
    start, stop = m.block_range
    pts = range(start + 1, stop + 1)
    solo, _ = _method({"levels": 2, "cfactor": [2]})
    nc = m.grid.coarse_intervals
    out["nc"], out["split"] = nc, m.counts
    out["fwd_err"] = [_max_err(_forward_states(m, x, it).states, ref, pts) for it in (1, nc)]
    out["vs_one_process"] = max(
        _max_err(_forward_states(m, x, it, relax).states, _forward_states(solo, x, it, relax).states, pts)
        for it, relax in ((1, "F"), (2, "FCF")))
    # -- adjoint at the bound: every parameter and the input equal autograd's serial gradients
    m, cfg = _method({"levels": 2, "cfactor": [2], "fwd_iters": nc, "bwd_iters": nc, "relax": "F"}, rank, world)
    xg = x.clone().requires_grad_(True)
    so = m.train_step(Batch(torch.arange(B), xg, y), "parallel")
    net_ref.zero_grad()
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(net_ref(xr), y)
    loss.backward()
    refg = dict(net_ref.named_parameters())
    errs = {}
    for name, p in m.stage.named_parameters():
        gname = _global_name(name, start)
        errs[gname] = (p.grad - refg[gname].grad).abs().max().item() / max(1.0, refg[gname].grad.abs().max().item())
    out["grad_err"] = errs
    out["input_err"] = (xg.grad - xr.grad).abs().max().item() if rank == 0 else None
    out["loss"] = (float(so.loss), float(loss.detach())) if rank == world - 1 else None
    out["metrics"] = m.step_metrics()
    # one iteration short of the bound the gradients are not exact (the comparison can fail)
    m2, _ = _method({"levels": 2, "cfactor": [2], "fwd_iters": nc, "bwd_iters": 1, "relax": "F"}, rank, world)
    m2.train_step(Batch(torch.arange(B), x, y), "parallel")
    out["grad_err_inexact"] = max((p.grad - refg[_global_name(n, start)].grad).abs().max().item()
                                  for n, p in m2.stage.named_parameters())
    # -- BN: running statistics after one exact step equal serial training's
    net_bn = _net(norm="bn")
    mb, _ = _method({"levels": 2, "cfactor": [2], "fwd_iters": nc, "bwd_iters": nc, "relax": "FCF"}, rank, world,
                    norm="bn", net=net_bn)
    mb.train_step(Batch(torch.arange(B), x, y), "parallel")
    ref_bn = _net(norm="bn")
    ref_bn.train()
    F.cross_entropy(ref_bn(x), y).backward()
    rs = ref_bn.state_dict()
    bn_err, n_bn = 0.0, 0
    for key, v in mb.local_model_state().items():
        if "running" in key or "num_batches" in key:
            bn_err = max(bn_err, (v.double() - rs[key].double()).abs().max().item())
            n_bn += 1
    out["bn_err"], out["n_bn"] = bn_err, n_bn
    out["bn_moved"] = max((rs[k].double() - _net(norm="bn").state_dict()[k].double()).abs().max().item()
                          for k in rs if "running_mean" in k)
    # -- linear test problem: the residual decreases every iteration (forward and adjoint solve)
    lin = {}
    for name, mg in (("2-level F", {"levels": 2, "cfactor": [2], "relax": "F"}),
                     ("3-level FCF", {"levels": 3, "cfactor": [2], "relax": "FCF"})):
        mh, _ = _method({**mg, "step": 0.05, "fwd_iters": 6, "bwd_iters": 6, "warm_start": False}, rank, world,
                        net=_heat_net())
        g = torch.Generator().manual_seed(3)
        xh, yh = torch.randn(4, 2, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        mh.train_step(Batch(torch.arange(4), xh, yh), "parallel")
        lin[name] = mh.step_metrics()["mgrit_residuals"]
    out["linear"] = lin
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_parallel_exactness_gradients_bn_and_linear_convergence(world):
    outs = run_ranks(_parallel_checks, world)
    nc = outs[0]["nc"]
    assert nc == 5 and len(outs[0]["split"]) == world
    for r, o in enumerate(outs):
        assert o["one_level"] == 0.0, (r, o["one_level"])
        assert o["fwd_err"][1] <= 1e-6, (r, o["fwd_err"])
        assert o["vs_one_process"] <= 1e-6, (r, o["vs_one_process"])
        worst = max(o["grad_err"].items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-5, (r, worst)
        assert o["bn_err"] <= 1e-6 and o["n_bn"] > 0, (r, o["bn_err"])
        assert o["bn_moved"] > 1e-3  # the serial step really changed the running statistics
        assert o["metrics"]["mgrit_iters"] == {"fwd": nc, "bwd": nc}
        assert o["metrics"]["mgrit_residuals"]["fwd"][-1] <= 1e-5
    assert max(o["fwd_err"][0] for o in outs) > 1e-2  # one iteration is not exact
    assert max(o["grad_err_inexact"] for o in outs) > 1e-4  # nor is one adjoint iteration
    assert outs[0]["input_err"] <= 1e-5
    lo, lr = outs[-1]["loss"]
    assert abs(lo - lr) <= 1e-6
    # every parameter of the network was compared, on some rank
    names = set().union(*(o["grad_err"] for o in outs))
    assert names == {n for n, _ in _net().named_parameters()}
    for name, both in outs[0]["linear"].items():
        for kind, res in both.items():
            live = [r for r in res if r > 1e-9 * res[0]]  # until rounding level (exactness at N_c = 8)
            assert len(live) >= 5 and all(b < a for a, b in zip(live, live[1:])), (name, kind, res)
            rho = (live[-1] / live[0]) ** (1 / (len(live) - 1))
            log.warning("linear heat problem, %d ranks, %s, %s: residuals %s, convergence factor %.3g",
                        world, name, kind, ["%.3g" % v for v in res], rho)
            print(f"linear heat problem, {world} ranks, {name}, {kind}: convergence factor {rho:.3g}")
            assert rho < 0.5


def test_tol_nested_and_state_dict_continue_bitwise():
    x, y = _data()
    # relative tolerance: the solve stops once the residual is 0 (exact), well before the cap
    m, _ = _method({"levels": 2, "cfactor": [2], "relax": "F", "fwd_iters": 20, "bwd_iters": 20, "tol": 1e-12})
    m.train_step(Batch(torch.arange(B), x, y), "parallel")
    it = m.step_metrics()["mgrit_iters"]
    assert 1 <= it["fwd"] < 20 and 1 <= it["bwd"] < 20, it
    # nested iteration keeps the exactness bound
    net = _net()
    m, _ = _method({"levels": 2, "cfactor": [2], "nested": True}, net=net)
    assert _max_err(_forward_states(m, x, m.grid.coarse_intervals).states, _serial_states(net, x), range(10)) <= 1e-6
    # state_dict -> load_state_dict continues bitwise (parameters, BN buffers, momentum, warm states)
    data = [_data(seed=s) for s in range(4)]
    mg = {"warm_mode": "states", "warm_adjoint": True}
    a, _ = _method(mg, norm="bn", net=_net(norm="bn"))
    a.set_lr(0.05)
    for xb, yb in data[:2]:
        a.train_step(Batch(torch.arange(B), xb, yb), "parallel")
    state = copy.deepcopy(a.state_dict())  # as a checkpoint on disk would hold it
    b, _ = _method(mg, norm="bn", net=_net(norm="bn"))
    b.load_state_dict(state)
    b.set_lr(0.05)
    for xb, yb in data[2:]:
        a.train_step(Batch(torch.arange(B), xb, yb), "parallel")
        b.train_step(Batch(torch.arange(B), xb, yb), "parallel")
    sa, sb = a.stage.state_dict(), b.stage.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the block-evaluation counter (summary.json's mgrit_block_evals) continues too
    assert a.block_evals > 0 and b.block_evals == a.block_evals
    c, _ = _method(mg, norm="bn", net=_net(norm="bn"))  # without the warm states: not bitwise
    c.load_state_dict(dict(state, warm={"fwd": None, "bwd": None}))
    c.set_lr(0.05)
    for xb, yb in data[2:]:
        c.train_step(Batch(torch.arange(B), xb, yb), "parallel")
    assert not all(torch.equal(sa[k], c.stage.state_dict()[k]) for k in sa)


def test_nan_guard_skips_the_whole_step():
    x, y = _data()
    m, _ = _method({}, norm="bn", net=_net(norm="bn"))
    m.cfg.run.on_nan = "skip"
    m.set_lr(0.05)
    before = copy.deepcopy(m.stage.state_dict())
    m.poison = True  # what AUXPAR_FAULT=nan:RANK:STEP does: this rank's loss reads as non-finite
    m.train_step(Batch(torch.arange(B), x, y), "parallel")
    after = m.stage.state_dict()
    assert m.skipped_steps == 1 and m.warm == {"fwd": None, "bwd": None}
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN buffers untouched
    m.poison = False
    m.train_step(Batch(torch.arange(B), x, y), "parallel")
    assert not all(torch.equal(before[k], m.stage.state_dict()[k]) for k in before)
