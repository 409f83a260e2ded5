"""End-to-end training through the CLI: the serial baseline on real data, and its run directory."""

from __future__ import annotations

import json
import time

import pytest

from auxpar.metrics import SUMMARY_KEYS, epoch_keys, read_metrics
from conftest import ROOT, read_summary, run_cli


@pytest.mark.slow
def test_serial_resnet20_digits_reaches_95_percent_in_under_a_minute(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = run_cli("train", "--config", "experiments/configs/serial-resnet20-digits.toml",
                  "--out", str(out), "--threads", "2", timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr + res.stdout
    s = read_summary(out)
    assert s["final_test_acc"] >= 0.95, s
    assert elapsed < 60, f"took {elapsed:.1f}s"
    # Fixed schemas: every summary key and every epoch-record key is present.
    assert set(SUMMARY_KEYS) <= set(s)
    assert s["method"] == "serial" and s["world_size"] == 1 and s["epochs"] == 15
    assert 0 < s["train_time_s"] < s["wall_time_s"]
    assert s["phase_times_s"]["serial"] == pytest.approx(s["train_time_s"])
    assert s["comm_bytes"] == 0 and s["peak_memory_bytes"] > 0
    recs = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(epochs) == 15 and all(tuple(r) == epoch_keys() for r in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert (out / "config.toml").is_file() and (out / "model.pt").is_file()
    # One readable line per epoch on stdout.
    assert res.stdout.count("epoch ") >= 15


def test_short_run_outputs_and_no_overwrite(tmp_path):
    out = tmp_path / "run"
    args = ("train", "--dataset", "synthetic", "--model", "resnet20", "--epochs", "2", "--batch-size", "32",
            "--set", "data.synthetic_num_train=64", "--set", "data.synthetic_num_test=32",
            "--set", "data.synthetic_shape=[3, 8, 8]", "--out", str(out), "--log-every", "1")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    s = read_summary(out)
    assert s["steps"] == 4 and s["dataset"] == "synthetic"
    import auxpar

    assert s["auxpar_version"] == auxpar.__version__ and s["precision"] == "fp32"
    if (ROOT / ".git").exists():  # a checkout: the revision that ran (40 hex digits, maybe +dirty)
        assert len(s["git_revision"].removesuffix("+dirty")) == 40
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # A second run into a finished run directory is refused and the first run's files survive.
    before = (out / "summary.json").read_bytes()
    res2 = run_cli(*args)
    assert res2.returncode != 0 and "already holds a finished run" in res2.stderr
    assert (out / "summary.json").read_bytes() == before
    res3 = run_cli(*args, "--overwrite", "--seed", "1")
    assert res3.returncode == 0, res3.stderr
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_max_steps_ends_inside_an_epoch_with_the_whole_cosine(tmp_path):
    """run.max_steps = 30 on digits (22 steps per epoch at batch 64): 2 epochs entered, the
    second cut after 8 steps, evaluated at the end, and the cosine spans the 30 steps."""
    import math

    out = tmp_path / "ms"
    r = run_cli("train", "--method", "serial", "--dataset", "digits", "--epochs", "3", "--max-steps", "30",
                "--log-every", "1", "--threads", "1", "--progress", "off", "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = read_summary(out)
    assert (s["steps"], s["max_steps"], s["epochs"]) == (30, 30, 3)
    assert s["epochs_trained"] == pytest.approx(30 / 22, abs=1e-3) and s["final_test_acc"] is not None
    recs = read_metrics(out / "metrics.jsonl")
    steps = [x for x in recs if x["kind"] == "step"]
    epochs = [x for x in recs if x["kind"] == "epoch"]
    assert len(steps) == 30 and [e["step"] for e in epochs] == [22, 30]
    assert epochs[-1]["test_acc"] is not None  # the cut epoch is the last: evaluated
    for i in (0, 15, 29):  # the lr before step i+1: cosine over 30 steps, not over 3 epochs
        assert steps[i]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * i / 30)), rel=1e-6)
    assert "epoch   2/2" in r.stdout + r.stderr


def test_nan_stops_with_one_clear_message(tmp_path):
    out = tmp_path / "nan"
    res = run_cli("train", "--dataset", "synthetic", "--model", "resnet20", "--epochs", "3",
                  "--batch-size", "32", "--lr", "1e30", "--set", "data.synthetic_num_train=64",
                  "--set", "data.synthetic_shape=[3, 8, 8]", "--out", str(out), "--log-every", "1")
    assert res.returncode == 4, res.stderr
    assert "non-finite loss at step" in res.stderr and "Lower the learning rate" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.count("auxpar: error:") == 1
    assert not (out / "summary.json").exists()  # no summary claiming a finished run
    assert (out / "config.toml").is_file()      # what was written before is intact
