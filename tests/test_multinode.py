"""Multi-node runs: two torchrun agents on this machine play two nodes (c10d rendezvous, 2 x 2
ranks), and the check that a run with checkpoints has one run directory shared by all ranks
(auxpar/shared_fs.py).

A node-local disk at the same path on each node looks, to auxpar, exactly like giving the second
agent a different ``--out``: rank 0 cannot see the other node's files. That is how the tests
below stage a cluster without a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from auxpar import shared_fs
from auxpar.config import build_config
from auxpar.distributed import DistInfo
from auxpar.errors import ConfigError
from auxpar.trainer import needs_shared_run_dir
from conftest import ROOT, cli_env, read_summary
from mp_harness import run_ranks

METHOD_ARGS = ["--method", "penalty", "--stages", "2", "--dp", "2"]
"""4 ranks = 2 nodes x 2 ranks: penalty on a K = 2 x D = 2 mesh (rank = d * K + k, so each node
holds one replica's two stages and only the replicas' gradient all-reduce crosses nodes)."""

TINY = ["--dataset", "digits", "--model", "resnet14", "--seed", "0", "--threads", "1", "--progress", "off"]
NOT_SHARED = "is not on a filesystem shared by all ranks"


# --------------------------------------------------------------------------- two torchrun agents

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(outs: tuple[Path, Path], *args: str, timeout: float = 150) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents ("nodes") of 2 ranks each, joined by a c10d rendezvous on this
    machine; agent n trains with ``--out outs[n]``. Both are killed (with their workers) if
    they outlive ``timeout``, so a hang fails the test instead of blocking it."""
    port = _free_port()
    procs = []
    for out in outs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
               "--max-restarts", "0", "-m", "auxpar", "train", *METHOD_ARGS, *TINY, *args, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=cli_env(), cwd=ROOT, start_new_session=True))
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two torchrun agents did not finish within {timeout:.0f}s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return done


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_nodes_shared_run_dir_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    r = _two_agents((run, run), "--epochs", "1", "--checkpoint-every", "1")
    assert [p.returncode for p in r] == [0, 0], r[0].stderr[-3000:] + r[1].stderr[-3000:]
    s = read_summary(run)
    assert s["world_size"] == 4 and s["steps"] > 0
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1
    man = json.loads((ckpts[0] / "manifest.json").read_text())
    assert sorted(man["files"]) == [f"rank-{r:05d}.pt" for r in range(4)]
    assert not (run / shared_fs.PROBE_DIR).exists()  # the probe cleans up after itself
    # as if the run had been stopped after its checkpoint; both nodes then resume from it
    steps = s["steps"]
    (run / "summary.json").unlink()
    r = _two_agents((run, run), "--epochs", "2", "--checkpoint-every", "1", "--resume", "latest")
    assert [p.returncode for p in r] == [0, 0], r[0].stderr[-3000:] + r[1].stderr[-3000:]
    s = read_summary(run)
    assert s["world_size"] == 4 and s["resumed_from_step"] == steps and s["steps"] == 2 * steps
    assert "resumed from" in r[0].stdout + r[1].stdout


@pytest.mark.slow
def test_two_nodes_without_a_shared_run_dir_stop_before_training_with_one_clear_error(tmp_path):
    a, b = tmp_path / "node0", tmp_path / "node1"
    t0 = time.monotonic()
    r = _two_agents((a, b), "--epochs", "1", "--checkpoint-every", "1", timeout=120)
    assert time.monotonic() - t0 < 100
    for n, p in enumerate(r):
        assert p.returncode != 0, f"agent {n} exited 0"
        # the error is in each node's log (printed by the node's first local rank), once
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("auxpar: error:")]
        assert len(lines) == 1, p.stderr[-3000:]
        assert NOT_SHARED in lines[0] and "--checkpoint-every" in lines[0] and "shared by all nodes" in lines[0]
        assert "cannot see the files of ranks" in lines[0]
        assert str(ROOT / "auxpar") not in p.stderr  # no auxpar traceback (torchrun prints its own)
    # the same message on both nodes (apart from the "[rank R]" prefix)
    msgs = [next(ln for ln in p.stderr.splitlines() if ln.startswith("auxpar: error:")).split("] ", 1)[1]
            for p in r]
    assert msgs[0] == msgs[1]
    # nothing was trained or saved, and the probe left no trace (both directories were new)
    assert not a.exists() and not b.exists()


@pytest.mark.slow
def test_two_nodes_without_a_shared_run_dir_train_fine_without_checkpoints(tmp_path):
    # Without checkpoints only the log rank writes the run directory: node-local --out works, and
    # the files are on the node of the log rank (which agent that is, the rendezvous decides).
    a, b = tmp_path / "node0", tmp_path / "node1"
    r = _two_agents((a, b), "--epochs", "1")
    assert [p.returncode for p in r] == [0, 0], r[0].stderr[-3000:] + r[1].stderr[-3000:]
    written = [d for d in (a, b) if (d / "summary.json").exists()]
    assert len(written) == 1
    assert read_summary(written[0])["world_size"] == 4
    assert not any(d.exists() for d in (a, b) if d not in written)  # the other node wrote nothing


# --------------------------------------------------------------------------- the probe itself

def _probe(rank, world, dirs, grace_s):
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo")
    try:
        shared_fs.check_shared_run_dir(dirs[rank], info, grace_s=grace_s)
        return None
    except ConfigError as exc:
        return str(exc)


def test_probe_passes_on_a_shared_dir_and_stops_every_rank_on_separate_dirs(tmp_path):
    shared = tmp_path / "shared"
    # an earlier run's checkpoint in rank 0's directory: the probe must not touch it
    ck = tmp_path / "own0" / "checkpoints" / "step-000000010"
    ck.mkdir(parents=True)
    (ck / "rank-00000.pt").write_bytes(os.urandom(1000))
    (ck / "manifest.json").write_text("{}")
    before = {p: _sha(p) for p in ck.iterdir()}
    dirs = [str(shared)] * 2
    own = [str(tmp_path / "own0"), str(tmp_path / "own1")]

    out = run_ranks(_probe, 2, dirs, 3.0)
    assert out == [None, None]
    assert shared.is_dir() and list(shared.iterdir()) == []  # .fs-probe removed

    out = run_ranks(_probe, 2, own, 0.2)
    assert out[0] is not None and out[0] == out[1]  # the same error on every rank
    host = socket.gethostname()
    assert NOT_SHARED in out[0] and f"rank 0 (host {host}) cannot see the files of rank 1" in out[0]
    assert f"rank 1 (host {host}) cannot see the files of rank 0" in out[0]
    assert "different run directories" in out[0] and "drop --checkpoint-every / --resume" in out[0]
    assert {p: _sha(p) for p in ck.iterdir()} == before  # an existing run is left as it was
    assert sorted(os.listdir(tmp_path / "own0")) == ["checkpoints"]
    assert not (tmp_path / "own1").exists()  # created by the probe only: removed again


def test_probe_is_a_no_op_for_one_process(tmp_path):
    shared_fs.check_shared_run_dir(tmp_path / "run", DistInfo())
    assert not (tmp_path / "run").exists()


def test_probe_runs_only_for_several_ranks_with_checkpoints_or_resume():
    def cfg(**run):
        return build_config({"run": run})

    four = DistInfo(0, 4, 0, 2, torch.device("cpu"), "gloo")
    assert needs_shared_run_dir(cfg(checkpoint_every="1"), four)
    assert needs_shared_run_dir(cfg(checkpoint_every="200s"), four)
    assert needs_shared_run_dir(cfg(resume="latest"), four)
    assert not needs_shared_run_dir(cfg(), four)
    assert not needs_shared_run_dir(cfg(checkpoint_every="off"), four)
    assert not needs_shared_run_dir(cfg(checkpoint_every="1"), DistInfo())


def test_failure_message_names_ranks_hosts_and_unwritable_directories():
    assert shared_fs.format_ranks([3]) == "rank 3"
    assert shared_fs.format_ranks([0, 1]) == "ranks 0, 1"
    assert shared_fs.format_ranks([0, 1, 2, 5, 7, 8, 9]) == "ranks 0-2, 5, 7-9"
    views = [{"rank": r, "host": f"n{r // 2}", "run_dir": "/scratch/run", "write_error": None,
              "missing": shared_fs._ranges([2, 3] if r < 2 else [0, 1])} for r in range(4)]
    msg = shared_fs.failure_message(views)
    assert msg.startswith("the run directory /scratch/run is not on a filesystem shared by all ranks: "
                          "ranks 0, 1 (host n0) cannot see the files of ranks 2, 3 (host n1); "
                          "ranks 2, 3 (host n1) cannot see the files of ranks 0, 1 (host n0).")
    assert "different run directories" not in msg and "NFS, Lustre" in msg
    views[3]["write_error"] = "Permission denied: /scratch/run/.fs-probe"
    msg = shared_fs.failure_message(views)
    assert msg.startswith("rank 3 (host n1) cannot write to the run directory (rank 3: Permission denied")


def test_an_error_every_rank_raises_is_printed_once_per_node(monkeypatch, capsys):
    from auxpar.cli import _report

    def printed(rank, local_rank, local_world, exc):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        _report(exc)
        return capsys.readouterr().err

    same = ConfigError("the same everywhere")
    # two nodes of 2 ranks: global rank 0 and the other node's local rank 0
    assert [bool(printed(r, r % 2, 2, same)) for r in range(4)] == [True, False, True, False]
    assert printed(2, 0, 2, same) == "auxpar: error: [rank 2] the same everywhere\n"
    # one node of 4 ranks (torchrun --standalone, --nproc): rank 0 only, as before
    assert [bool(printed(r, r, 4, same)) for r in range(4)] == [True, False, False, False]
    # an error of one rank is printed by that rank
    own = ConfigError("mine")
    own.same_on_every_rank = False
    assert printed(3, 1, 2, own) == "auxpar: error: [rank 3] mine\n"
