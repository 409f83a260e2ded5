"""Measured block costs for --balance time."""

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
