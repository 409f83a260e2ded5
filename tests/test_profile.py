"""Measured block costs for --balance time."""

import pytest
import torch

from auxpar.models import build_model, partition_counts
from auxpar.models.profile import measure_costs


def test_measure_costs_shapes_and_no_side_effects():
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stem, blocks, head = measure_costs(net, 16, torch.device("cpu"), repeats=1)
    assert len(blocks) == len(net.blocks) and stem > 0 and head > 0 and all(b > 0 for b in blocks)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics restored
    assert all(p.grad is None for p in net.parameters())
    counts = partition_counts((stem, blocks, head), 3)
    assert sum(counts) == len(net.blocks) and len(counts) == 3


def test_measure_costs_in_channels_last_profiles_a_copy():
    """--channels-last runs are timed in that memory format, on a copy: the network itself keeps
    its parameters' layout and its BN statistics."""
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stem, blocks, head = measure_costs(net, 16, torch.device("cpu"), repeats=1, channels_last=True)
    assert len(blocks) == len(net.blocks) and stem > 0 and head > 0 and all(b > 0 for b in blocks)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1)
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_time_costs_can_move_the_cut():
    # A heavy first block pulls the cut forward: the costs, not the block count, decide it.
    assert partition_counts((0.0, [10.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.0), 2) == [1, 5]
    assert partition_counts((0.0, [1.0] * 6, 0.0), 2) == [3, 3]


def test_neighbour_cuts_move_one_boundary_by_one_block():
    from auxpar.models.profile import neighbour_cuts

    assert neighbour_cuts([4, 5]) == [[4, 5], [3, 6], [5, 4]]
    assert neighbour_cuts([1, 8]) == [[1, 8], [2, 7]]  # no empty stage
    assert neighbour_cuts([3, 3, 3]) == [[3, 3, 3], [2, 4, 3], [4, 2, 3], [3, 2, 4], [3, 4, 2]]


def test_time_stage_cuts_times_every_stage_once_and_leaves_no_trace(monkeypatch):
    from auxpar.models import profile

    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    timed = []
    real = profile._time_module

    def spy(mod, x, repeats):
        timed.append((mod.block_range, mod.is_first, mod.is_last, tuple(x.shape)))
        return real(mod, x, repeats)

    monkeypatch.setattr(profile, "_time_module", spy)
    cands = [[4, 5], [3, 6], [4, 5]]
    times = profile.time_stage_cuts(net, cands, 16, torch.device("cpu"), repeats=1)
    assert len(times) == 3 and all(len(t) == 2 and min(t) > 0 for t in times)
    assert times[0] == times[2]  # the same stages: timed once, reused
    # four distinct stages, each with its real input: the image for stage 0, else the boundary state
    assert sorted(timed) == sorted([((0, 4), True, False, (16, 1, 8, 8)), ((4, 9), False, True, (16, *net.boundary_shapes()[4])),
                                    ((0, 3), True, False, (16, 1, 8, 8)), ((3, 9), False, True, (16, *net.boundary_shapes()[3]))])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_time_balanced_split_keeps_the_cut_whose_slowest_whole_stage_is_fastest(monkeypatch):
    """The block times say 3, 6; timed whole, the stages of 4, 5 are better balanced, and that
    cut is taken. When the whole stages agree with the block times, the block-time cut stays."""
    from auxpar import trainer
    from auxpar.config import build_config
    from auxpar.distributed import DistInfo

    monkeypatch.setattr(trainer, "measure_costs", lambda net, bs, device, **kw: (0.0, [2.0] * 3 + [1.0] * 6, 0.0))
    whole = {(3, 6): [0.082, 0.108], (4, 5): [0.100, 0.090], (2, 7): [0.060, 0.130]}
    monkeypatch.setattr(trainer, "time_stage_cuts", lambda net, cands, bs, device, **kw: [whole[tuple(c)] for c in cands])
    cfg = build_config({"dist": {"stages": 2}})
    assert partition_counts((0.0, [2.0] * 3 + [1.0] * 6, 0.0), 2) == [3, 6]
    assert trainer.time_balanced_split(None, cfg, DistInfo()) == [4, 5]
    whole[(3, 6)] = [0.095, 0.096]
    assert trainer.time_balanced_split(None, cfg, DistInfo()) == [3, 6]


def test_plan_says_when_the_run_measures_its_cut(capsys):
    """dist.balance = time: the plan shows the FLOP cut and says that a run measures its own;
    with --split or the FLOP default it says nothing of the kind."""
    from auxpar.cli import main

    assert main(["plan", "--dataset", "fashion-mnist", "--stages", "2", "--set", "dist.balance=time"]) == 0
    assert "dist.balance = time: a run measures its cut" in capsys.readouterr().out
    assert main(["plan", "--dataset", "fashion-mnist", "--stages", "2"]) == 0  # the recipe: FLOPs
    assert "measures its cut" not in capsys.readouterr().out
    assert main(["plan", "--dataset", "fashion-mnist", "--stages", "2", "--set", "dist.balance=time", "--split", "3,6"]) == 0
    assert "measures its cut" not in capsys.readouterr().out
    assert main(["plan", "--dataset", "digits", "--stages", "2"]) == 0
    assert "measures its cut" not in capsys.readouterr().out


def test_mgrit_time_balance_stays_on_the_coarsest_grid(monkeypatch):
    """--method mgrit --balance time: the measured block times deal the coarse intervals (a cut
    off the grid would be refused); no whole-stage neighbours, which would leave the grid."""
    from auxpar import trainer
    from auxpar.config import build_config
    from auxpar.distributed import DistInfo
    from auxpar.mgrit.grid import build_hierarchy

    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8)
    monkeypatch.setattr(trainer, "measure_costs", lambda n, bs, device, **kw: (0.0, [5.0] * 3 + [1.0] * 6, 0.0))
    monkeypatch.setattr(trainer, "time_stage_cuts", lambda *a, **k: pytest.fail("whole-stage timing under MGRIT"))
    cfg = build_config({"run": {"method": "mgrit"}, "dist": {"stages": 2, "balance": "time"}})
    split = trainer.time_balanced_split(net, cfg, DistInfo())
    grid = build_hierarchy(net.num_blocks, net.transition_indices(), cfg.mgrit.levels, cfg.mgrit.cfactor, net.name)
    assert sum(split) == 9 and grid.is_point(grid.levels - 1, split[0])
    # heavy first blocks pull the cut forward against the FLOP cut
    flop = trainer.decide_split(build_config({"run": {"method": "mgrit"}, "dist": {"stages": 2}}), DistInfo(), net, None)
    assert split[0] < flop[0]
