"""Every bad-input category ends in one clear message and a non-zero exit (never a hang)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

SMALL = ("--dataset", "synthetic", "--epochs", "1", "--batch-size", "16",
         "--set", "data.synthetic_num_train=32", "--set", "data.synthetic_num_test=16",
         "--set", "data.synthetic_shape=[3, 8, 8]")


def _one_error(res, code, *words):
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("auxpar: error:") == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def test_unknown_toml_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlearning_rate = 0.1\n')
    _one_error(run_cli("train", "--config", str(p), "--out", str(tmp_path / "r")), 2,
               "optim.learning_rate", "valid keys")


def test_wrong_type_in_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[run]\nepochs = "ten"\n')
    _one_error(run_cli("train", "--config", str(p)), 2, "run.epochs", "whole number")


def test_missing_config_file(tmp_path):
    _one_error(run_cli("train", "--config", str(tmp_path / "missing.toml")), 2, "does not exist")


def test_bad_set_override():
    _one_error(run_cli("train", "--set", "optim.lr"), 2, "section.key=value")


def test_unknown_model_name(tmp_path):
    _one_error(run_cli("train", *SMALL, "--model", "resnet21", "--out", str(tmp_path / "r")), 2, "resnet21")


def test_illegal_split_in_plan():
    _one_error(run_cli("plan", "--model", "resnet20", "--dataset", "digits", "--split", "4,4"), 2, "9")
    _one_error(run_cli("plan", "--model", "resnet20", "--dataset", "digits", "--stages", "12"), 2, "12")


def test_serial_with_two_processes_is_refused(tmp_path):
    res = run_cli("train", *SMALL, "--method", "serial", "--nproc", "2", "--out", str(tmp_path / "r"), timeout=120)
    _one_error(res, 2, "--method serial", "--method ddp")


def test_serial_with_stages_is_refused(tmp_path):
    _one_error(run_cli("train", *SMALL, "--stages", "2", "--out", str(tmp_path / "r")), 2, "--stages 2")


def test_ddp_with_stages_is_refused(tmp_path):
    res = run_cli("train", *SMALL, "--method", "ddp", "--stages", "2", "--nproc", "2",
                  "--out", str(tmp_path / "r"), timeout=120)
    _one_error(res, 2, "--stages")


def test_ddp_batch_not_divisible(tmp_path):
    res = run_cli("train", *SMALL[:4], "--batch-size", "15", *SMALL[6:], "--method", "ddp", "--nproc", "2",
                  "--out", str(tmp_path / "r"), timeout=120)
    _one_error(res, 2, "--batch-size 15")


def test_missing_cifar_without_download(tmp_path):
    res = run_cli("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-download",
                  "--out", str(tmp_path / "r"))
    _one_error(res, 3, "cifar-10-python.tar.gz")


def test_plan_wrn_28_10_cifar100_json():
    res = run_cli("plan", "--model", "wrn-28-10", "--dataset", "cifar100", "--stages", "4", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["params"] == 36_536_884  # published 36.5M (no conv bias)
    rows = plan["stage_rows"]
    assert len(rows) == 4 and sum(r["blocks"] for r in rows) == 12
    assert sum(r["params"] for r in rows) == plan["params"]
    assert rows[-1]["boundary_bytes_per_sample"] is None
    for r in rows[:-1]:
        c, h, w = r["out_shape"]
        assert r["boundary_bytes_per_sample"] == 4 * c * h * w
    # fp32 aux store at s=1 is N_train * values * 4 bytes; s=2 is 4x smaller when H, W are even.
    mem = {(m["ds_factor"], m["dtype"]): m["aux_bytes"] for m in plan["aux_memory"]}
    assert mem[(1, "fp32")] == 50_000 * plan["boundary_values_per_sample"] * 4
    assert mem[(2, "fp32")] * 4 == mem[(1, "fp32")]


def test_plan_text_and_explicit_split():
    res = run_cli("plan", "--model", "resnet56", "--dataset", "cifar10", "--split", "9,9,9")
    assert res.returncode == 0, res.stderr
    assert "balance" in res.stdout and "stage" in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith(("0 ", "1 ", "2 "))]
    assert len(lines) == 3


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["plan", "--help"]])
def test_help(argv):
    res = run_cli(*argv)
    assert res.returncode == 0 and "usage" in res.stdout


def _torchrun(*args, nproc=2, timeout=180):
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "auxpar", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT)


@pytest.mark.slow
def test_torchrun_ddp_and_threads(tmp_path):
    out = tmp_path / "tr"
    res = _torchrun("train", *SMALL, "--method", "ddp", "--threads", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["threads"] == 1 and s["backend"] == "gloo"
    assert s["comm_bytes"] > 0
    # Under torchrun, the wrong world size for the method is one clear message from rank 0.
    res = _torchrun("train", *SMALL, "--method", "serial", "--out", str(tmp_path / "bad"))
    assert res.returncode != 0
    assert res.stderr.count("auxpar: error:") == 1 and "--method serial" in res.stderr


def test_console_script_is_installed():
    import shutil
    import subprocess

    exe = shutil.which("auxpar")
    if exe is None:
        pytest.skip("package not installed with pip (console script absent)")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "train" in res.stdout


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run_cli("train", *SMALL, "--out", str(blocker / "run"))
    _one_error(res, 2, "cannot write the run directory", "--out")
