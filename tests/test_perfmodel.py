"""``auxpar model-perf``: the cost formulas, the predictions on a hand-made profile, the CLI, and
the prediction of a measured configuration (the serial step) within the stated error."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch

from auxpar.perfmodel import (SERIAL_STEP_ERROR, Profile, Scenario, bubble_fraction, message_time,
                              pipeline_step_time, predict, profile_model, profile_warnings,
                              ring_allreduce_time, small_allreduce_time)
from conftest import run_cli


def test_cost_formulas():
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction(2, 1) == pytest.approx(0.5)
    assert message_time(1e6, 1.0, 10.0) == pytest.approx(10e-6 + 1e-3)  # latency + bytes / bandwidth
    assert message_time(0, 1.0, 10.0) == 0.0
    assert small_allreduce_time(1, 10.0) == 0.0
    assert small_allreduce_time(8, 10.0) == pytest.approx(6 * 10e-6)
    P = 4e6
    assert ring_allreduce_time(P, 4, 2.0, 0.0) == pytest.approx(2 * 3 / 4 * P / 2e9)
    # K equal stages of t seconds per micro-batch, free links: (M + K - 1) t, so the idle
    # fraction of every stage is the bubble (K - 1) / (M + K - 1).
    for K, M in [(2, 4), (4, 4), (4, 16), (8, 8)]:
        step = pipeline_step_time([0.01] * K, [0.0] * (K - 1), M, 1.0, 0.0)
        assert step == pytest.approx((M + K - 1) * 0.01)
        assert 1 - M * 0.01 / step == pytest.approx(bubble_fraction(K, M))
    # the slowest stage sets the pace; each link costs latency + bytes / bandwidth both ways
    step = pipeline_step_time([0.01, 0.03], [1e6], 4, 1.0, 100.0)
    c = 100e-6 + 1e-3
    assert step == pytest.approx(0.04 + 2 * c + 3 * (0.03 + c))


def _toy_profile() -> Profile:
    """4 equal blocks (forward 1 s, backward 2 s at batch 8; linear in the batch), free stem/head."""
    times = {}
    for b in (8, 4, 2):
        f = b / 8
        times[str(b)] = {"fwd": [0.0, f, f, f, f, 0.0], "bwd": [0.0, 2 * f, 2 * f, 2 * f, 2 * f, 0.0],
                         "fwd_nograd": [0.0, f, f, f, f, 0.0]}
    return Profile(model="toy", dataset="synthetic", norm="none", device="cpu", threads=1, torch_version="x",
                   date="today", input_shape=[1, 8, 8], num_classes=10, train_samples=80, batch_size=8,
                   parts=["stem", "block0", "block1", "block2", "block3", "head"],
                   params=[10, 100, 100, 100, 100, 10], flops=[1, 4, 4, 4, 4, 1],
                   boundary_values=[16] * 5, times=times, opt_s_per_param=0.0, aux_s_per_value=0.0,
                   load_s={})


def test_predictions_on_a_hand_made_profile():
    prof = _toy_profile()
    free = dict(batch_size=8, bandwidth_gbs=1e12, latency_us=0.0)
    sc = Scenario(microbatches=4, phases="parallel", epochs=10, **free)
    serial = predict(prof, "serial", 1, sc)
    assert serial["step_s"] == pytest.approx(12.0) and serial["epoch_s"] == pytest.approx(120.0)  # 10 steps
    pipe = predict(prof, "pipeline", 2, sc)  # 2 blocks per stage: 1.5 s per micro-batch of 2
    assert pipe["step_s"] == pytest.approx((4 + 2 - 1) * 1.5)
    assert pipe["speedup"] == pytest.approx(120 / 75)
    assert pipe["comm_bytes_per_step"] == 4 * 2 * 16 * 4  # M micro-batches x 2 samples x 16 fp32 values
    pen = predict(prof, "penalty", 2, sc)
    assert pen["step_s"] == pytest.approx(6.0)  # both stages at once
    # one re-initialization: a forward pipelined over 10 batches (2 s on stage 0 each)
    assert pen["reinit_s"] == pytest.approx(2 + 9 * 2) and pen["reinits"] == 1
    assert pen["epoch_s"] == pytest.approx((10 * 60 + 20) / 10)
    sph = predict(prof, "penalty", 2, Scenario(microbatches=4, phases="parallel:2,serial:1", epochs=6, **free))
    assert sph["reinits"] == 2 and sph["parallel_epochs"] == 4
    assert sph["serial_step_s"] == pytest.approx(12.0)  # layer executor: the stages one after another
    assert sph["epoch_s"] == pytest.approx((4 * 60 + 2 * 120 + 2 * 20) / 6)
    ddp = predict(prof, "ddp", 2, sc)
    assert ddp["step_s"] == pytest.approx(6.0, rel=1e-6)
    assert ddp["comm_bytes_per_step"] == 2 * 1 / 2 * 4 * 420
    # links cost: latency and bandwidth enter the pipeline step
    slow = predict(prof, "pipeline", 2, Scenario(microbatches=4, batch_size=8, bandwidth_gbs=1.0, latency_us=100.0))
    c = 100e-6 + 2 * 16 * 4 / 1e9
    assert slow["step_s"] == pytest.approx(7.5 + 2 * c + 3 * c + 2 * 100e-6)  # + the NaN-guard all-reduce
    # DS factor 2 quarters the parallel-phase traffic
    ds = predict(prof, "penalty", 2, Scenario(microbatches=4, ds_factor=2, **free))
    assert ds["comm_bytes_per_step"] == pen["comm_bytes_per_step"] // 4
    # what the pipeline cannot run is reported, not predicted
    assert "n/a" in predict(prof, "pipeline", 4, Scenario(microbatches=2, **free))["note"]  # 1F1B: M < K
    assert "n/a" in predict(prof, "pipeline", 2, Scenario(microbatches=3, **free))["note"]  # 8 % 3
    mg = predict(prof, "mgrit", 2, sc)
    assert mg["step_s"] > pen["step_s"] and math.isfinite(mg["epoch_s"])
    # a profile where a larger batch ran faster than a smaller one is flagged
    assert profile_warnings(prof) == []
    prof.times["8"]["bwd"] = [0.0] * 6
    assert "batch 8 was measured faster than batch 4" in profile_warnings(prof)[0]


def test_contention_slows_every_rank_of_a_multi_rank_method_and_never_serial():
    """``Scenario.contention`` F: ranks sharing one machine compute F times slower than the profile
    (free links: every multi-rank time scales by exactly F); serial runs alone and does not."""
    from auxpar.errors import ConfigError

    prof = _toy_profile()
    prof.opt_s_per_param, prof.aux_s_per_value = 1e-3, 1e-4
    prof.load_s = {"8": {"augment": 0.5, "plain": 0.25}, "4": {"augment": 0.25, "plain": 0.125}}
    free = dict(batch_size=8, bandwidth_gbs=1e12, latency_us=0.0, microbatches=4, epochs=6,
                phases="parallel:2,serial:1")
    alone, shared = Scenario(**free), Scenario(**free, contention=1.25)
    assert predict(prof, "serial", 1, shared)["epoch_s"] == predict(prof, "serial", 1, alone)["epoch_s"]
    for method in ("ddp", "pipeline", "penalty", "al", "mgrit"):
        a, b = predict(prof, method, 2, alone), predict(prof, method, 2, shared)
        assert b["epoch_s"] == pytest.approx(1.25 * a["epoch_s"], rel=1e-9), method
        assert b["speedup"] == pytest.approx(a["speedup"] / 1.25, rel=1e-9), method
    pen = predict(prof, "penalty", 2, shared)
    assert pen["reinit_s"] == pytest.approx(1.25 * predict(prof, "penalty", 2, alone)["reinit_s"])
    # the profile itself is left as it was (the slowed copy is the predictor's)
    assert prof.times["8"]["fwd"][1] == 1.0 and prof.opt_s_per_param == 1e-3
    # links do not slow down: with a slow link the step grows by less than F
    link = dict(free, bandwidth_gbs=0.001)
    a, b = predict(prof, "pipeline", 2, Scenario(**link)), predict(prof, "pipeline", 2, Scenario(**link, contention=2.0))
    assert a["step_s"] < b["step_s"] < 2 * a["step_s"]
    # a speed-up is not contention: one clear error, not n/a rows
    for bad in (0.9, 0.0, float("nan")):
        with pytest.raises(ConfigError, match="must be >= 1"):
            predict(prof, "penalty", 2, Scenario(**free, contention=bad))


def test_crossover_script_sweeps_a_saved_profile_with_and_without_contention(tmp_path):
    """experiments/crossover.py on a saved (hand-made) profile: the table, and --contention 1.25
    dividing every multi-rank speedup by 1.25 (free links: latency and bandwidth do not scale)."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    prof = tmp_path / "perf.json"
    prof.write_text(json.dumps({"profile": _toy_profile().to_json()}))
    speedups = {}
    for c in ("1", "1.25"):
        out = tmp_path / f"x{c}"
        r = subprocess.run([sys.executable, str(ROOT / "experiments" / "crossover.py"), "--profile", str(prof),
                            "--train-samples", "80", "--epochs", "6", "--stages", "2", "--batch-sizes", "8",
                            "--bandwidths", "100", "--microbatches", "4", "--contention", c, "--out", str(out)],
                           capture_output=True, text=True, timeout=120, env=cli_env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        row = [ln for ln in (out / "crossover.md").read_text().splitlines() if ln.startswith("| 2 | 8 |")]
        assert len(row) == 1, row
        speedups[c] = [float(v) for v in row[0].split("|")[4:9]]  # ddp .. penalty-par
    assert all(v > 0 for v in speedups["1"])
    for a, b in zip(speedups["1"], speedups["1.25"]):
        assert b == pytest.approx(a / 1.25, abs=0.011)  # (the table rounds to 2 decimals)


def _serial_step_seconds(batches, steps: int) -> float:
    from auxpar.config import build_config
    from auxpar.coupling import get_method
    from auxpar.distributed import DistInfo
    from auxpar.models import build_model

    cfg = build_config({"data": {"dataset": "digits", "batch_size": 64}})
    torch.manual_seed(0)
    m = get_method("serial")(cfg, DistInfo(), build_model("resnet20", in_channels=1, input_size=8,
                                                          num_classes=10))
    times = []
    for i in range(steps + 2):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        m.train_step(b, "serial")
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times)


def test_serial_step_prediction_within_stated_error():
    """The profile (parts timed one by one, plus the SGD step) predicts a measured serial step.

    Both are measured here, back to back, with 1 thread. Tolerance: SERIAL_STEP_ERROR, the error
    the README states for this quantity (measured: -12% .. +11%, see validate_perfmodel.py). On a
    busy CI machine other processes only ever add time, so both sides take the fastest of their
    repetitions (profile_model(stat="min"), the fastest step), which estimates the idle-machine
    times; and up to 3 attempts are made. The test fails when every attempt misses: a model that
    forgot the backward (~60% of the step) or the optimizer is off by far more."""
    from auxpar.data import eval_batches, load_dataset

    train = load_dataset("digits", "train")
    batches = list(eval_batches(train, 64, "cpu"))[:8]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    errors = []
    try:
        for _ in range(3):
            prof = profile_model("resnet20", "digits", [64], repeats=5, threads=1, stat="min")
            predicted = predict(prof, "serial", 1, Scenario(batch_size=64))["step_s"]
            measured = _serial_step_seconds(batches, 16)
            errors.append(predicted / measured - 1)
            if abs(errors[-1]) <= SERIAL_STEP_ERROR:
                break
    finally:
        torch.set_num_threads(old)
    assert abs(errors[-1]) <= SERIAL_STEP_ERROR, f"relative errors {errors} exceed {SERIAL_STEP_ERROR}"


def test_model_perf_cli_writes_table_and_plot(tmp_path):
    out = tmp_path / "perf"
    r = run_cli("model-perf", "--dataset", "digits", "--stages", "2,4", "--repeats", "1", "--threads", "1",
                "--bandwidth", "5", "--latency", "20", "--microbatches", "4", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("perf.md", "perf.csv", "perf.json", "perf.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "perf.json").read_text())
    rows = data["rows"]
    assert {(x["method"], x["K"]) for x in rows} >= {("serial", 1), ("pipeline", 2), ("penalty", 4), ("mgrit", 4)}
    assert data["scenario"]["bandwidth_gbs"] == 5.0 and data["profile"]["model"] == "resnet20"
    with open(out / "perf.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert "| penalty | 2 |" in (out / "perf.md").read_text() and "| penalty | 2 |" in r.stdout
    # the saved profile is reused without profiling again; bad inputs are one clear error
    r2 = run_cli("model-perf", "--profile", str(out / "perf.json"), "--dataset", "digits", "--stages", "2",
                 "--bandwidth", "1", "--out", str(tmp_path / "again"), "--no-plot", timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert "profiling" not in r2.stdout
    again = json.loads((tmp_path / "again" / "perf.json").read_text())["rows"]
    assert [x for x in again if x["method"] == "serial"][0]["step_s"] == \
        pytest.approx([x for x in rows if x["method"] == "serial"][0]["step_s"])
    bad = run_cli("model-perf", "--dataset", "digits", "--bandwidth", "0", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--bandwidth 0.0 must be > 0" in bad.stderr
    # --contention: the ranks share this machine; recorded, said in the table's header, and checked
    r3 = run_cli("model-perf", "--profile", str(out / "perf.json"), "--dataset", "digits", "--stages", "2",
                 "--bandwidth", "1", "--contention", "1.1", "--out", str(tmp_path / "shared"), "--no-plot",
                 timeout=60)
    assert r3.returncode == 0, r3.stderr
    shared = json.loads((tmp_path / "shared" / "perf.json").read_text())
    assert shared["scenario"]["contention"] == 1.1 and "Contention 1.1" in (tmp_path / "shared" / "perf.md").read_text()
    pen = {x["method"]: x for x in shared["rows"]}["penalty"]
    assert pen["epoch_s"] > {x["method"]: x for x in again}["penalty"]["epoch_s"]
    bad = run_cli("model-perf", "--profile", str(out / "perf.json"), "--dataset", "digits", "--contention", "0.5",
                  "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--contention 0.5" in bad.stderr and "must be >= 1" in bad.stderr
    assert not (tmp_path / "y" / "perf.json").exists()
