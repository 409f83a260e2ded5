"""Tests for auxpar.models: architectures, the staged form, partitioning and its errors.

The transparency tests follow torchgpipe: a partitioned net must equal the serial net on
deliberately skewed inputs (per-sample scales over several orders of magnitude), for every K.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from auxpar.errors import ConfigError
from auxpar.models import (
    MODEL_NAMES_HELP,
    Stage,
    StagedNet,
    build_model,
    count_parameters,
    describe_partition,
    parse_model_name,
    parse_split,
    partition_counts,
)
from auxpar.models.resnet import BasicBlock, PreActBlock
from auxpar.models.wrn import WideBasicBlock, build_wrn


def skewed_input(batch: int, channels: int, size: int, seed: int = 1) -> torch.Tensor:
    """Per-sample scales from 1e-3 to 1e2 and per-sample offsets: (B, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    scales = torch.logspace(-3, 2, batch).view(batch, 1, 1, 1)
    offsets = torch.linspace(-2, 2, batch).view(batch, 1, 1, 1)
    return x * scales + offsets


def build(name: str, seed: int = 0, **kw) -> StagedNet:
    torch.manual_seed(seed)
    return build_model(name, **kw)


# ---------------------------------------------------------------------- parameter counts
def test_resnet20_param_count_option_a():
    # Option A (parameter-free shortcut) gives 269,722; the 272,474 sometimes quoted adds
    # 1x1-conv+BN projection shortcuts at the two transitions (option B, +2,752). Both are
    # the paper's "0.27M".
    net = build("resnet20")
    assert count_parameters(net) == 269_722
    assert round(count_parameters(net) / 1e6, 2) == 0.27


def test_resnet56_and_110_param_counts():
    n56 = count_parameters(build("resnet56"))
    n110 = count_parameters(build("resnet110"))
    assert abs(n56 - 0.85e6) <= 0.01e6, n56
    assert abs(n110 - 1.7e6) <= 0.05e6, n110
    assert n110 == 1_727_962  # option A; 1,730,714 with option-B projections


def test_wrn_28_10_param_count():
    # No conv biases (reference WRN code): 36,536,884 for 100 classes, 36,479,194 for 10.
    # With a bias on every conv (some implementations) it is the quoted 36,546,980.
    torch.manual_seed(0)
    net = build_model("wrn-28-10", num_classes=100)
    assert count_parameters(net) == 36_536_884
    assert round(count_parameters(net) / 1e6, 1) == 36.5
    assert len(net.blocks) == 12
    assert net.transition_indices() == [0, 4, 8]
    del net
    assert count_parameters(build_wrn(28, 10, num_classes=100, conv_bias=True)) == 36_546_980


def test_preact_and_norm_none_counts():
    bn = count_parameters(build("preact-resnet20"))
    none = count_parameters(build("preact-resnet20", norm="none"))
    # Preact: BN params move from after each conv to before it; same total as v1 here.
    assert bn == 269_722
    # norm="none" removes exactly the BN affine parameters.
    n_bn = sum(
        m.weight.numel() + m.bias.numel()
        for m in build("preact-resnet20").modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert none == bn - n_bn
    plain = build("resnet20", norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize(
    "name, n_blocks, transitions, block_cls",
    [
        ("resnet20", 9, [3, 6], BasicBlock),
        ("resnet56", 27, [9, 18], BasicBlock),
        ("preact-resnet20", 9, [3, 6], PreActBlock),
        ("wrn-16-2", 6, [0, 2, 4], WideBasicBlock),
        ("wrn-10-1", 3, [1, 2], WideBasicBlock),  # k=1: block 0 is 16->16, stride 1
    ],
)
def test_structure(name, n_blocks, transitions, block_cls):
    net = build(name)
    assert isinstance(net, StagedNet) and net.name == name
    assert len(net.blocks) == n_blocks
    assert all(isinstance(b, block_cls) for b in net.blocks)
    assert net.transition_indices() == transitions
    assert all(b.step == 1.0 for b in net.blocks)


def test_boundary_shapes_and_costs_resnet20():
    net = build("resnet20")
    shapes = net.boundary_shapes()
    assert shapes == [(16, 32, 32)] * 4 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3
    stem, blocks, head = net.costs()
    conv = 32 * 32 * 16 * 16 * 9  # MACs of one 16->16 conv at 32x32 (same for 32@16, 64@8)
    half = 16 * 16 * 32 * 16 * 9  # the stride-2 16->32 conv
    assert stem == 2 * 32 * 32 * 16 * 3 * 9
    assert head == 2 * 64 * 10
    assert blocks == [4 * conv] * 3 + [2 * (half + conv)] + [4 * conv] * 2 + [
        2 * (half + conv)
    ] + [4 * conv] * 2
    assert net.block_costs(batch_size=8) == [8 * b for b in blocks]
    assert net.stem_cost() == stem and net.head_cost() == head
    assert net.total_flops() == 81_102_080  # 40.55M MACs, the usual ResNet-20 figure


def test_digits_shapes():
    net = build("resnet20", in_channels=1, input_size=8)
    assert net.boundary_shapes()[-1] == (64, 2, 2)
    assert net(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    net = build("wrn-16-2", num_classes=100)
    assert net.boundary_shapes()[-1] == (128, 8, 8)


def test_trace_restores_modes_and_leaves_state_alone():
    net = build("wrn-10-1", dropout=0.3)
    net.train()
    net.blocks[1].eval()  # a mixed mode must survive the trace
    bn = net.blocks[0].bn1
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    rng = torch.get_rng_state()
    net.boundary_shapes()
    assert net.training and net.blocks[0].training and not net.blocks[1].training
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])
    assert torch.equal(torch.get_rng_state(), rng)  # partitioning never consumes RNG
    net.partition(2)
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------- transparency
CASES = [
    ("resnet20", 3, 32),
    ("resnet20", 1, 8),
    ("preact-resnet20", 3, 16),
    ("wrn-16-2", 3, 16),
]


@pytest.mark.parametrize("name, channels, size", CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_staged_forward_equals_serial(name, channels, size, mode):
    net = build(name, in_channels=channels, input_size=size)
    x = skewed_input(6, channels, size)
    net.train(mode == "train")
    # Train mode: BN uses batch statistics of this same x, so the result is deterministic.
    with torch.no_grad():
        ref = net(x)
        for K in (1, 2, 3, 4):
            stages = net.partition(K)
            assert [s.index for s in stages] == list(range(K))
            assert all(s.training == net.training for s in stages)
            h = x
            for s in stages:
                assert tuple(h.shape[1:]) == s.in_shape
                h = s(h)
                assert tuple(h.shape[1:]) == s.out_shape
            torch.testing.assert_close(h, ref, rtol=0, atol=1e-6)
    # Negative check: the comparison can fail (a different input gives different logits).
    with torch.no_grad():
        assert not torch.allclose(net(x.flip(0)), ref, rtol=0, atol=1e-6)


def test_staged_backward_equals_serial():
    net = build("resnet20", in_channels=1, input_size=8)
    x, y = skewed_input(4, 1, 8), torch.tensor([0, 3, 5, 9])
    torch.nn.functional.cross_entropy(net(x), y).backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    h = x
    for s in net.partition(3):
        h = s(h)
    torch.nn.functional.cross_entropy(h, y).backward()
    for p, g in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)


def test_stage_attributes():
    net = build("resnet20")
    stages = net.partition(3, split="2,4,3")
    s0, s1, s2 = stages
    assert isinstance(s0, Stage)
    assert [s.block_range for s in stages] == [(0, 2), (2, 6), (6, 9)]
    assert s0.is_first and not s0.is_last and s0.stem is net.stem and s0.head is None
    assert s2.is_last and s2.head is net.head and s2.stem is None
    assert s1.stem is None and s1.head is None and s1.num_stages == 3
    assert s0.in_shape == (3, 32, 32) and s0.out_shape == (16, 32, 32)
    assert s1.in_shape == (16, 32, 32) and s1.out_shape == (32, 16, 16)
    assert s2.in_shape == (32, 16, 16) and s2.out_shape == (10,)
    assert all(a is b for a, b in zip(s1.blocks, net.blocks[2:6]))  # references, not copies
    one = net.stage_module(1, 3, split=[2, 4, 3])
    assert one.block_range == (2, 6) and one.blocks[0] is net.blocks[2]
    with pytest.raises(ConfigError, match="out of range"):
        net.stage_module(3, 3)


def test_dropout_stage_matches_serial_with_same_rng():
    net = build("wrn-10-1", dropout=0.5, in_channels=1, input_size=8)
    x = skewed_input(4, 1, 8)
    torch.manual_seed(123)
    ref = net(x)
    torch.manual_seed(123)
    h = x
    for s in net.partition(3):
        h = s(h)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-6)
    torch.manual_seed(124)
    assert not torch.allclose(net(x), ref)  # dropout is live in train mode


# ---------------------------------------------------------------------- initialization
def test_initial_parameters_do_not_depend_on_K():
    net = build("resnet20", seed=0)
    full = list(net.parameters())
    for K in (1, 2, 4):
        staged = [p for s in net.partition(K) for p in s.parameters()]
        assert len(staged) == len(full)
        assert all(a is b for a, b in zip(staged, full))
        # A rank that builds from the seed and keeps only its stage sees the same tensors.
        for k in range(K):
            fresh = build("resnet20", seed=0).stage_module(k, K)
            mine = net.partition(K)[k]
            for a, b in zip(fresh.parameters(), mine.parameters()):
                assert torch.equal(a, b)


def test_same_seed_same_params_other_seed_different():
    a, b, c = build("wrn-10-1", seed=0), build("wrn-10-1", seed=0), build("wrn-10-1", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    conv_keys = [k for k in sa if k.endswith("conv1.weight") or k.endswith("fc.weight")]
    assert conv_keys and all(not torch.equal(sa[k], sc[k]) for k in conv_keys)


# ---------------------------------------------------------------------- balancing
def brute_force_best(weights: list[float], K: int) -> float:
    n = len(weights)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), K - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(weights[bounds[i] : bounds[i + 1]]) for i in range(K)))
    return best


def stage_costs(costs, counts) -> list[float]:
    stem, blocks, head = costs
    out, start = [], 0
    for k, c in enumerate(counts):
        v = sum(blocks[start : start + c])
        v += stem if k == 0 else 0
        v += head if k == len(counts) - 1 else 0
        out.append(v)
        start += c
    return out


def test_default_partition_resnet20_is_optimal():
    net = build("resnet20")
    stem, blocks, head = net.costs()
    for K in (2, 3, 4, 9):
        counts = partition_counts(net, K)
        assert len(counts) == K and sum(counts) == 9 and min(counts) >= 1
        folded = [blocks[0] + stem, *blocks[1:-1], blocks[-1] + head]
        assert max(stage_costs((stem, blocks, head), counts)) == brute_force_best(folded, K)
    assert partition_counts(net, 3) == [3, 3, 3]


def test_partition_optimal_on_random_costs():
    rnd = random.Random(0)
    for _ in range(40):
        n = rnd.randint(1, 10)
        blocks = [rnd.randint(1, 100) for _ in range(n)]
        stem, head = rnd.randint(0, 200), rnd.randint(0, 200)
        for K in range(1, n + 1):
            counts = partition_counts((stem, blocks, head), K)
            assert sum(counts) == n and len(counts) == K and min(counts) >= 1
            folded = [blocks[0] + stem, *blocks[1:-1], blocks[-1] + head] if n > 1 else [
                blocks[0] + stem + head
            ]
            got = max(stage_costs((stem, blocks, head), counts))
            assert got == brute_force_best(folded, K)


def test_heavy_head_moves_blocks_away_from_last_stage():
    # A costly head makes the last stage short; the flat-list form has no stem/head.
    assert partition_counts((0, [1] * 8, 6), 2) == [7, 1]
    assert partition_counts([1] * 8, 2) == [4, 4]


def test_explicit_split_respected():
    net = build("resnet20")
    assert partition_counts(net, 3, split="2,4,3") == [2, 4, 3]
    assert partition_counts(net, 3, split=[1, 1, 7]) == [1, 1, 7]
    assert partition_counts(net, None, split=" 5 , 4 ") == [5, 4]
    assert [s.block_range for s in net.partition(2, split=[8, 1])] == [(0, 8), (8, 9)]
    assert parse_split("4,4,4") == [4, 4, 4]


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "K, split, fragments",
    [
        (2, "4,4", ["sum to 8", "resnet20 has 9 blocks", "sum to 9"]),
        (3, "4,5", ["2 counts", "K=3", "exactly 3 counts"]),
        (2, "9,0", ["at least one block", "0", "positive"]),
        (2, "10,-1", ["at least one block", "-1"]),
        (2, "4,x", ["'x' is not an integer", "e.g. '3,3,3'"]),
        (2, "4,4.5", ["'4.5' is not an integer"]),
        (2, "", ["split is empty"]),
        (2, [4, 5.0], ["not an integer"]),
    ],
)
def test_illegal_split_messages(K, split, fragments):
    net = build("resnet20")
    with pytest.raises(ConfigError) as err:
        partition_counts(net, K, split=split)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


@pytest.mark.parametrize(
    "K, fragments",
    [
        (0, ["less than 1", "K >= 1"]),
        (-2, ["less than 1"]),
        (10, ["K=10", "only 9 blocks", "use K <= 9"]),
        (2.0, ["must be an integer"]),
    ],
)
def test_illegal_K_messages(K, fragments):
    net = build("resnet20")
    with pytest.raises(ConfigError) as err:
        net.partition(K)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


def test_split_too_long_for_model():
    with pytest.raises(ConfigError, match="only 9 blocks"):
        partition_counts(build("resnet20"), None, split=[1] * 10)


@pytest.mark.parametrize(
    "name", ["resnet21", "resnet2", "wrn-27-10", "wrn-28-0", "vgg16", "resnet"]
)
def test_unknown_or_illegal_model_names(name):
    with pytest.raises(ConfigError) as err:
        build_model(name)
    assert "valid model names" in str(err.value)


def test_model_name_parsing_and_options():
    assert parse_model_name("ResNet56") == ("resnet", 56, None)
    assert parse_model_name(" PreAct-ResNet110 ") == ("preact-resnet", 110, None)
    assert parse_model_name("WRN-28-10") == ("wrn", 28, 10)
    assert build("RESNET8").name == "resnet8" and len(build("resnet8").blocks) == 3
    assert "wrn-<D>-<k>" in MODEL_NAMES_HELP
    with pytest.raises(ConfigError, match="only WRN models have dropout"):
        build_model("resnet20", dropout=0.3)
    with pytest.raises(ConfigError, match="'bn'"):
        build_model("resnet20", norm="layer")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        build_model("wrn-10-1", dropout=1.0)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet20", num_classes=0)
    assert build("wrn-10-1", dropout=0.3).blocks[0].dropout.p == 0.3
    assert build("resnet20", norm="NONE") is not None


# ---------------------------------------------------------------------- step (h) scaling
@pytest.mark.parametrize("name", ["resnet20", "preact-resnet20", "wrn-10-1"])
def test_step_scaling(name):
    net = build(name, in_channels=1, input_size=8).eval()
    x = skewed_input(3, 1, 8)
    with torch.no_grad():
        ref = net(x)
        # h = 1 is the ordinary block, bitwise.
        h = net.stem(x)
        for b in net.blocks:
            plain = b.shortcut(h) + b.residual(h)
            if isinstance(b, BasicBlock):
                plain = torch.relu(plain)
            assert torch.equal(b(h), plain)
            h = b(h)
        net.set_step(0.5)
        assert all(b.step == 0.5 for b in net.blocks)
        assert not torch.allclose(net(x), ref)  # negative case: h changes the output
        h = net.stem(x)
        for b in net.blocks:
            expected = b.shortcut(h) + 0.5 * b.residual(h)
            if isinstance(b, BasicBlock):
                expected = torch.relu(expected)
            torch.testing.assert_close(b(h), expected, rtol=0, atol=1e-6)
            h = b(h)
        net.set_step(1.0)
        assert torch.equal(net(x), ref)


# ---------------------------------------------------------------------- describe_partition
def test_describe_partition_consistent():
    net = build("wrn-16-2", num_classes=100)
    rows = describe_partition(net, 4)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["params"] for r in rows) == count_parameters(net)
    assert sum(r["flops"] for r in rows) == net.total_flops()
    assert sum(r["blocks"] for r in rows) == len(net.blocks)
    stages = net.partition(4)
    for r, s in zip(rows, stages):
        assert tuple(r["block_range"]) == s.block_range
        assert r["out_shape"] == list(s.out_shape)
        if s.is_last:
            assert r["boundary_bytes_per_sample"] is None and r["out_shape"] == [100]
        else:
            c, h, w = r["out_shape"]
            assert r["boundary_bytes_per_sample"] == 4 * c * h * w
    assert [r["blocks"] for r in describe_partition(net, None, split="1,2,3")] == [1, 2, 3]
