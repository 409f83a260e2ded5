"""Multi-GPU readiness, checked on the CPU: checkpoints load to the CPU first, collectives get
device tensors, the host aux store hands back complete rows, and too few GPUs is a clear error.

No GPU here: a CUDA device is faked where the code only *names* it (``torch.device("cuda", 0)``),
or replaced by the ``meta`` device where a tensor must really be created off the CPU.
"""

from __future__ import annotations

import pytest
import torch

from auxpar import checkpoint
from auxpar import distributed as dist
from auxpar.config import build_config
from auxpar.coupling.aux_store import AuxStore
from auxpar.distributed import DistInfo
from auxpar.errors import DistributedError
from auxpar.resume import CheckpointSaver, LoopState, load_rank_state, resolve_resume, set_rng_state
from conftest import run_cli
from test_checkpoint import _setup

CUDA0 = torch.device("cuda", 0)


# --------------------------------------------------------------------------- 1. checkpoints load to the CPU

@pytest.fixture
def recorded_loads(monkeypatch):
    """Every checkpoint.load_tensors call's map_location, the real load still done (on the CPU)."""
    seen = []
    real = checkpoint.load_tensors

    def spy(path, map_location="cpu"):
        seen.append(str(map_location))
        return real(path, map_location="cpu")

    monkeypatch.setattr(checkpoint, "load_tensors", spy)
    return seen


def test_resume_loads_rank_state_on_the_cpu_whatever_the_device(tmp_path, recorded_loads):
    run_dir = str(tmp_path / "run")
    cfg, info, m, _ = _setup("serial", 0, 1, run_dir)
    loop = LoopState(epoch=0, position=1, step=1)
    loop.new_epoch(info.device, 0.0)
    CheckpointSaver(cfg, info, m, cfg.run_dir(), 4, arch={"name": "resnet20"}).save(loop)
    res = resolve_resume(build_config({"run": {"resume": "latest", "method": "serial", "out": run_dir}}),
                         cfg.run_dir(), info)
    on_gpu = DistInfo(0, 1, 0, 1, CUDA0, "none")  # a CUDA run resuming: only the name matters here
    state = load_rank_state(res, on_gpu)
    assert recorded_loads == ["cpu"]
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8
    # the method copies CPU tensors into its own (device) tensors
    m.load_state_dict(state["method"])


def test_rng_restore_takes_cpu_states_and_restores_the_cuda_generator(monkeypatch):
    from auxpar import resume

    st = resume.rng_state(torch.device("cpu"))
    assert "cuda" not in st
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s.device.type, device)))
    st["cuda"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA run writes (get_rng_state: CPU bytes)
    set_rng_state(st, CUDA0)
    assert calls == [("cpu", CUDA0)]
    set_rng_state(st, torch.device("cpu"))  # a CPU run ignores a CUDA state
    assert len(calls) == 1


def test_rng_state_saves_the_cuda_generator_on_cuda(monkeypatch):
    from auxpar import resume

    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((8,), 3, dtype=torch.uint8))
    st = resume.rng_state(CUDA0)
    assert torch.equal(st["cuda"], torch.full((8,), 3, dtype=torch.uint8))


def test_export_reads_the_model_file_on_the_cpu_then_moves_the_model(tmp_path, recorded_loads):
    from auxpar.export import load_model
    from auxpar.models import build_model
    from auxpar.resume import model_file

    arch = {"name": "resnet20", "in_channels": 3, "input_size": 8, "num_classes": 4, "dropout": 0.0, "norm": "bn"}
    net = build_model("resnet20", in_channels=3, input_size=8, num_classes=4)
    cfg = build_config({"run": {"method": "serial"}})
    checkpoint.save_tensors(model_file(arch, cfg, net.state_dict(), 0.5, 3), tmp_path / "model.pt")
    got, meta = load_model(tmp_path / "model.pt", "meta")  # meta: a non-CPU device without a GPU
    assert recorded_loads == ["cpu"]
    assert next(got.parameters()).device.type == "meta" and meta["step"] == 3


# --------------------------------------------------------------------------- 2. time-balanced split

def test_time_balanced_split_hands_the_collective_a_device_tensor(monkeypatch):
    from auxpar import trainer

    class Stop(Exception):
        pass

    seen = []

    def fake_all_reduce(info, t, op="sum"):
        seen.append(t.device)
        raise Stop  # meta tensors have no values to read back: the device is what is checked

    monkeypatch.setattr(trainer, "measure_costs", lambda net, bs, device, **kw: [1.0] * 9)
    monkeypatch.setattr(trainer, "time_stage_cuts", lambda net, cands, bs, device, **kw: [[1.0] * len(c) for c in cands])
    monkeypatch.setattr(trainer, "all_reduce_", fake_all_reduce)
    cfg = build_config({"dist": {"stages": 3}})
    for rank in (0, 1):
        info = DistInfo(rank, 3, rank, 3, torch.device("meta"), "gloo")
        with pytest.raises(Stop):
            trainer.time_balanced_split(None, cfg, info)
    assert [d.type for d in seen] == ["meta", "meta"]


def test_time_balanced_split_on_the_cpu_single_process(monkeypatch):
    from auxpar import trainer

    asked = []

    def fake_costs(net, bs, device, channels_last=False):
        asked.append(channels_last)
        return [1.0] * 9

    def fake_stage_times(net, cands, bs, device, channels_last=False):
        asked.append(("stages", channels_last))
        return [[1.0] * len(c) for c in cands]  # all alike: the block-time cut stays

    monkeypatch.setattr(trainer, "measure_costs", fake_costs)
    monkeypatch.setattr(trainer, "time_stage_cuts", fake_stage_times)
    cfg = build_config({"dist": {"stages": 3}})
    assert trainer.time_balanced_split(None, cfg, DistInfo()) == [3, 3, 3]
    # --channels-last runs are profiled in that memory format (the cut depends on it)
    cfg = build_config({"dist": {"stages": 3}, "run": {"channels_last": True}})
    assert trainer.time_balanced_split(None, cfg, DistInfo()) == [3, 3, 3]
    assert asked == [False, ("stages", False), True, ("stages", True)]


# --------------------------------------------------------------------------- 3. host aux store

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("placement", ["device", "host"])
def test_aux_store_round_trip(placement, dtype):
    s = AuxStore(10, (2, 3), dtype=dtype, placement=placement, multipliers=True)
    idx = torch.tensor([7, 2, 5])
    z = torch.randn(3, 2, 3)
    s.put_z(idx, z)
    s.put_mu(idx, 2 * z)
    tol = 0 if dtype == "fp32" else 1e-2
    got = s.get_z(torch.tensor([2, 5, 7]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, z[[1, 2, 0]].to(s.dtype).float(), atol=tol, rtol=0)
    torch.testing.assert_close(s.get_mu(idx), (2 * z).to(s.dtype).float(), atol=tol, rtol=0)
    assert float(s.get_z(torch.tensor([0])).abs().sum()) == 0.0  # untouched rows stay zero
    # a put right after the values were computed, then an immediate read: complete rows
    s.put_z(idx, z + 1)
    torch.testing.assert_close(s.get_z(idx), (z + 1).to(s.dtype).float(), atol=tol, rtol=0)


def test_aux_store_puts_copy_synchronously(monkeypatch):
    """The device->host copy of a put must not be non_blocking (the host scatter reads it next)."""
    s = AuxStore(4, (2,), placement="host", multipliers=True)
    calls = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    s.put_z(torch.tensor([1]), torch.ones(1, 2))
    s.put_mu(torch.tensor([1]), torch.ones(1, 2))
    monkeypatch.undo()
    assert calls and not any(calls)


# --------------------------------------------------------------------------- 4. too few GPUs

@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one visible GPU (only the calls pick_device makes are faked)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # no per-process binding
    return chosen


def test_nccl_with_more_local_ranks_than_gpus_names_both_counts(one_gpu):
    with pytest.raises(DistributedError) as e:
        dist.pick_device("auto", 1, "nccl", 2)
    msg = str(e.value)
    assert "2 local ranks but only 1 visible GPU" in msg and "--backend gloo" in msg and "--nproc 1" in msg
    assert e.value.same_on_every_rank  # every rank sees it: rank 0 prints it once
    with pytest.raises(DistributedError, match="2 local ranks but only 1"):
        dist.pick_device("cuda", 0, "nccl", 2)  # rank 0 stops too, instead of waiting for rank 1
    assert one_gpu == []


def test_gloo_lets_ranks_share_a_gpu(one_gpu):
    assert dist.pick_device("auto", 1, "gloo", 2) == CUDA0
    assert dist.pick_device("cuda", 0, "gloo", 2) == CUDA0
    assert dist.pick_device("auto", 0, "nccl", 1) == CUDA0
    assert one_gpu == [CUDA0] * 3


def test_backend_is_decided_before_the_device(one_gpu):
    assert dist.resolve_backend("auto", "auto") == "nccl"
    assert dist.resolve_backend("cpu", "auto") == "gloo"
    assert dist.resolve_backend("auto", "gloo") == "gloo"
    with pytest.raises(DistributedError, match="--backend gloo"):
        dist.resolve_backend("cpu", "nccl")


def test_init_with_one_gpu_two_local_ranks_nccl_stops_before_joining(one_gpu, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    monkeypatch.setattr(dist.tdist, "rendezvous", lambda *a, **k: pytest.fail("joined the rendezvous"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(DistributedError, match="2 local ranks but only 1 visible GPU"):
            dist.init("auto", "auto")
        with pytest.raises(DistributedError, match="2 local ranks but only 1 visible GPU"):
            dist.init("auto", "nccl")
    finally:
        torch.set_num_threads(threads)


def test_nccl_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedError, match="torch sees no GPU; use --backend gloo"):
        dist.resolve_backend("auto", "nccl")
    with pytest.raises(DistributedError, match="use --backend gloo"):
        dist.pick_device("auto", 0, "nccl", 1)
    with pytest.raises(DistributedError, match="use --device cpu"):
        dist.pick_device("cuda", 0, "gloo", 1)
    assert dist.pick_device("auto", 0, "gloo", 2) == torch.device("cpu")


def test_cli_nccl_on_a_cpu_machine_exits_with_the_message_not_a_hang():
    r = run_cli("train", "--method", "penalty", "--stages", "2", "--dataset", "synthetic", "--backend", "nccl",
                "--progress", "off", "--out", "/nonexistent/never-written", timeout=120)
    assert r.returncode != 0
    assert "nccl needs CUDA devices" in r.stderr and "--backend gloo" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_one_gpu_per_process_binding_is_not_sharing(one_gpu, monkeypatch):
    """CUDA_VISIBLE_DEVICES with one entry per process (SLURM --gpus-per-task): every rank sees
    one GPU, its own; pick_device lets it through and the UUID check decides."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert dist.pick_device("auto", 1, "nccl", 2) == CUDA0


class _Props:
    def __init__(self, uuid):
        self.uuid = uuid


def test_uuid_check_catches_two_ranks_on_one_gpu_and_passes_distinct_gpus(monkeypatch):
    import socket

    from torch.distributed import HashStore

    host = socket.gethostname()
    store = HashStore()
    store.set(f"{host}/0", "GPU-aaaa")  # what local rank 0 published
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: _Props("GPU-bbbb"))
    dist.check_one_rank_per_gpu(store, CUDA0, 1, 2)  # distinct: fine
    store = HashStore()
    store.set(f"{host}/0", "GPU-aaaa")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: _Props("GPU-aaaa"))
    with pytest.raises(DistributedError, match=r"2 local ranks but only 1 distinct GPU\(s\).*--backend gloo"):
        dist.check_one_rank_per_gpu(store, CUDA0, 1, 2)
