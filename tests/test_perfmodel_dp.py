"""``--dp D`` in the planning tools: ``auxpar plan`` reports the aux memory per rank of a K x D
mesh, and ``auxpar model-perf`` predicts penalty/al on K stages x D replicas next to DDP on the
same K*D devices. Every prediction test runs on a hand-made profile (no profiling), so the file
runs in seconds; only three tests start the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest

from auxpar import registry
from auxpar.config import DataConfig
from auxpar.errors import ConfigError
from auxpar.perfmodel import (COLUMNS, Profile, Scenario, markdown_table, needed_batch_sizes, predict,
                              predict_all, predict_ddp, ring_allreduce_time, write_outputs)
from auxpar.plan import format_plan, make_plan
from conftest import run_cli

# ============================================================================ plan --dp


def _plan(n: int, dp: int = 1, stages: int = 3) -> dict:
    data = DataConfig(dataset="synthetic", synthetic_num_train=n, synthetic_shape=[3, 16, 16])
    return make_plan("resnet20", data, stages, dp=dp)


def _mem(plan: dict) -> dict:
    return {(m["ds_factor"], m["dtype"]): m for m in plan["aux_memory"]}


@pytest.mark.parametrize("n", [1000, 1001])
def test_plan_dp_divides_the_per_rank_store_and_keeps_the_total(n):
    one, two = _plan(n), _plan(n, dp=2)
    assert two["dp"] == 2 and two["world_size"] == 6 and two["samples_per_rank"] == math.ceil(n / 2)
    per_sample = {}
    for key, m1 in _mem(one).items():
        m2 = _mem(two)[key]
        assert m2["aux_bytes"] == m1["aux_bytes"]  # the total over all ranks does not change
        assert m2["aux_and_multiplier_bytes"] == m1["aux_and_multiplier_bytes"]
        # the busiest rank holds its replica's ceil(N/2) samples instead of N (501 of 1001: not half)
        assert m1["aux_bytes_per_rank"] % n == 0
        per_sample[key] = m1["aux_bytes_per_rank"] // n
        assert m2["aux_bytes_per_rank"] == math.ceil(n / 2) * per_sample[key]
        assert m2["aux_and_multiplier_bytes_per_rank"] == 2 * m2["aux_bytes_per_rank"]
    if n % 2:
        assert _mem(two)[(1, "fp32")]["aux_bytes_per_rank"] * 2 > _mem(one)[(1, "fp32")]["aux_bytes_per_rank"]
    # per rank is the busiest boundary (rank k > 0 stores its input), not the sum over boundaries / K
    rows = one["stage_rows"]
    values = [math.prod(r["out_shape"]) for r in rows[:-1]]
    m = _mem(one)[(1, "fp32")]
    assert m["aux_bytes_per_rank"] == n * max(values) * 4 and m["busiest_stage"] == 1 + values.index(max(values))
    assert m["aux_bytes"] == n * sum(values) * 4 != m["aux_bytes_per_rank"]
    assert m["aux_bytes_per_rank"] != m["aux_bytes"] // len(rows)


def test_plan_dp_text_and_bad_values():
    text = format_plan(_plan(1001, dp=2))
    assert "--dp 2: 3 stages x 2 replicas = 6 ranks" in text and "501 samples" in text
    assert "per rank: aux" in text
    one = format_plan(_plan(1001))
    assert "replicas" not in one and "per rank: aux" in one  # D = 1: no mesh line, the per-rank column
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=f"--dp {bad}"):
            _plan(1000, dp=bad)
    with pytest.raises(ConfigError, match="more replicas than the 10 training samples"):
        _plan(10, dp=11)


def test_plan_cli_dp_json_and_one_clear_error():
    res = run_cli("plan", "--model", "resnet20", "--dataset", "cifar10", "--stages", "4", "--dp", "2", "--json",
                  timeout=120)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["dp"] == 2 and plan["samples_per_rank"] == 25_000
    m = _mem(plan)[(1, "fp32")]
    assert m["aux_bytes_per_rank"] == 25_000 * 16 * 32 * 32 * 4  # rank 1 stores the 16x32x32 boundary
    assert m["aux_bytes"] == 50_000 * plan["boundary_values_per_sample"] * 4
    for bad in ("0", "-3"):
        res = run_cli("plan", "--model", "resnet20", "--dataset", "cifar10", "--stages", "4", "--dp", bad, timeout=60)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.startswith(f"auxpar: error: --dp {bad}: give the number of data-parallel replicas")
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


# ============================================================================ model-perf --dp

FREE = dict(bandwidth_gbs=1e15, latency_us=0.0)
"""A link that costs nothing: what is left of a step is compute."""


def _profile(params=(50, 400, 400, 800, 1600, 100), batches=(1, 2, 4, 8, 16)) -> Profile:
    """4 blocks whose time grows as sqrt(batch), so the profile at B/2 is not half the one at B
    (a model that scaled the B timings would be caught); linear timings would hide it."""
    times = {}
    for b in batches:
        f = math.sqrt(b / 16)
        times[str(b)] = {"fwd": [0.1 * f, f, f, 1.5 * f, 2 * f, 0.05 * f],
                         "bwd": [0.2 * f, 2 * f, 2 * f, 3 * f, 4 * f, 0.1 * f],
                         "fwd_nograd": [0.08 * f, 0.8 * f, 0.8 * f, 1.2 * f, 1.6 * f, 0.04 * f]}
    return Profile(model="toy", dataset="synthetic", norm="none", device="cpu", threads=1, torch_version="x",
                   date="today", input_shape=[3, 16, 16], num_classes=10, train_samples=163, batch_size=16,
                   parts=["stem", "block0", "block1", "block2", "block3", "head"],
                   params=list(params), flops=[1, 4, 4, 6, 8, 1],
                   boundary_values=[1024, 1024, 512, 512, 256], times=times, opt_s_per_param=1e-5,
                   aux_s_per_value=1e-6,
                   load_s={str(b): {"augment": 0.01 * b, "plain": 0.005 * b} for b in batches})


def _stage_fb(prof: Profile, batch: int, parts: list[list[int]]) -> list[float]:
    t = prof.at(batch)
    return [sum(t["fwd"][j] + t["bwd"][j] for j in p) for p in parts]


# the flops cut of _profile at K = 2: blocks 0-1 | blocks 2-3 (parts: stem, block0..3, head)
PARTS_K2 = [[0, 1, 2], [3, 4, 5]]


def test_penalty_row_on_k_by_d_devices_uses_the_b_over_d_profile():
    prof = _profile()
    prof.opt_s_per_param = prof.aux_s_per_value = 0.0
    prof.load_s = {}
    sc = Scenario(batch_size=16, phases="parallel", epochs=1, dp=2, **FREE)
    row = predict(prof, "penalty", 2, sc)
    assert (row["K"], row["dp"], row["devices"], row["batch_per_replica"]) == (2, 2, 4, 8)
    fb8 = _stage_fb(prof, 8, PARTS_K2)
    assert row["step_s"] == pytest.approx(max(fb8), rel=1e-9)  # every replica's stage at batch 8
    # not the B = 16 profile, nor that profile halved (the timings are not linear in the batch)
    fb16 = _stage_fb(prof, 16, PARTS_K2)
    assert row["step_s"] != pytest.approx(max(fb16), rel=1e-3)
    assert row["step_s"] != pytest.approx(max(fb16) / 2, rel=1e-3)
    # speedup: against serial on one device at batch B
    assert row["speedup"] == pytest.approx(predict(prof, "serial", 1, sc)["epoch_s"] / row["epoch_s"])
    # the same K at D = 1 runs the B profile on K devices
    d1 = predict(prof, "penalty", 2, Scenario(batch_size=16, phases="parallel", epochs=1, **FREE))
    assert (d1["dp"], d1["devices"]) == (1, 2) and d1["step_s"] == pytest.approx(max(fb16), rel=1e-9)
    # re-initialization: each replica over its ceil(163/2) = 82 samples, i.e. 11 batches of 8
    ng8 = sum(prof.at(8)["fwd_nograd"][j] for j in PARTS_K2[0])
    assert row["reinit_s"] == pytest.approx(11 * ng8, rel=1e-9)


def test_allreduce_term_grows_with_parameter_bytes_and_vanishes_with_a_free_link():
    bw, D, K = 1e-6, 2, 2  # 1 kB/s: the gradient all-reduce is far longer than the backward
    small, big = _profile(), _profile(params=(500, 4000, 4000, 8000, 16000, 1000))
    base = dict(batch_size=16, phases="parallel", epochs=1, dp=D, latency_us=0.0)
    rs = predict(small, "penalty", K, Scenario(bandwidth_gbs=bw, **base))
    rb = predict(big, "penalty", K, Scenario(bandwidth_gbs=bw, **base))
    p_small = [sum(small.params[j] for j in p) for p in PARTS_K2]
    assert rs["allreduce_s"] == pytest.approx(max(ring_allreduce_time(4 * p, D, bw, 0.0) for p in p_small))
    assert rs["allreduce_s"] == pytest.approx(2 * (D - 1) / D * 4 * max(p_small) / (bw * 1e9))
    assert rb["allreduce_s"] == pytest.approx(10 * rs["allreduce_s"])  # 10x the parameter bytes
    assert rb["step_s"] > rs["step_s"] and rb["allreduce_exposed_s"] > rs["allreduce_exposed_s"] > 0
    # the grad all-reduce is part of what the busiest rank sends
    assert rb["comm_bytes_per_step"] > rs["comm_bytes_per_step"]
    # bandwidth -> infinity (latency 0): the term vanishes, the step is that of free links
    free = predict(big, "penalty", K, Scenario(**FREE, **{k: v for k, v in base.items() if k != "latency_us"}))
    for gbs in (1e3, 1e6, 1e9):
        r = predict(big, "penalty", K, Scenario(bandwidth_gbs=gbs, **base))
        assert r["allreduce_s"] == pytest.approx(2 * (D - 1) / D * 4 * max(p_small) * 10 / (gbs * 1e9))
    assert r["allreduce_s"] < 1e-12 and r["step_s"] == pytest.approx(free["step_s"], rel=1e-9)
    assert free["allreduce_s"] < 1e-15 and free["allreduce_exposed_s"] == 0.0


def test_allreduce_is_overlapped_with_backward():
    """Only max(0, allreduce - backward) of a stage adds to its step (the stated assumption):
    the same profile without parameters (no all-reduce, no optimizer) is the reference."""
    prof, zero = _profile(), _profile(params=(0,) * 6)
    prof.opt_s_per_param = zero.opt_s_per_param = 0.0
    base = dict(batch_size=16, phases="parallel", epochs=1, dp=2, latency_us=0.0)
    bwd8 = [sum(prof.at(8)["bwd"][j] for j in p) for p in PARTS_K2]
    # 1 MB/s: the all-reduce (ms) hides behind the backward (s): the step is that without it
    fast = predict(prof, "penalty", 2, Scenario(bandwidth_gbs=1e-3, **base))
    assert 0 < fast["allreduce_s"] < min(bwd8) and fast["allreduce_exposed_s"] == 0.0
    assert fast["step_s"] == pytest.approx(predict(zero, "penalty", 2, Scenario(bandwidth_gbs=1e-3, **base))["step_s"],
                                           rel=1e-12)
    # 1 kB/s: the all-reduce outlasts the backward; what is left of it adds to the step, not all of it
    slow = predict(prof, "penalty", 2, Scenario(bandwidth_gbs=1e-6, **base))
    ref = predict(zero, "penalty", 2, Scenario(bandwidth_gbs=1e-6, **base))
    p = [sum(prof.params[j] for j in q) for q in PARTS_K2]
    ar = [ring_allreduce_time(4 * p[k], 2, 1e-6, 0.0) for k in range(2)]
    assert all(a > b for a, b in zip(ar, bwd8))
    assert slow["allreduce_exposed_s"] == pytest.approx(max(a - b for a, b in zip(ar, bwd8)))
    assert 0 < slow["step_s"] - ref["step_s"] <= slow["allreduce_exposed_s"] + 1e-9
    assert slow["step_s"] - ref["step_s"] < slow["allreduce_s"] - min(bwd8) / 2  # the backward hid part


def test_ddp_row_runs_on_k_times_d_devices():
    prof = _profile()
    sc2 = Scenario(batch_size=16, bandwidth_gbs=0.5, latency_us=20.0, dp=2)
    sc1 = Scenario(batch_size=16, bandwidth_gbs=0.5, latency_us=20.0)
    for K in (2, 4):
        row = predict(prof, "ddp", K, sc2)
        assert (row["K"], row["dp"], row["devices"]) == (K, 2, 2 * K)
        ref = predict_ddp(prof, 2 * K, sc1)  # K*D ranks at B/(K*D), its all-reduce not overlapped
        # the same overlap assumption as the K x D rows: only the part the backward does not hide
        bwd = sum(prof.at(16 // (2 * K))["bwd"])
        exposed = max(0.0, row["allreduce_s"] - bwd)
        assert row["allreduce_exposed_s"] == pytest.approx(exposed)
        assert row["step_s"] == pytest.approx(ref["step_s"] - row["allreduce_s"] + exposed)
        assert row["step_s"] < ref["step_s"]  # the backward hid part of it
        assert row["step_s"] != pytest.approx(predict(prof, "ddp", K, sc1)["step_s"], rel=1e-3)
        assert f"all {2 * K} devices at batch {16 // (2 * K)}" in row["note"]
    # both rows of one K x D share the device count: the table compares like with like
    rows = predict_all(prof, ["serial", "ddp", "penalty"], [2, 4], sc2)
    by = {(r["method"], r["K"]): r for r in rows}
    assert by[("ddp", 4)]["devices"] == by[("penalty", 4)]["devices"] == 8
    assert by[("serial", 1)]["devices"] == 1 and by[("serial", 1)]["dp"] == 1


def test_unmodelled_dp_is_an_n_a_row_never_a_silent_d1():
    prof = _profile()
    sc = Scenario(batch_size=16, dp=2, **FREE)
    mg = predict(prof, "mgrit", 2, sc)
    assert mg["epoch_s"] is None and "mgrit with --dp 2 is not modelled" in mg["note"]
    pipe = predict(prof, "pipeline", 2, sc)
    assert pipe["epoch_s"] is None and "no data-parallel replicas (--dp 2)" in pipe["note"]
    assert predict(prof, "mgrit", 2, Scenario(batch_size=16, **FREE))["epoch_s"] is not None  # D = 1 still is
    bad = predict(prof, "penalty", 2, Scenario(batch_size=16, dp=3, **FREE))
    assert bad["epoch_s"] is None and "does not split over --dp 3" in bad["note"]
    # a registered predictor that ignores sc.dp would answer for D = 1: predict() refuses that row
    registry.register_method("dp-blind", "auxpar.coupling.serial:SerialMethod", layout="stages",
                             perf="test_perfmodel_dp:_perf_ignoring_dp")
    try:
        row = predict(prof, "dp-blind", 2, sc)
        assert row["epoch_s"] is None and "does not model --dp 2" in row["note"]
        assert predict(prof, "dp-blind", 2, Scenario(batch_size=16, **FREE))["epoch_s"] == 1.0
    finally:
        registry.unregister("dp-blind")


def _perf_ignoring_dp(prof, K, sc, method):
    return {"step_s": 0.1, "epoch_s": 1.0, "comm_bytes_per_step": 0, "idle_fraction": 0.0}


def test_needed_batch_sizes_with_dp():
    methods = ["serial", "ddp", "pipeline", "penalty", "al", "mgrit"]
    assert needed_batch_sizes(Scenario(batch_size=64, microbatches=4), [2, 4], methods) == [16, 32, 64]
    # D = 2: B/D for the replicas, B/(K*D) for ddp; the pipeline (n/a) needs no B/M
    assert needed_batch_sizes(Scenario(batch_size=64, microbatches=4, dp=2), [2, 4], methods) == [8, 16, 32, 64]
    assert needed_batch_sizes(Scenario(batch_size=64, microbatches=4, dp=2), [2], ["serial", "penalty"]) == [32, 64]
    sc = Scenario(batch_size=64, microbatches=4, dp=2, serial_executor="pipeline")
    assert needed_batch_sizes(sc, [2], ["serial", "penalty"]) == [8, 32, 64]  # (B/D)/M micro-batches


# ---- D = 1 is what it was: the table of a fixed scenario, computed before --dp existed

D1_TABLE = """\
| method | K | step | epoch | speedup | sent/step/rank | idle | note |
|---|---|---|---|---|---|---|---|
| serial | 1 | 33933.50 ms | 340.93 s | 1.00x | 0.000 MB | 0% |  |
| ddp | 2 | 16997.10 ms | 170.77 s | 2.00x | 0.013 MB | 0% |  |
| pipeline | 2 | 27674.40 ms | 278.34 s | 1.22x | 0.033 MB | 23% | 1f1b M=2 |
| penalty | 2 | 21366.11 ms | 269.54 s | 1.26x | 0.033 MB | 0% | ds=1 phases=parallel:2,serial:1 (2 re-init) |
| al | 2 | 21366.11 ms | 269.54 s | 1.26x | 0.033 MB | 0% | ds=1 phases=parallel:2,serial:1 (2 re-init) |
| mgrit | 2 | 79552.64 ms | 797.13 s | 0.43x | 0.627 MB | 73% | L=2 m=2 iters=2/1 (unvalidated) |
| ddp | 4 | 8529.10 ms | 85.69 s | 3.98x | 0.020 MB | 0% |  |"""

D1_PIPELINE_EXECUTOR = {  # (method, K): (step_s, epoch_s, comm_bytes_per_step), ds=2, bf16, pipeline executor
    ("penalty", 2): (21.331293999999993, 248.1518353333333, 4096),
    ("pipeline", 2): (27.674401999999997, 278.34402, 32768),
    ("ddp", 4): (8.5291, 85.69099999999999, 20100),
    ("mgrit", 4): (54.56622200000001, 547.2622200000001, 626688),
}


def _linear_profile() -> Profile:
    """The profile the D1 snapshot was computed on (timings linear in the batch)."""
    prof = _profile()
    for b, rec in prof.times.items():
        scale = (int(b) / 8) / math.sqrt(int(b) / 16)
        for key in rec:
            rec[key] = [t * scale for t in rec[key]]
    return prof


def test_d1_output_is_unchanged(tmp_path):
    prof = _linear_profile()
    methods = ["serial", "ddp", "pipeline", "penalty", "al", "mgrit"]
    common = dict(batch_size=16, bandwidth_gbs=0.001, latency_us=50.0, microbatches=2,
                  phases="parallel:2,serial:1", epochs=6)
    rows = predict_all(prof, methods, [2, 4], Scenario(**common))
    assert markdown_table(rows).startswith(D1_TABLE + "\n")
    assert "| penalty | 4 | 12358.21 ms | 207.81 s | 1.64x | 0.098 MB | 0% |" in markdown_table(rows)
    assert all((r["dp"], r["devices"]) == (1, r["K"]) for r in rows)
    rows = predict_all(prof, methods, [2, 4], Scenario(serial_executor="pipeline", ds_factor=2, aux_dtype="bf16",
                                                        **common))
    got = {(r["method"], r["K"]): (r["step_s"], r["epoch_s"], r["comm_bytes_per_step"]) for r in rows}
    for key, (step, epoch, sent) in D1_PIPELINE_EXECUTOR.items():
        assert got[key] == (pytest.approx(step, rel=1e-9), pytest.approx(epoch, rel=1e-9), sent), key
    assert [r for r in rows if r["method"] == "penalty"][0]["serial_step_s"] == pytest.approx(27.674401999999997)
    # the files keep their columns and header
    sc = Scenario(**common)
    write_outputs(tmp_path, prof, sc, predict_all(prof, methods, [2], sc), [2], plot=False)
    with open(tmp_path / "perf.csv") as fh:
        assert tuple(csv.DictReader(fh).fieldnames) == COLUMNS
    assert "K x D" not in (tmp_path / "perf.md").read_text()


def test_dp_table_and_files_show_k_by_d(tmp_path):
    prof = _profile()
    sc = Scenario(batch_size=16, bandwidth_gbs=0.001, latency_us=50.0, dp=2, epochs=3)
    rows = predict_all(prof, ["serial", "ddp", "penalty", "mgrit"], [2, 4], sc)
    md = markdown_table(rows)
    assert md.splitlines()[0] == ("| method | K x D | devices | step | epoch | speedup | sent/step/rank | idle "
                                  "| note |")
    assert "| penalty | 2x2 | 4 |" in md and "| ddp | 4x2 | 8 |" in md and "| serial | 1 | 1 |" in md
    write_outputs(tmp_path, prof, sc, rows, [2, 4], plot=False)
    with open(tmp_path / "perf.csv") as fh:
        recs = list(csv.DictReader(fh))
    assert [(r["method"], r["K"], r["dp"], r["devices"]) for r in recs if r["method"] == "penalty"] == [
        ("penalty", "2", "2", "4"), ("penalty", "4", "2", "8")]
    data = json.loads((tmp_path / "perf.json").read_text())
    assert data["scenario"]["dp"] == 2 and {r["devices"] for r in data["rows"] if r["method"] == "ddp"} == {4, 8}
    assert "K x D = K stages x D = 2 data-parallel replicas" in (tmp_path / "perf.md").read_text()


def test_dp_plot(tmp_path):
    pytest.importorskip("matplotlib")
    prof = _profile()
    sc = Scenario(batch_size=16, dp=2, **FREE)
    files = write_outputs(tmp_path, prof, sc, predict_all(prof, ["serial", "ddp", "penalty"], [2, 4], sc), [2, 4])
    assert (tmp_path / "perf.png") in files and (tmp_path / "perf.png").stat().st_size > 0


def test_model_perf_cli_dp(tmp_path):
    prof_path = tmp_path / "prof.json"
    prof_path.write_text(json.dumps({"profile": _profile().to_json()}))
    out = tmp_path / "out"
    r = run_cli("model-perf", "--profile", str(prof_path), "--dataset", "synthetic", "--batch-size", "16",
                "--stages", "2,4", "--dp", "2", "--epochs", "3", "--no-plot", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| penalty | 4x2 | 8 |" in r.stdout and "| ddp | 4x2 | 8 |" in r.stdout
    assert "mgrit with --dp 2 is not modelled" in r.stdout
    rows = json.loads((out / "perf.json").read_text())["rows"]
    pen = [x for x in rows if x["method"] == "penalty" and x["K"] == 4][0]
    assert pen["devices"] == 8 and pen["batch_per_replica"] == 8
    bad = run_cli("model-perf", "--profile", str(prof_path), "--dataset", "synthetic", "--dp", "0",
                  "--out", str(tmp_path / "x"), "--no-plot", timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "auxpar: error: --dp 0 must be >= 1"
