"""Checkpoint files: round trip of every tracked state, discovery, pruning, safe loading."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from auxpar import checkpoint
from auxpar.config import build_config
from auxpar.coupling import get_method
from auxpar.data import BatchLoader, IndexSampler, load_dataset
from auxpar.distributed import DistInfo
from auxpar.errors import ConfigError
from auxpar.models import build_model
from auxpar.resume import (CheckpointSaver, LoopState, load_rank_state, resolve_resume, set_rng_state,
                           truncate_metrics)
from mp_harness import run_ranks

SYN = {"num_train": 64, "num_test": 16, "shape": (3, 8, 8), "num_classes": 4}


def _setup(method: str, rank: int, world: int, run_dir: str, **extra):
    cfg = build_config({
        "run": {"method": method, "out": run_dir, "checkpoint_every": "1s", "keep": 2},
        "data": {"dataset": "synthetic", "batch_size": 16, "synthetic_num_train": 64, "synthetic_num_test": 16,
                 "synthetic_shape": [3, 8, 8], "synthetic_classes": 4},
        "dist": {"stages": world if method in ("penalty", "al") else 1},
        "optim": {"lr": 0.1, "momentum": 0.9},
        **extra,
    })
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo" if world > 1 else "none")
    train_set = load_dataset("synthetic", "train", seed=0, synthetic=SYN)
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=3, input_size=8, num_classes=4)
    m = get_method(method)(cfg, info, net)
    m.prepare(train_set)
    loader = BatchLoader(train_set, IndexSampler(64, 16, seed=0, num_replicas=1, rank=0), device="cpu",
                         augment=None)
    return cfg, info, m, loader


def _steps(m, loader, epoch, phase, n):
    loader.set_epoch(epoch)
    m.begin_epoch(epoch, phase)
    for i, b in enumerate(loader):
        if i == n:
            break
        m.set_lr(0.1)
        m.train_step(b, phase)
    m.end_epoch(epoch)


def _snapshot(m, loop) -> dict:
    st = m.state_dict()
    return {"method": _clone(st), "loop": _clone(loop.state_dict()), "torch_rng": torch.get_rng_state().clone(),
            "np": np.random.get_state()[1].copy(), "py": random.getstate()}


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN placeholders (no loss yet) are equal
    return a == b


def _roundtrip(rank, world, method, run_dir, extra=None):
    cfg, info, m, loader = _setup(method, rank, world, run_dir, **(extra or {}))
    phase = "parallel" if method in ("penalty", "al") else "serial"
    _steps(m, loader, 0, phase, 2)
    loop = LoopState(epoch=0, position=2, step=2)
    loop.new_epoch(info.device, 0.25)
    loop.loss_sum += 3.5
    loop.phase_times = {phase: 1.5}
    loop.best_acc = 0.5
    torch.manual_seed(123 + rank)
    np.random.seed(7)
    random.seed(9)
    before = _snapshot(m, loop)
    saver = CheckpointSaver(cfg, info, m, cfg.run_dir(), 4, arch={"name": "resnet20"})
    saver.save(loop)

    # Mutate every tracked state: parameters, buffers, optimizer momentum, aux states and
    # multipliers (by training), beta, counters, the loop and all three RNGs.
    _steps(m, loader, 1, phase, 3)
    m.beta = 99.0
    m.skipped_steps = 5
    loop.epoch, loop.position, loop.step, loop.best_acc = 3, 1, 17, 0.9
    loop.loss_sum += 1.0
    loop.phase_times = {"x": 2.0}
    torch.rand(5), np.random.rand(3), random.random()
    mutated = _snapshot(m, loop)
    differed = {k: not _equal(before["method"][k], mutated["method"][k]) for k in before["method"]}
    differed["loop"] = not _equal(before["loop"], mutated["loop"])
    differed["rng"] = not (_equal(before["torch_rng"], mutated["torch_rng"]) or _equal(before["np"], mutated["np"]))

    res = resolve_resume(build_config({"run": {"resume": "latest", "method": method, "out": run_dir},
                                       "dist": {"stages": cfg.dist.stages}, **(extra or {})}), cfg.run_dir(), info)
    saved = load_rank_state(res, info)
    m.load_state_dict(saved["method"])
    loop2 = LoopState()
    loop2.load(saved["loop"], info.device)
    set_rng_state(saved["rng"], info.device)
    after = _snapshot(m, loop2)
    restored = {k: _equal(before["method"][k], after["method"][k]) for k in before["method"]}
    restored["loop"] = _equal({k: v for k, v in before["loop"].items()}, after["loop"])
    restored["rng"] = (_equal(before["torch_rng"], after["torch_rng"]) and _equal(before["np"], after["np"])
                       and before["py"] == after["py"])
    return differed, restored, sorted(before["method"])


@pytest.mark.parametrize("method", ["serial"])
def test_save_mutate_load_restores_everything_single_process(tmp_path, method):
    differed, restored, keys = _roundtrip(0, 1, method, str(tmp_path / "run"))
    for k in ("model", "optimizer", "skipped_steps", "loop", "rng"):
        assert differed[k], f"{k} did not change before the load: the test would prove nothing"
        assert restored[k], f"{k} not restored"


@pytest.mark.parametrize("stage_input", ["aux", "output"])
def test_save_mutate_load_restores_aux_states_and_multipliers_two_ranks(tmp_path, stage_input):
    out = run_ranks(_roundtrip, 2, "al", str(tmp_path / "run"), {"coupling": {"stage_input": stage_input}})
    for rank, (differed, restored, keys) in enumerate(out):
        for k in ("stage", "optimizer", "beta", "skipped_steps", "counters", "loop", "rng"):
            assert differed[k], f"rank {rank}: {k} did not change before the load"
            assert restored[k], f"rank {rank}: {k} not restored"
        if rank == 1:  # the rank that stores boundary 1: z and mu
            assert differed["aux"] and restored["aux"]
    man = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/manifest.json")).read_text())
    assert set(man["files"]) == {"rank-00000.pt", "rank-00001.pt"}


def _make_ckpt(root, step, files=("rank-00000.pt",), manifest=True, lie_size=False):
    d = checkpoint.ckpt_dir(root, step)
    d.mkdir(parents=True)
    meta = {}
    for name in files:
        checkpoint.save_tensors({"x": torch.tensor([step])}, d / name)
        meta[name] = {"bytes": (d / name).stat().st_size + (1 if lie_size else 0),
                      "sha256": checkpoint.sha256_file(d / name)}
    if manifest:
        checkpoint.write_json({"format": checkpoint.CKPT_FORMAT, "step": step, "files": meta},
                              d / checkpoint.MANIFEST)
    return d


def test_latest_checkpoint_skips_incomplete_ones_and_prune_keeps_k(tmp_path):
    run = tmp_path / "run"
    assert checkpoint.latest_checkpoint(run) is None
    _make_ckpt(run, 10)
    _make_ckpt(run, 20)
    _make_ckpt(run, 30, manifest=False)            # crashed before the manifest
    _make_ckpt(run, 40, lie_size=True)             # a file shorter than the manifest says
    d50 = _make_ckpt(run, 50)
    (d50 / "rank-00000.pt").unlink()               # a listed file is gone
    assert checkpoint.latest_checkpoint(run).name == "step-000000020"
    _make_ckpt(run, 60)
    assert checkpoint.latest_checkpoint(run).name == "step-000000060"
    checkpoint.prune_checkpoints(run, keep=2)
    left = sorted(p.name for p in checkpoint.ckpt_root(run).iterdir())
    assert left == ["step-000000020", "step-000000060"]


def test_checkpoint_files_refuse_code_execution(tmp_path):
    """Loading is weights_only: a pickle that would run code is refused with a clear error."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pt"
    f.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception, match="corrupt or not an auxpar file"):
        checkpoint.load_tensors(f)


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in range(1, 8)) + '{"kind": "st')
    truncate_metrics(p, 4)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_from_a_missing_or_incomplete_checkpoint_is_a_clear_error(tmp_path):
    cfg = build_config({"run": {"resume": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(cfg, tmp_path, DistInfo())
    d = _make_ckpt(tmp_path / "r", 5, manifest=False)
    cfg = build_config({"run": {"resume": str(d)}})
    with pytest.raises(ConfigError, match="not a complete auxpar checkpoint"):
        resolve_resume(cfg, tmp_path, DistInfo())


def test_resume_refuses_a_different_stage_input():
    """A checkpoint's aux store holds z (and x only under stage_input = output): resuming with the
    other setting would read states of the wrong meaning, so it is one clear error up front."""
    from pathlib import Path

    from auxpar.resume import check_compatible, run_meta

    info = DistInfo(0, 2, 0, 2, torch.device("cpu"), "gloo")
    aux = build_config({"run": {"method": "penalty"}, "dist": {"stages": 2}})
    out = build_config({"run": {"method": "penalty"}, "dist": {"stages": 2}, "coupling": {"stage_input": "output"}})
    man = {"meta": run_meta(aux, info)}
    check_compatible(man, aux, info, Path("ck"))  # same settings: fine
    with pytest.raises(ConfigError, match=r"--stage-input aux \(checkpoint\) vs output"):
        check_compatible(man, out, info, Path("ck"))
    old = {"meta": {k: v for k, v in man["meta"].items() if k != "stage_input"}}  # written before the option
    check_compatible(old, aux, info, Path("ck"))
    with pytest.raises(ConfigError, match="--stage-input"):
        check_compatible(old, out, info, Path("ck"))
    # methods without aux states do not care
    ser = build_config({"run": {"method": "serial"}})
    ser_info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "none")
    check_compatible({"meta": run_meta(ser, ser_info)},
                     build_config({"run": {"method": "serial"}, "coupling": {"stage_input": "output"}}), ser_info,
                     Path("ck"))
