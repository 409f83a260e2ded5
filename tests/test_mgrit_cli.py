"""MGRIT through the CLI, as a user runs it: exact training = serial, one-shot accuracy, --dp, errors.

ResNet-14 has 6 blocks with transitions at blocks 2 and 4. With ``--mgrit-cfactor 3`` the two
level-1 intervals are [0, 1, 2] -> ops (0, 2h), (2, h) and [3, 4, 5] -> (3, 2h), (4, h): both
lump ordinary blocks and keep a transition, so neither coarse step is exact, and the exactness
bound is N_c = 2 iterations.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_summary, run_cli

pytestmark = pytest.mark.slow

DIGITS = ("--dataset", "digits", "--model", "resnet14", "--seed", "0", "--threads", "1", "--progress", "off")
EXACT = ("--mgrit-cfactor", "3", "--mgrit-fwd-iters", "2", "--mgrit-bwd-iters", "2", "--mgrit-relax", "F")


def _steps(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def _state(run_dir):
    d = torch.load(run_dir / "model.pt", weights_only=True)
    return d.get("state_dict", d)


def test_exact_mgrit_training_follows_the_serial_loss_curve(tmp_path):
    common = (*DIGITS, "--norm", "none", "--no-augment", "--epochs", "1", "--log-every", "1")
    r1 = run_cli("train", *common, "--method", "serial", "--out", str(tmp_path / "serial"))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("train", *common, "--method", "mgrit", "--stages", "2", *EXACT, "--out", str(tmp_path / "mgrit"))
    assert r2.returncode == 0, r2.stderr
    s, m = _steps(tmp_path / "serial"), _steps(tmp_path / "mgrit")
    assert len(s) == len(m) == 22  # 1437 digits // 64
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(s, m))
    assert worst <= 1e-5, worst
    assert s[-1]["loss"] < s[0]["loss"] - 0.3  # the curve really moves
    for rec in m:
        assert rec["mgrit_iters"] == {"fwd": 2, "bwd": 2}
        assert len(rec["mgrit_residuals"]["fwd"]) == 3 and rec["mgrit_residuals"]["fwd"][-1] <= 1e-4
        assert rec["mgrit_residuals"]["bwd"][-1] <= 1e-6
    summ = read_summary(tmp_path / "mgrit")
    assert summ["split"] == [3, 3] and summ["mgrit_exact_iters"] == 2
    assert summ["final_test_acc"] == pytest.approx(read_summary(tmp_path / "serial")["final_test_acc"], abs=1e-9)


# One-shot training (defaults: 2 levels, m = 2, 2 forward and 1 adjoint FCF iterations, warm start)
# against serial backprop on the digits recipe (BN, augmentation, cosine lr), ResNet-20, 3 epochs.
# Measured here (x86_64, 2 cores, torch 2.13 CPU; serial --threads 1, MGRIT 2 ranks x 1 thread),
# final test accuracy for seeds 0/1/2: serial 95.00/94.72/96.67%, one-shot MGRIT 93.89/94.44/95.00%
# (mean gap 1.0 point; after 15 epochs: serial 98.70%, MGRIT 98.61% on average). The floor and the
# allowed gap leave room for thread-count and platform rounding (different runs, not a tuned edge).
ONE_SHOT_FLOOR = 0.90
ONE_SHOT_GAP = 0.05


def test_one_shot_mgrit_reaches_serial_accuracy_on_digits(tmp_path):
    common = (*DIGITS, "--model", "resnet20", "--epochs", "3")
    r1 = run_cli("train", *common, "--method", "serial", "--out", str(tmp_path / "serial"))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("train", *common, "--method", "mgrit", "--stages", "2", "--out", str(tmp_path / "mgrit"))
    assert r2.returncode == 0, r2.stderr
    acc_s = read_summary(tmp_path / "serial")["final_test_acc"]
    summ = read_summary(tmp_path / "mgrit")
    acc_m = summ["final_test_acc"]
    print(f"digits ResNet-20, 3 epochs: serial {acc_s:.4f}, one-shot MGRIT K=2 {acc_m:.4f}")
    assert acc_m >= ONE_SHOT_FLOOR and acc_m >= acc_s - ONE_SHOT_GAP, (acc_m, acc_s)
    assert summ["mgrit_iters"] == {"fwd": 2.0, "bwd": 1.0}
    epochs = [r for r in map(json.loads, (tmp_path / "mgrit" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert epochs[-1]["mgrit_iters"] == {"fwd": 2.0, "bwd": 1.0}
    assert len(epochs[-1]["time_compute_s"]) == 2 and summ["mgrit_convergence_factor"]["fwd"] is not None


def test_dp2_update_equals_dp1(tmp_path):
    # No BN (per-replica batch statistics would differ), no warm start (its batch means would be
    # per replica): then every sample's MGRIT iterates are those of the --dp 1 run, and the
    # averaged gradient is the global batch's. Two steps of a global batch of 480.
    common = (*DIGITS, "--norm", "none", "--no-augment", "--epochs", "1", "--batch-size", "480", "--lr", "0.05",
              "--method", "mgrit", "--stages", "2", "--mgrit-no-warm-start")
    r1 = run_cli("train", *common, "--out", str(tmp_path / "dp1"))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("train", *common, "--dp", "2", "--out", str(tmp_path / "dp2"), timeout=240)
    assert r2.returncode == 0, r2.stderr
    a, b = _state(tmp_path / "dp1"), _state(tmp_path / "dp2")
    assert a.keys() == b.keys()
    torch.manual_seed(0)
    from auxpar.models import build_model

    init = build_model("resnet14", in_channels=1, input_size=8, num_classes=10, norm="none").state_dict()
    update = max((a[k] - init[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert update > 1e-3 and diff <= 1e-4 * update, (diff, update)
    s1, s2 = read_summary(tmp_path / "dp1"), read_summary(tmp_path / "dp2")
    assert s2["world_size"] == 4 and s2["steps"] == s1["steps"] == 2
    assert s2["final_train_loss"] == pytest.approx(s1["final_train_loss"], rel=1e-5)
    assert s2["final_test_acc"] == pytest.approx(s1["final_test_acc"], abs=1e-9)


def test_bad_mgrit_settings_exit_with_a_clear_message(tmp_path):
    r = run_cli("train", *DIGITS, "--model", "resnet20", "--method", "mgrit", "--stages", "2", "--split", "3,6",
                "--epochs", "1", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2
    assert "cfactor does not divide rank 0's chunk" in r.stderr and "--split 4,5" in r.stderr, r.stderr
    assert r.stderr.count("auxpar: error:") == 1  # said once, not once per rank
