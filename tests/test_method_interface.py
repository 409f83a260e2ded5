"""The Method interface holds hooks only; its services (NaN guard, BN snapshot, clipping) are
composed and written once (issue 13, part 3).

* the interface is the list of hooks the trainer, resume and export call, nothing more;
* shared behaviour (set_lr, end_epoch, model_state, the clipped optimizer step) has one home;
* :func:`auxpar.coupling.optim.clip_global_norm_` is ``clip_grad_norm_`` of the whole network:
  alone it equals torch's, a reduction that doubles the squared norm clips by sqrt(2) x the
  norm, and ``grad_clip = 0`` computes nothing and issues no reduction;
* the guard, reached through the method, keeps its messages and skip semantics;
* penalty with ``optim.grad_clip`` on 2 gloo ranks passes the NCCL protocol checker, with one
  clip all-reduce per optimizer step on every rank.
"""

from __future__ import annotations

import math

import pytest
import torch

from auxpar.config import build_config
from auxpar import registry
from auxpar.coupling import get_method

_REGISTRY = {name: get_method(name) for name in registry.method_names()}
from auxpar.coupling.base import Method
from auxpar.coupling.guard import NanGuard
from auxpar.coupling.optim import clip_global_norm_
from auxpar.coupling.stages import StagedMethod
from auxpar.data import Batch
from auxpar.distributed import DistInfo
from auxpar.errors import TrainingError

HOOKS = {
    # layout
    "check_layout", "stage_name", "sampler_layout", "sampler_strata", "eval_layout", "phase", "uses_augmentation",
    # set-up, epochs, steps
    "prepare", "begin_epoch", "set_lr", "train_step", "end_epoch", "evaluate", "step_metrics", "logged_loss",
    "reduce_epoch_stats",
    # accounting and state
    "comm_bytes", "epoch_metrics", "summary_extras", "model_state", "local_model_state",
    "state_dict", "load_state_dict", "epoch_state", "load_epoch_state",
}
TRAINER_SETS = {"step_index", "poison", "skipped_steps"}  # set / read by the trainer, kept by the guard
CLASS_FIELDS = {"name", "log_rank"}


def test_the_interface_is_the_hooks_only():
    public = {n for n in vars(Method) if not n.startswith("_")}
    assert public == HOOKS | TRAINER_SETS | CLASS_FIELDS
    for gone in ("finite_guard", "guard_post", "guard_wait", "snapshot_buffers", "clip_and_step"):
        assert not hasattr(Method, gone), gone
    # what the trainer sets around a step lands in the guard, which uses it
    m = get_method("serial")(build_config({"run": {"method": "serial"}}), DistInfo(), torch.nn.Linear(2, 2))
    assert isinstance(m.guard, NanGuard)
    m.step_index, m.poison, m.skipped_steps = 7, True, 3
    assert (m.guard.step_index, m.guard.poison, m.guard.skipped_steps) == (7, True, 3)


def test_shared_behaviour_has_one_home():
    """set_lr, the end of an epoch, the state gather and the clipped step are written once."""
    from auxpar.coupling.serial import SerialMethod

    homes = {
        "set_lr": {Method},
        "end_epoch": {Method, StagedMethod},  # StagedMethod's adds the epoch-end barrier
        "model_state": {Method, StagedMethod},  # one rank holds it all / the gather over the stages
        "local_model_state": {Method, SerialMethod, StagedMethod},
        "evaluate": {Method, SerialMethod, StagedMethod},
        "clip_and_step": {StagedMethod},
    }
    for hook, allowed in homes.items():
        definers = {c for cls in _REGISTRY.values() for c in cls.__mro__ if hook in vars(c)}
        assert definers <= allowed, (hook, definers - allowed)
    for name, cls in _REGISTRY.items():
        assert issubclass(cls, StagedMethod) == (name in ("penalty", "al", "pipeline", "mgrit")), name


# ------------------------------------------------------------------ clip_global_norm_

def _params(seed=0, none_grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (2, 2, 5), (3,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for i, p in enumerate(ps):
        if none_grad and i == 3:
            continue  # a parameter without a gradient (unused this step)
        p.grad = torch.randn(p.shape, generator=g) * 3.0
    return ps


def _grads(ps):
    return [None if p.grad is None else p.grad.clone() for p in ps]


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 1e6])
def test_clip_alone_equals_clip_grad_norm(max_norm):
    a, b = _params(), _params()
    norm = clip_global_norm_(a, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert norm.dtype == torch.float64
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(a, b):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    if max_norm == 1e6:  # below the limit: the gradients stay exactly as they were
        assert all(p.grad is None or torch.equal(p.grad, g) for p, g in zip(a, _grads(_params())))


def test_clip_with_a_reduction_that_doubles_the_squared_norm_clips_by_sqrt2_times_the_norm():
    ps, before = _params(), _grads(_params())
    calls = []

    def fake_reduce(sq):  # as if another rank held parameters with the same gradient norm
        calls.append((sq.dtype, sq.shape))
        sq.mul_(2.0)

    local = math.sqrt(sum(float(g.double().pow(2).sum()) for g in before if g is not None))
    norm = clip_global_norm_(ps, 0.5, fake_reduce)
    assert calls == [(torch.float64, torch.Size([]))]  # one reduction, one float64 0-dim tensor
    assert norm.item() == pytest.approx(math.sqrt(2.0) * local, rel=1e-12)
    coef = 0.5 / (math.sqrt(2.0) * local + 1e-6)
    for p, g in zip(ps, before):
        if g is not None:
            torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
    # ...which is clip_grad_norm_ of the network made of both ranks' parameters
    twins = _params() + _params()
    torch.nn.utils.clip_grad_norm_(twins, 0.5)
    for p, q in zip(ps, twins):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_zero_clip_is_a_no_op_without_a_reduction():
    ps, before = _params(), _grads(_params())
    calls = []
    assert clip_global_norm_(ps, 0.0, lambda sq: calls.append(sq)) is None
    assert calls == []
    assert all(p.grad is None or torch.equal(p.grad, g) for p, g in zip(ps, before))


def test_a_rank_without_gradients_still_joins_the_reduction():
    """Every rank of the group must issue the all-reduce (NCCL), even one whose stage has no
    gradient this step; its tensor lives on the device it is given."""
    calls = []
    p = torch.nn.Parameter(torch.ones(3))
    norm = clip_global_norm_([p], 1.0, lambda sq: (calls.append(sq.device), sq.add_(4.0)), device="cpu")
    assert calls == [torch.device("cpu")] and norm.item() == 2.0 and p.grad is None


# ------------------------------------------------------------------ the guard, through the method

def _serial(on_nan):
    cfg = build_config({"run": {"method": "serial", "on_nan": on_nan}, "model": {"name": "resnet20", "norm": "bn"},
                        "data": {"dataset": "synthetic", "batch_size": 8, "synthetic_num_train": 8,
                                 "synthetic_shape": [1, 8, 8]}})
    from auxpar.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8, num_classes=10, norm="bn")
    m = get_method("serial")(cfg, DistInfo(), net)
    m.set_lr(0.1)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.arange(8), torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    return m, batch


def test_poisoned_step_is_skipped_and_restores_parameters_and_bn_buffers():
    m, batch = _serial("skip")
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.step_index, m.poison = 1, True  # what AUXPAR_FAULT=nan:0:1 makes the trainer do
    m.train_step(batch, "serial")
    assert m.skipped_steps == 1
    after = m.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    m.poison = False
    m.train_step(batch, "serial")
    assert m.skipped_steps == 1
    assert not all(torch.equal(before[k], m.net.state_dict()[k]) for k in before)  # (the test can fail)
    assert m.state_dict()["skipped_steps"] == 1


def test_poisoned_step_stops_with_the_same_message():
    m, batch = _serial("stop")
    m.step_index, m.poison = 7, True
    with pytest.raises(TrainingError) as exc:
        m.train_step(batch, "serial")
    assert str(exc.value) == (
        "non-finite loss at step 7 on rank 0 (the whole network): every rank stopped before the optimizer "
        "step, so the parameters are those of step 6 and the last checkpoint is intact. Lower the learning "
        f"rate (now --lr {m.cfg.optim.lr}), clip gradients (--set optim.grad_clip=1.0), or pass --on-nan "
        "skip to drop such steps")
    assert exc.value.same_on_every_rank


# ------------------------------------------------------------------ penalty + clipping on 2 ranks, NCCL rules

@pytest.mark.slow
def test_protocol_penalty_with_grad_clip(tmp_path):
    from protocol_check import load
    from test_protocol import COMMON, SPH, checked, traced_run

    from conftest import read_summary

    run = tmp_path / "run"
    traced_run(tmp_path / "t", "train", "--method", "penalty", "--stages", "2", *COMMON, *SPH,
               "--set", "optim.grad_clip=0.5", "--out", str(run))
    res = checked(tmp_path / "t", min_messages=3 * 4)
    assert res["ranks"] == 2
    steps = read_summary(run)["steps"]
    assert steps == 12  # 3 epochs (parallel, serial, parallel) x 4 steps
    # one clip all-reduce (a 0-dim float64 tensor) per optimizer step on every rank, in both phases
    for rank, events in load(str(tmp_path / "t")).items():
        clips = [e for e in events if e["ev"] == "issue" and e.get("kind") == "coll"
                 and e.get("name") == "all_reduce" and e.get("shape") == [] and e.get("dtype") == "float64"]
        assert len(clips) == steps, (rank, len(clips))
