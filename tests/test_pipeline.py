"""The pipeline baseline (--method pipeline) and the pipeline executor of the SPH serial phase.

Exactness: on a model without batch norm, K gloo ranks running the micro-batched schedule
(GPipe or 1F1B, torch.distributed.pipelining) take the same SGD steps as serial backprop on the
same batches: parameters agree to 1e-5 after 3 steps with momentum, while the steps themselves
move the parameters by far more (checked, so the comparison can fail).
"""

from __future__ import annotations

import math

import pytest
import torch

from auxpar.config import build_config
from auxpar.coupling import get_method
from auxpar.data import eval_batches, load_dataset
from auxpar.distributed import DistInfo
from auxpar.errors import ConfigError, DistributedError, TrainingError
from auxpar.models import build_model
from conftest import read_summary, run_cli
from mp_harness import run_ranks

N, B = 48, 16  # samples, batch size: 3 steps over distinct batches


def _cfg(method, world, M=4, schedule="1f1b", extra=None):
    over = {"run": {"method": method}, "model": {"name": "resnet20", "norm": "none"},
            "data": {"dataset": "synthetic", "batch_size": B, "synthetic_num_train": N,
                     "synthetic_shape": [1, 8, 8]},
            "optim": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9},
            "dist": {"stages": world, "microbatches": M, "pipeline_schedule": schedule}}
    for sec, vals in (extra or {}).items():
        over.setdefault(sec, {}).update(vals)
    return build_config(over)


def _net():
    torch.manual_seed(0)
    return build_model("resnet20", in_channels=1, input_size=8, num_classes=10, norm="none")


def _global(stage, start):
    out = {}
    for name, p in stage.named_parameters():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            name = f"blocks.{start + int(i)}.{rest}"
        out[name] = p.detach().clone()
    return out


def _pipeline_vs_serial(rank, world, method, schedule, M):
    train = load_dataset("synthetic", "train", synthetic={"num_train": N, "shape": (1, 8, 8)})
    batches = list(eval_batches(train, B, "cpu"))
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    if method == "pipeline":
        m = get_method("pipeline")(_cfg("pipeline", world, M, schedule), info, _net())
        step = lambda b: m.train_step(b, "serial")  # noqa: E731
    else:  # penalty's SPH serial phase through the pipeline executor
        cfg = _cfg("penalty", world, M, schedule, {"coupling": {"serial_executor": "pipeline",
                                                                "phases": "serial:1,parallel:1"}})
        m = get_method("penalty")(cfg, info, _net())
        m.prepare(train)
        assert m.executor.name == "pipeline"
        step = lambda b: m.train_step(b, "serial")  # noqa: E731
    m.set_lr(0.1)
    before = _global(m.stage, m.block_range[0])
    losses = [step(b).loss.item() for b in batches]
    after = _global(m.stage, m.block_range[0])

    # Serial backprop on the same batches, in this process.
    ref = get_method("serial")(_cfg("serial", 1), DistInfo(), _net())
    ref.set_lr(0.1)
    ref_losses = [ref.train_step(b, "serial").loss.item() for b in batches]
    ref_p = dict(ref.net.named_parameters())
    diff = max((after[k] - ref_p[k].detach()).abs().max().item() for k in after)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    out = {"diff": diff, "moved": moved, "losses": losses, "ref_losses": ref_losses,
           "bytes": m.comm_bytes() if method == "pipeline" else m.p2p.bytes_sent}
    # NaN guard: a non-finite loss on rank 0 (fault injection) stops every rank before the step.
    m.poison = rank == 0
    m.step_index = 4
    try:
        step(batches[0])
    except TrainingError as exc:
        out["nan_error"] = str(exc)
    out["unchanged"] = all(torch.equal(v, _global(m.stage, m.block_range[0])[k]) for k, v in after.items())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method,schedule,M", [("pipeline", "1f1b", 4), ("penalty", "gpipe", 2)])
def test_pipeline_update_equals_serial_backprop(method, schedule, M):
    """--method pipeline, and penalty's serial phase with --serial-executor pipeline."""
    res = run_ranks(_pipeline_vs_serial, 2, method, schedule, M)
    for r in res:
        assert r["moved"] > 1e-3  # the steps did move this stage's parameters...
        assert r["diff"] < 1e-5, r["diff"]  # ...exactly as serial backprop moved them
    last = res[-1]
    assert last["losses"] == pytest.approx(last["ref_losses"], abs=1e-5)
    # Bytes, counted from the schedule's send ops: activations forward on rank 0, input
    # gradients back on rank 1, both of the boundary's shape, for every sample of every step.
    boundary = _net().partition(2)[0].out_shape
    assert res[0]["bytes"] == res[1]["bytes"] == N * math.prod(boundary) * 4
    for r in res:  # the guard ran on every rank and stopped both before the optimizer step
        assert "non-finite loss at step 4 on rank 0 (stage 0 of 2" in r["nan_error"] or method != "pipeline"
        assert "non-finite loss at step 4 on rank 0" in r["nan_error"]
        assert r["unchanged"]


def _check(**dist):
    cfg = _cfg("pipeline", 2, **dist)
    get_method("pipeline").check_layout(cfg, DistInfo(0, 2, 0, 2, torch.device("cpu"), "gloo"))


def test_unsupported_configurations_fail_clearly():
    _check(M=4, schedule="1f1b")  # fine: 16 = 4 x 4, M >= K
    with pytest.raises(ConfigError, match=r"--batch-size 16 does not split into --microbatches 3 equal"):
        _check(M=3)
    with pytest.raises(ConfigError, match=r"1F1B schedule needs at least as many micro-batches as stages.*"
                                          r"--microbatches 1 < --stages 2.*--pipeline-schedule gpipe"):
        _check(M=1, schedule="1f1b")
    _check(M=1, schedule="gpipe")  # GPipe runs a single micro-batch
    with pytest.raises(DistributedError, match="needs exactly 2 processes"):
        get_method("pipeline").check_layout(_cfg("pipeline", 2), DistInfo(0, 3, 0, 3, torch.device("cpu"), "gloo"))
    with pytest.raises(DistributedError, match="K >= 2 stages"):
        get_method("pipeline").check_layout(_cfg("pipeline", 1), DistInfo())


@pytest.mark.slow
def test_cli_unsupported_configuration_one_clear_error(tmp_path):
    r = run_cli("train", "--method", "pipeline", "--stages", "2", "--dataset", "digits", "--batch-size", "30",
                "--microbatches", "4", "--epochs", "1", "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("auxpar: error:")]
    assert len(lines) == 1 and "does not split into --microbatches 4 equal micro-batches" in lines[0], r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_cli_pipeline_run(tmp_path):
    out = tmp_path / "pipe"
    r = run_cli("train", "--method", "pipeline", "--stages", "2", "--dataset", "digits", "--epochs", "1",
                "--microbatches", "2", "--pipeline-schedule", "gpipe", "--out", str(out), "--progress", "off",
                timeout=240)
    assert r.returncode == 0, r.stderr
    s = read_summary(out)
    assert s["method"] == "pipeline" and s["world_size"] == 2 and s["microbatches"] == 2
    assert s["final_test_acc"] is not None and s["final_test_acc"] > 0.2  # one epoch of digits learns
    # activations + gradients of every training sample over the one boundary, both ranks
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1, input_size=8, num_classes=10)
    boundary = math.prod(net.partition(2)[0].out_shape)
    assert s["comm_bytes"] == 2 * s["steps"] * 64 * boundary * 4
    assert len(s["time_compute_s"]) == 2 and all(t > 0 for t in s["time_compute_s"])
    model = torch.load(out / "model.pt", weights_only=True)
    state = model.get("state_dict", model)
    assert set(state) == set(net.state_dict())  # the whole network, gathered on the last rank


@pytest.mark.slow
def test_cli_penalty_with_pipeline_serial_executor(tmp_path):
    out = tmp_path / "pen"
    r = run_cli("train", "--method", "penalty", "--stages", "2", "--dataset", "digits", "--epochs", "2",
                "--phases", "parallel:1,serial:1", "--serial-executor", "pipeline", "--microbatches", "2",
                "--stage-input", "output", "--out", str(out), "--progress", "off", timeout=240)
    assert r.returncode == 0, r.stderr
    s = read_summary(out)
    assert s["serial_executor"] == "pipeline" and s["phase_times_s"]["serial"] > 0
    assert s["stage_input"] == "output"  # summary.json says which input the stages read
    assert s["final_test_acc"] is not None and s["final_test_acc"] > 0.2
