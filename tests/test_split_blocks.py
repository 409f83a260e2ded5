"""model.split_blocks: a block cut in two units so a stage boundary can fall inside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auxpar.config import build_config
from auxpar.errors import ConfigError
from auxpar.export import load_model
from auxpar.models import build_model
from auxpar.models.staged import staged_net
from auxpar.plan import format_plan, make_plan
from conftest import read_summary, run_cli

MODELS = ["resnet20", "preact-resnet20", "wrn-16-2"]


def _net(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, in_channels=1, input_size=28, num_classes=10)


@pytest.mark.parametrize("name", MODELS)
def test_cut_net_is_the_same_function_with_the_same_parameters(name):
    net = _net(name)
    cut = [0, net.transition_indices()[-1]]
    sp = net.split_blocks(cut)
    assert len(sp.blocks) == len(net.blocks) + 2
    assert sp.cut_blocks == tuple(sorted(set(cut)))
    # the very same parameter objects, none lost or duplicated
    assert {id(p) for p in sp.parameters()} == {id(p) for p in net.parameters()}
    # keys map back onto the uncut net's, one to one
    mapped = [sp.original_key(k) for k in sp.state_dict()]
    assert sorted(mapped) == sorted(net.state_dict()) and len(set(mapped)) == len(mapped)
    x = torch.randn(6, 1, 28, 28)
    net.eval(), sp.eval()
    with torch.no_grad():
        assert torch.equal(sp(x), net(x))
    # training mode: the same loss and the same gradients, parameter by parameter
    net.train(), sp.train()
    y = torch.randint(0, 10, (6,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    ref = {id(p): p.grad.clone() for p in net.parameters()}
    net.zero_grad()
    torch.nn.functional.cross_entropy(sp(x), y).backward()
    for p in sp.parameters():
        torch.testing.assert_close(p.grad, ref[id(p)], rtol=1e-4, atol=1e-6)


def test_unit_names_stage_block_ids_and_a_cut_inside_a_block():
    sp = _net("resnet20").split_blocks([3])
    assert sp.unit_names() == ["0", "1", "2", "3a", "3b", "4", "5", "6", "7", "8"]
    s0, s1 = sp.partition(2, [4, 6])
    assert s0.block_ids == (0, 1, 2, 3) and s1.block_ids == (3, 4, 5, 6, 7, 8)
    # the state between the halves: 32 activation channels + 16 subsampled shortcut channels at 14x14
    assert s0.out_shape == (48, 14, 14) and s1.in_shape == (48, 14, 14)
    net = _net("resnet20")
    net.eval(), sp.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(s1(s0(x)), net(x))
    # the halves own disjoint parts of block 3: stage 0 its first conv and BN, stage 1 the rest
    k0 = {k for k in s0.state_dict() if k.startswith("blocks.3.")}
    k1 = {k for k in s1.state_dict() if k.startswith("blocks.0.")}
    assert k0 and k1 and {k.split(".")[2] for k in k0} == {"conv1", "bn1"}
    assert {k.split(".")[2] for k in k1} == {"conv2", "bn2"}


def test_an_uncut_net_is_unchanged():
    net = _net("resnet20")
    assert net.split_blocks([]) is net
    assert net.block_ids == tuple(range(9)) and net.unit_names() == [str(i) for i in range(9)]


def test_bad_cuts_are_clear_errors():
    net = _net("resnet20")
    with pytest.raises(ConfigError, match=r"blocks 0\.\.8, so \[9\] do not exist"):
        net.split_blocks([9])
    with pytest.raises(ConfigError, match="already cut"):
        net.split_blocks([3]).split_blocks([4])

    class Plain(nn.Module):
        def forward(self, x):
            return x + torch.relu(x)

    user = staged_net(nn.Conv2d(1, 4, 3, padding=1), [Plain(), Plain()], nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)), input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"block 1 \(Plain\).*no split\(\) method"):
        user.split_blocks([1])
    with pytest.raises(ConfigError, match="names a block twice"):
        build_config({"model": {"split_blocks": [3, 3]}})
    with pytest.raises(ConfigError, match="block indices"):
        build_config({"model": {"split_blocks": [-1]}})
    with pytest.raises(ConfigError, match="does not run with --method mgrit"):
        build_config({"run": {"method": "mgrit"}, "model": {"split_blocks": [3]}})


def test_plan_counts_units_and_names_the_halves():
    data = build_config({"data": {"dataset": "fashion-mnist"}}).data
    plan = make_plan("resnet20", data, 2, [4, 6], split_blocks=[3])
    assert [r["units"] for r in plan["stage_rows"]] == ["0-3a", "3b-8"]
    assert plan["stage_rows"][0]["boundary_bytes_per_sample"] == 4 * 48 * 14 * 14
    text = format_plan(plan)
    assert "0-3a" in text and "blocks cut in two (model.split_blocks): 3" in text
    whole = make_plan("resnet20", data, 2, [4, 5])
    assert [r["units"] for r in whole["stage_rows"]] == ["0-3", "4-8"] and not whole["split_blocks"]


@pytest.mark.slow
def test_a_run_cut_inside_a_block_trains_writes_an_ordinary_model_and_resumes_only_alike(tmp_path):
    out = tmp_path / "cut"
    args = ["--dataset", "digits", "--model", "resnet20", "--method", "penalty", "--stages", "2", "--nproc", "2",
            "--split-blocks", "3", "--split", "4,6", "--batch-size", "64", "--progress", "off",
            "--set", "data.train_subset=512"]
    res = run_cli("train", "--out", str(out), "--epochs", "2", "--checkpoint-every", "1", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    s = read_summary(out)
    assert s["split"] == [4, 6] and s["final_test_acc"] > 0.3
    # model.pt is the uncut resnet20's state_dict: it loads into build_model as any other run's
    net, meta = load_model(out / "model.pt")
    assert len(net.blocks) == 9
    # so does a checkpoint's export (every rank's share under the uncut keys), with the same weights
    res = run_cli("export", str(out), "--out", str(tmp_path / "export.pt"))
    assert res.returncode == 0, res.stderr[-2000:]
    exported, _ = load_model(tmp_path / "export.pt")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), net.state_dict().values()))
    # a resume must keep the cut (the units are what the checkpoint's stages hold)
    res = run_cli("train", "--out", str(tmp_path / "other"), "--epochs", "3", "--resume", str(out),
                  *[a if a != "3" else "4" for a in args])
    assert res.returncode != 0
    assert "--split-blocks [3] (checkpoint) vs [4] (this run)" in res.stderr
