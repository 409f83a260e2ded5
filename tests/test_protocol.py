"""The NCCL protocol checker: every method's real multi-rank runs, replayed under NCCL's rules.

Each run goes through the CLI on gloo with the recorder (tests/protocol/sitecustomize.py) on;
tests/protocol_check.py replays every rank's calls in both NCCL queue models and asserts: no
deadlock, the n-th send from a to b matches the n-th receive at b in shape and dtype, no
message left unmatched, every tensor on the rank's device. The checker's own negative cases
(the old penalty/AL post order, a size mismatch, a CPU tensor on a CUDA rank) come first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env
from protocol_check import MODELS, ProtocolError, check_dir, replay

PROTO_DIR = Path(__file__).resolve().parent / "protocol"


# ------------------------------------------------------------------ the checker's negative cases

def _p2p(i, *ops, group="world"):
    return {"ev": "issue", "id": i, "kind": "p2p", "group": group,
            "ops": [[k, peer, list(shape), "float32", "cpu"] for k, peer, shape in ops]}


def _wait(i):
    return {"ev": "wait", "id": i}


def _coll(i, name="all_reduce", shape=(2,)):
    return {"ev": "issue", "id": i, "kind": "coll", "name": name, "group": "world", "shape": list(shape),
            "dtype": "float32", "device": "cpu"}


S = (4, 3)


def old_post_order_traces():
    """penalty K=2 before the fix: rank 1 posted (send t_j, recv o_j) per step, rank 0 posted
    recv t_j, recv t_{j+1} early and sent o_j after its forward; each op its own item."""
    r1 = [_p2p(1, ("send", 0, S)), _p2p(2, ("recv", 0, S)),           # _post(0)
          _p2p(3, ("send", 0, S)), _p2p(4, ("recv", 0, S)),           # _post(1), early
          _wait(2)]
    r0 = [_p2p(1, ("recv", 1, S)), _p2p(2, ("recv", 1, S)),           # _post(0), _post(1)
          _wait(1), _p2p(3, ("send", 1, S)), _wait(3)]                 # forward, then send o_0
    return {0: r0, 1: r1}


def new_post_order_traces():
    """The same two steps in today's order: T(j) and O(j) are single batched exchanges."""
    r0, r1 = [], []
    i = 0
    for j in range(2):
        for r, ops in ((r0, [("recv", 1, S)]), (r1, [("send", 0, S)])):  # T(j+?) posted early
            r.append(_p2p(100 + j, *ops))
    for j in range(2):
        r0 += [_p2p(10 + j, ("send", 1, S)), _wait(100 + j), _coll(20 + j), _wait(20 + j)]
        r1 += [_p2p(10 + j, ("recv", 0, S)), _coll(20 + j), _wait(20 + j), _wait(10 + j)]
        i += 1
    return {0: r0, 1: r1}


@pytest.mark.parametrize("model", MODELS)
def test_checker_catches_the_old_penalty_post_order(model):
    with pytest.raises(ProtocolError, match="deadlock"):
        replay(old_post_order_traces(), model)


@pytest.mark.parametrize("model", MODELS)
def test_checker_passes_the_new_post_order(model):
    res = replay(new_post_order_traces(), model)
    assert res["messages"] == 4 and res["collectives"] == 4


def test_checker_catches_a_size_mismatch_and_an_unmatched_send():
    tr = {0: [_p2p(1, ("send", 1, (4, 3))), _wait(1)], 1: [_p2p(1, ("recv", 0, (4, 2))), _wait(1)]}
    with pytest.raises(ProtocolError, match="message 0 from rank 0 to rank 1"):
        replay(tr)
    tr = {0: [_p2p(1, ("send", 1, S)), _p2p(2, ("send", 1, S))], 1: [_p2p(1, ("recv", 0, S)), _wait(1)]}
    with pytest.raises(ProtocolError, match="deadlock"):  # the second send is never received
        replay(tr)


def test_checker_separates_the_two_queue_models():
    # rank 0: recv from 1, then send to 2; rank 2 waits for rank 0 before it sends to 1's... a
    # cross-peer dependency that only the shared queue (device_id set) turns into a deadlock.
    tr = {0: [_p2p(1, ("recv", 1, S)), _p2p(2, ("send", 2, S))],
          1: [_p2p(1, ("recv", 2, S)), _wait(1), _p2p(2, ("send", 0, S))],
          2: [_p2p(1, ("recv", 0, S)), _wait(1), _p2p(2, ("send", 1, S))]}
    replay(tr, "rank_group_peer")
    with pytest.raises(ProtocolError, match="deadlock"):
        replay(tr, "rank_group")


def test_checker_catches_a_cpu_tensor_on_a_cuda_rank():
    tr = new_post_order_traces()
    with pytest.raises(ProtocolError, match="rank's device is cuda"):
        replay(tr, "rank_group", device="cuda")


def test_collective_mismatch_is_caught():
    tr = {0: [_coll(1, shape=(2,)), _wait(1)], 1: [_coll(1, shape=(3,)), _wait(1)]}
    with pytest.raises(ProtocolError, match="collective mismatch"):
        replay(tr)


# ------------------------------------------------------------------ real runs through the CLI

def traced_run(trace_dir: Path, *args, env_extra=None, timeout=300, nproc=None):
    trace_dir.mkdir(parents=True, exist_ok=True)
    env = cli_env()
    env["PYTHONPATH"] = str(PROTO_DIR) + os.pathsep + env["PYTHONPATH"]
    env["AUXPAR_PROTOCOL_TRACE"] = str(trace_dir)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "auxpar", *args, "--progress", "off", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def checked(trace_dir: Path, min_messages=1):
    res = check_dir(str(trace_dir), device="cpu")
    assert res["messages"] >= min_messages, res
    return res


COMMON = ("--dataset", "digits", "--batch-size", "128", "--eval-every", "1", "--set", "data.train_subset=512")
SPH = ("--epochs", "3", "--phases", "parallel:1,serial:1")  # parallel -> serial -> parallel


@pytest.mark.slow
@pytest.mark.parametrize("method,K,executor,stage_input", [
    ("penalty", 2, "layer", "aux"), ("al", 2, "pipeline", "output"), ("penalty", 3, "pipeline", "output"),
    ("al", 3, "layer", "aux")])
def test_protocol_penalty_al_sph_ds2(tmp_path, method, K, executor, stage_input):
    traced_run(tmp_path / "t", "train", "--method", method, "--stages", str(K), *COMMON, *SPH,
               "--ds-factor", "2", "--serial-executor", executor, "--microbatches", "4",
               "--stage-input", stage_input, "--out", str(tmp_path / "run"),
               # K = 3: the cut by measured time (its meeting all-reduce, then rank 0's cut) too
               *(["--balance", "time"] if K == 3 else []),
               # AL at K = 2: the boundary inside block 3 (model.split_blocks: a 48-channel state)
               *(["--split-blocks", "3", "--split", "4,6"] if (method, K) == ("al", 2) else []))
    # model.pt was gathered on the last rank through the primitive
    assert (tmp_path / "run" / "model.pt").exists()
    if (method, K) == ("al", 2):
        import json
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["split"] == [4, 6]
    res = checked(tmp_path / "t", min_messages=3 * 12)
    assert res["ranks"] == K


@pytest.mark.slow
def test_protocol_penalty_max_steps_cuts_a_parallel_epoch(tmp_path):
    """run.max_steps ending inside a parallel epoch (epoch 3 of 4 steps stops after 2): no
    message is posted for a batch that never trains, and the ranks still agree."""
    traced_run(tmp_path / "t", "train", "--method", "penalty", "--stages", "2", *COMMON, *SPH,
               "--max-steps", "10", "--out", str(tmp_path / "run"))
    import json
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 10 and (tmp_path / "run" / "model.pt").exists()
    checked(tmp_path / "t", min_messages=2 * 6)


@pytest.mark.slow
@pytest.mark.parametrize("method,executor", [("penalty", "layer"), ("al", "pipeline")])
def test_protocol_penalty_al_on_a_2x2_mesh(tmp_path, method, executor):
    """K = 2 x D = 2: neighbour messages on the world group between a replica's stages, the
    replicas' gradient all-reduce (DDP's comm hook) on each stage's replica group, the guard on
    the world, the clip on the layer group, checkpoints and the model.pt gather."""
    traced_run(tmp_path / "t", "train", "--method", method, "--stages", "2", "--dp", "2", *COMMON, *SPH,
               "--ds-factor", "2", "--serial-executor", executor, "--microbatches", "2",
               "--set", "optim.grad_clip=1.0", "--checkpoint-every", "3s", "--log-every", "2",
               "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "model.pt").exists()
    res = checked(tmp_path / "t", min_messages=3 * 4)
    assert res["ranks"] == 4 and res["collectives"] > 0


@pytest.mark.slow
def test_protocol_checkpoint_resume_and_nan_guard(tmp_path):
    run = tmp_path / "run"
    base = ("train", "--method", "penalty", "--stages", "2", *COMMON, *SPH, "--checkpoint-every", "5s",
            "--on-nan", "skip", "--out", str(run))
    # 1) checkpoints mid-epoch and a NaN skipped on rank 1 at step 3 (the guard's skip path)
    traced_run(tmp_path / "t1", *base, env_extra={"AUXPAR_FAULT": "nan:1:3"})
    checked(tmp_path / "t1")
    # 2) a run killed mid-epoch (not traced), then its resume (traced)
    run2 = tmp_path / "run2"
    env = cli_env()
    killed = subprocess.run([sys.executable, "-m", "auxpar", *base[:-1], str(run2), "--progress", "off"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**env, "AUXPAR_FAULT": "kill:1:6"})
    assert killed.returncode != 0
    traced_run(tmp_path / "t2", *base[:-1], str(run2), "--resume", "latest")
    checked(tmp_path / "t2")
    import json
    assert json.loads((run2 / "summary.json").read_text())["resumed_from_step"] == 5  # mid-epoch 2


@pytest.mark.slow
@pytest.mark.parametrize("extra,nproc", [
    (("--mgrit-levels", "2", "--mgrit-relax", "F", "--mgrit-fwd-iters", "2", "--mgrit-bwd-iters", "2"), 2),
    (("--mgrit-levels", "3", "--mgrit-relax", "FCF", "--mgrit-tol", "1e-3", "--mgrit-nested",
      "--mgrit-cfactor", "2"), 2),
    (("--mgrit-levels", "1",), 2),
    (("--mgrit-levels", "2", "--dp", "2", "--phases", "parallel:1,serial:1"), 4),
])
def test_protocol_mgrit(tmp_path, extra, nproc):
    traced_run(tmp_path / "t", "train", "--method", "mgrit", "--stages", "2", *COMMON, "--epochs", "2",
               *extra, "--nproc", str(nproc), "--out", str(tmp_path / "run"))
    res = checked(tmp_path / "t")
    assert res["ranks"] == nproc


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_protocol_pipeline(tmp_path, schedule):
    traced_run(tmp_path / "t", "train", "--method", "pipeline", "--stages", "2", *COMMON, "--epochs", "1",
               "--pipeline-schedule", schedule, "--microbatches", "4", "--out", str(tmp_path / "run"))
    checked(tmp_path / "t")


@pytest.mark.slow
def test_protocol_ddp(tmp_path):
    traced_run(tmp_path / "t", "train", "--method", "ddp", "--nproc", "2", *COMMON, "--epochs", "1",
               "--out", str(tmp_path / "run"))
    res = check_dir(str(tmp_path / "t"))
    assert res["collectives"] > 0
