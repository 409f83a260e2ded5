"""DDP over gloo ranks equals single-process training at the same global batch."""

from __future__ import annotations

import pytest
import torch

from auxpar.models import build_model
from conftest import read_summary, run_cli

# No batch norm: per-rank batch statistics would legitimately differ from the global batch's.
# Two steps of a global batch of 480 digits: a norm-free ResNet-20 amplifies float rounding
# (summation order of the all-reduce) by ~10x per step, so a long run can only agree loosely;
# two steps must agree to 1e-4 of the size of the update itself.
COMMON = ("--dataset", "digits", "--model", "resnet20", "--norm", "none", "--epochs", "1",
          "--batch-size", "480", "--lr", "0.05", "--no-augment", "--seed", "3", "--eval-every", "1")


def _params(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
# 4 processes on CI's 2 cores (25 s): a benchmark; the DDP protocol test and the 2-process case run in CI
@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.benchmark)])
def test_ddp_update_equals_serial(tmp_path, nproc):
    serial, ddp = tmp_path / "serial", tmp_path / "ddp"
    r1 = run_cli("train", *COMMON, "--method", "serial", "--out", str(serial), "--threads", "1")
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("train", *COMMON, "--method", "ddp", "--nproc", str(nproc), "--out", str(ddp), timeout=240)
    assert r2.returncode == 0, r2.stderr
    a, b = _params(serial), _params(ddp)
    init = tmp_path / "init"  # the negative case: the same run with other data order differs
    r3 = run_cli("train", *COMMON[:-4], "--seed", "4", "--eval-every", "1", "--method", "serial",
                 "--out", str(init), "--threads", "1")
    assert r3.returncode == 0, r3.stderr
    assert _max_diff(a, _params(init)) > 1e-3
    torch.manual_seed(3)  # the trainer's initial model: seed, then build (nothing random before)
    net0 = build_model("resnet20", in_channels=1, input_size=8, num_classes=10, norm="none")
    update = _max_diff(a, net0.state_dict())
    assert update > 1e-3  # the two steps really moved the parameters
    assert _max_diff(a, b) < 1e-4 * update, (_max_diff(a, b), update)

    s_serial, s_ddp = read_summary(serial), read_summary(ddp)
    assert s_ddp["world_size"] == nproc and s_ddp["steps"] == s_serial["steps"]
    assert s_ddp["steps"] == 2
    assert s_ddp["final_test_acc"] == pytest.approx(s_serial["final_test_acc"], abs=1e-9)
    assert s_ddp["final_train_loss"] == pytest.approx(s_serial["final_train_loss"], rel=1e-5)
    # Ring all-reduce volume: every step all-reduces all gradients once.
    n_params = s_ddp["params"]
    per_rank = 2 * (nproc - 1) / nproc * n_params * 4 * s_ddp["steps"]
    assert s_ddp["comm_bytes"] == pytest.approx(nproc * per_rank, rel=1e-6)
    assert len(s_ddp["peak_memory_bytes_per_rank"]) == nproc
