"""Reliability through the real CLI (and torchrun): exact resume, atomic checkpoints, elastic
restarts, the NaN guard, timeouts, failures on one rank, export, and the bad-input suite."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from auxpar.errors import TrainingError
from auxpar.metrics import read_metrics
from conftest import ROOT, cli_env, read_summary, run_cli
from mp_harness import run_ranks
from test_checkpoint import _setup

DIGITS = ("--dataset", "digits", "--progress", "off", "--log-every", "1")


def _steps(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]


def _epochs(run_dir):
    return [(r["epoch"], r["train_loss"], r["test_acc"], r["residual"])
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]


def _run_env(*args, env_extra=None, timeout=300):
    env = cli_env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "auxpar", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- exact resume

def test_exact_resume_serial_bitwise(tmp_path):
    args = ("train", "--method", "serial", *DIGITS, "--epochs", "2", "--checkpoint-every", "10s")
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_cli(*args, "--out", str(full))
    assert r.returncode == 0, r.stderr
    r = _run_env(*args, "--out", str(cut), env_extra={"AUXPAR_FAULT": "kill:0:35"})
    assert r.returncode == -9  # killed mid-epoch 2, after the step-30 checkpoint
    assert not (cut / "summary.json").exists()
    r = run_cli(*args, "--out", str(cut), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step-000000030" in r.stdout
    a, b = _steps(full), _steps(cut)
    assert len(a) == 44 and a == b  # bitwise-identical per-step losses (floats compared exactly)
    assert _epochs(full) == _epochs(cut)
    assert read_summary(cut)["resumed_from_step"] == 30


def test_exact_resume_penalty_two_ranks_across_a_phase_switch(tmp_path):
    # schedule parallel:2,serial:1 -> epoch 3 is serial; the kill at step 52 is inside it, the
    # last checkpoint (step 45) is in the serial phase, after the switch from parallel.
    args = ("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "4",
            "--checkpoint-every", "15s")
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_cli(*args, "--out", str(full))
    assert r.returncode == 0, r.stderr
    r = _run_env(*args, "--out", str(cut), env_extra={"AUXPAR_FAULT": "kill:1:52"})
    assert r.returncode != 0 and "rank 1 was killed by signal 9" in r.stderr
    r = run_cli(*args, "--out", str(cut), "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert _steps(full) == _steps(cut) and len(_steps(full)) == 88
    assert _epochs(full) == _epochs(cut)  # incl. the per-boundary residuals of parallel epochs
    sf, sc = read_summary(full), read_summary(cut)
    assert sf["comm_bytes"] == sc["comm_bytes"] and sf["final_test_acc"] == sc["final_test_acc"]
    assert sc["checkpoint_bytes"] > 0


def test_atomic_checkpoint_failure_before_manifest_keeps_previous(tmp_path):
    args = ("train", "--method", "serial", *DIGITS, "--epochs", "2", "--checkpoint-every", "10s")
    run = tmp_path / "run"
    r = _run_env(*args, "--out", str(run), env_extra={"AUXPAR_FAULT": "ckpt:0:20"})
    assert r.returncode == -9
    ck = run / "checkpoints"
    prev, torn = ck / "step-000000010", ck / "step-000000020"
    assert (torn / "rank-00000.pt").exists() and not (torn / "manifest.json").exists()
    man = json.loads((prev / "manifest.json").read_text())
    # byte-identical to what was recorded when it was written, and the one that resume picks
    assert _sha(prev / "rank-00000.pt") == man["files"]["rank-00000.pt"]["sha256"]
    r = run_cli(*args, "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert "step-000000010" in r.stdout
    full = tmp_path / "full"
    assert run_cli(*args, "--out", str(full)).returncode == 0
    assert _steps(full) == _steps(run)


# --------------------------------------------------------------------------- torchrun restarts

def _torchrun(*args, restarts=1, env_extra=None, timeout=240):
    env = cli_env()
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "auxpar", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_and_matches_uninterrupted(tmp_path):
    args = ("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "3",
            "--checkpoint-every", "10s")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(*args, "--out", str(full)).returncode == 0
    r = _torchrun(*args, "--out", str(cut), env_extra={"AUXPAR_FAULT": "kill:1:27"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchrun restart 1" in r.stdout + r.stderr
    assert _steps(full) == _steps(cut)
    assert _epochs(full) == _epochs(cut)  # final metrics equal the uninterrupted run's
    assert read_summary(cut)["resumed_from_step"] == 20


@pytest.mark.slow
def test_torchrun_worker_that_always_fails_exhausts_restarts(tmp_path):
    t0 = time.monotonic()
    r = _torchrun("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "2",
                  "--out", str(tmp_path / "r"), env_extra={"AUXPAR_FAULT": "kill:1:3:always"}, timeout=200)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 150
    assert not (tmp_path / "r" / "summary.json").exists()


# --------------------------------------------------------------------------- NaN guard

def _nan_on_rank(rank, world, run_dir, bad_rank):
    cfg, info, m, loader = _setup("penalty", rank, world, run_dir)
    loader.set_epoch(0)
    m.begin_epoch(0, "parallel")
    batches = iter(loader)
    m.set_lr(0.1)
    m.step_index = 1
    m.train_step(next(batches), "parallel")
    before = {k: v.clone() for k, v in m.stage.state_dict().items()}
    mom = [v["momentum_buffer"].clone() for v in m.opt.state.values()]
    z = m.store.z.clone() if m.store is not None else None
    m.step_index = 2
    m.poison = rank == bad_rank
    try:
        m.train_step(next(batches), "parallel")
        err = None
    except TrainingError as exc:
        err = str(exc)
    same = all(torch.equal(before[k], v) for k, v in m.stage.state_dict().items())
    same_mom = all(torch.equal(a, v["momentum_buffer"]) for a, v in zip(mom, m.opt.state.values()))
    same_z = z is None or torch.equal(z, m.store.z)
    return err, same, same_mom, same_z


def test_nan_on_middle_stage_of_four_stops_all_ranks_parameters_unchanged(tmp_path):
    out = run_ranks(_nan_on_rank, 4, str(tmp_path / "r"), 2)
    for rank, (err, same, same_mom, same_z) in enumerate(out):
        assert err is not None, f"rank {rank} did not stop"
        assert "step 2" in err and "rank 2 (stage 2 of 4)" in err
        assert same and same_mom and same_z, f"rank {rank} changed its state"


def test_nan_cli_message_names_stage_and_checkpoint_stays(tmp_path):
    run = tmp_path / "r"
    r = _run_env("train", "--method", "penalty", "--stages", "4", *DIGITS, "--epochs", "2",
                 "--checkpoint-every", "5s", "--out", str(run), env_extra={"AUXPAR_FAULT": "nan:2:8"})
    assert r.returncode == 4, r.stderr
    assert "non-finite loss at step 8 on rank 2 (stage 2 of 4)" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("auxpar: error:") == 1
    man = json.loads((run / "checkpoints" / "step-000000005" / "manifest.json").read_text())
    for name, meta in man["files"].items():
        assert _sha(run / "checkpoints" / "step-000000005" / name) == meta["sha256"]


def test_nan_skip_policy_drops_the_step_and_goes_on(tmp_path):
    run = tmp_path / "r"
    r = _run_env("train", "--method", "serial", *DIGITS, "--epochs", "1", "--on-nan", "skip",
                 "--out", str(run), env_extra={"AUXPAR_FAULT": "nan:0:4"})
    assert r.returncode == 0, r.stderr
    assert read_summary(run)["skipped_steps"] == 1


# --------------------------------------------------------------------------- failures and timeouts

def test_stalled_rank_triggers_the_timeout_within_the_bound(tmp_path):
    t0 = time.monotonic()
    r = _run_env("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "2", "--timeout", "5",
                 "--out", str(tmp_path / "r"), env_extra={"AUXPAR_FAULT": "stall:1:3"}, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "5 s timeout" in r.stderr and "Traceback" not in r.stderr
    assert took < 60, f"took {took:.0f}s"


def test_exception_on_one_rank_ends_the_job_and_names_the_rank(tmp_path):
    t0 = time.monotonic()
    r = _run_env("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "2", "--timeout", "20",
                 "--out", str(tmp_path / "r"), env_extra={"AUXPAR_FAULT": "raise:1:3"}, timeout=120)
    assert r.returncode != 0
    assert "rank 1 exited with code 1" in r.stderr and "injected failure" in r.stderr
    assert time.monotonic() - t0 < 60


# --------------------------------------------------------------------------- export / eval

def test_export_penalty_two_stages_evaluates_to_the_runs_accuracy(tmp_path):
    run = tmp_path / "r"
    r = run_cli("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "2",
                "--checkpoint-every", "1", "--out", str(run))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(run), "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 0, r.stderr
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    from auxpar.models import build_model

    net = build_model(**{k: obj["arch"][k] for k in ("name",)}, **{k: v for k, v in obj["arch"].items() if k != "name"})
    net.load_state_dict(obj["state_dict"])  # ordinary serial model, weights_only
    r = run_cli("eval", str(tmp_path / "m.pt"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["test_acc"] == read_summary(run)["final_test_acc"]
    assert res["samples"] == 360


# --------------------------------------------------------------------------- bad input

def _one_clear_error(r, *fragments, code=None):
    assert r.returncode != 0
    if code is not None:
        assert r.returncode == code
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("auxpar: error:") == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, r.stderr


def test_bad_input_suite(tmp_path):
    # bad config
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optim]\nlrr = 0.1\n")
    _one_clear_error(run_cli("train", "--config", str(cfg)), "unknown key optim.lrr")
    # missing data
    _one_clear_error(run_cli("train", "--dataset", "cifar10", "--no-download", "--data-dir", str(tmp_path / "d"),
                             "--out", str(tmp_path / "o1")), "cifar-10-python.tar.gz")
    # tampered data: the archive does not match the official checksum
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "cifar-10-python.tar.gz").write_bytes(os.urandom(2000))
    _one_clear_error(run_cli("train", "--dataset", "cifar10", "--no-download", "--data-dir", str(tmp_path / "d2"),
                             "--out", str(tmp_path / "o2")), "MD5")
    # world size that does not match the stages
    r = run_cli("train", "--method", "penalty", "--stages", "2", "--nproc", "3", *DIGITS, "--out", str(tmp_path / "o3"))
    assert r.returncode != 0 and "needs exactly 2 processes" in r.stderr and "Traceback" not in r.stderr
    # unwritable output directory (a path below a regular file)
    (tmp_path / "file").write_text("x")
    _one_clear_error(run_cli("train", *DIGITS, "--epochs", "1", "--out", str(tmp_path / "file" / "run")),
                     "choose a writable --out")
    # --debug shows the traceback instead
    r = run_cli("train", "--config", str(cfg), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_corrupt_and_foreign_checkpoints_are_refused_and_nothing_is_damaged(tmp_path):
    run = tmp_path / "r"
    args = ("train", "--method", "serial", *DIGITS, "--epochs", "2", "--checkpoint-every", "1", "--out", str(run))
    assert run_cli(*args).returncode == 0
    (run / "summary.json").unlink()  # pretend it was interrupted after its last checkpoint
    before = {p.name: _sha(p) for p in run.iterdir() if p.is_file()}
    ck = run / "checkpoints" / "step-000000044" / "rank-00000.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    ck.write_bytes(bytes(data))
    _one_clear_error(run_cli(*args, "--resume", str(ck.parent)), "does not match its manifest", code=2)
    # a checkpoint from another method / K
    other = tmp_path / "p"
    assert run_cli("train", "--method", "penalty", "--stages", "2", *DIGITS, "--epochs", "1",
                   "--checkpoint-every", "1", "--out", str(other)).returncode == 0
    _one_clear_error(run_cli(*args, "--resume", str(other)), "different run", "--method penalty")
    # a file that is not a checkpoint at all
    _one_clear_error(run_cli("eval", str(ck)), "not an auxpar")
    after = {p.name: _sha(p) for p in run.iterdir() if p.is_file()}
    assert before == after  # config.toml, metrics.jsonl, model.pt untouched
    # and without --resume an unfinished run directory is not silently overwritten
    _one_clear_error(run_cli(*args), "holds checkpoints of an unfinished run")
