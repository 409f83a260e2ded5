"""The p2p primitive (auxpar/coupling/comm.py) and the time split (auxpar/timing.py)."""

from __future__ import annotations

import pytest
import torch

from auxpar.coupling.comm import P2P, canonical_order, needs_staging
from auxpar.errors import DistributedError
from auxpar.timing import Clock
from mp_harness import run_ranks


def test_staging_exactly_when_gloo_and_not_cpu():
    assert needs_staging("gloo", torch.device("cuda", 0))
    assert needs_staging("gloo", torch.device("cuda", 1))
    assert not needs_staging("gloo", torch.device("cpu"))
    assert not needs_staging("nccl", torch.device("cuda", 0))
    assert P2P(0, "cpu", "gloo").staging is False
    assert P2P(0, torch.device("cuda", 0), "gloo").staging is True
    assert P2P(0, torch.device("cuda", 0), "nccl").staging is False


def test_canonical_order_agrees_on_both_ends():
    # rank 1 talks to 0 and 2; its view and each peer's view put the pair's messages in the
    # same order: lower -> higher rank first, then the caller's order within a direction.
    ops1 = [("send", 0, 0), ("send", 2, 1), ("recv", 0, 2), ("recv", 2, 3), ("send", 2, 4)]
    order = [ops1[i][:2] for i in canonical_order(1, ops1)]
    assert order == [("recv", 0), ("send", 0), ("send", 2), ("send", 2), ("recv", 2)]
    ops0 = [("send", 1, 0), ("recv", 1, 1)]  # rank 0's side of the (0, 1) pair
    assert [ops0[i][0] for i in canonical_order(0, ops0)] == ["send", "recv"]
    ops2 = [("send", 1, 0), ("recv", 1, 1), ("recv", 1, 2)]  # rank 2's side of (1, 2)
    assert [ops2[i][0] for i in canonical_order(2, ops2)] == ["recv", "recv", "send"]


def test_a_tensor_off_the_ranks_device_is_refused_before_any_communication():
    p = P2P(0, "cpu", "gloo")
    with pytest.raises(DistributedError, match="meta"):
        p.exchange(sends=[(torch.empty(3, device="meta"), 1)])
    assert p.bytes_sent == 0


def _exchange_both_ways(rank, world):
    p = P2P(rank, torch.device("cpu"), "gloo", clock=Clock("cpu"))
    peer = 1 - rank
    mine = torch.full((2, 3), float(rank + 1))
    # both directions in one batch, listed in opposite orders on the two ranks
    if rank == 0:
        got = p.exchange(sends=[(mine, peer)], recvs=[((2, 3), torch.float32, peer)]).wait()
    else:
        got = p.exchange(recvs=[((2, 3), torch.float32, peer)], sends=[(mine, peer)]).wait()
    # several fire-and-forget sends in one direction, received in order
    for i in range(5):
        if rank == 0:
            p.send_async(torch.tensor([float(i)]), 1)
    seq = [p.recv((1,), torch.float32, 0).item() for _ in range(5)] if rank == 1 else []
    p.reap(block=True)
    return {"got": got[0], "seq": seq, "bytes": p.bytes_sent, "staged": p.staged_messages,
            "pending": p.pending, "clock": p.clock.totals()}


@pytest.mark.slow
def test_exchange_on_two_gloo_ranks():
    r0, r1 = run_ranks(_exchange_both_ways, 2)
    assert torch.equal(r0["got"], torch.full((2, 3), 2.0)) and torch.equal(r1["got"], torch.full((2, 3), 1.0))
    assert r1["seq"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert r0["bytes"] == 6 * 4 + 5 * 4 and r1["bytes"] == 6 * 4
    assert r0["staged"] == r1["staged"] == 0  # gloo on CPU never stages
    assert r0["pending"] == 0
    assert r1["clock"]["wait"] >= 0.0 and r1["clock"]["comm"] > 0.0


def test_clock_on_cpu_accumulates_and_round_trips():
    c = Clock("cpu")
    with c.section("compute"):
        sum(range(10000))
    tok = c.start()
    c.stop("wait", tok)
    c.add("step", 1.5)
    t = c.totals()
    assert t["compute"] > 0 and t["wait"] >= 0 and t["step"] == 1.5 and t["comm"] == 0.0
    d = Clock("cpu")
    d.load_state_dict(c.state_dict())
    assert d.totals() == t


def test_pipelining_over_gloo_on_a_gpu_is_refused_with_the_fix():
    from auxpar.coupling.pipeline import check_transport

    check_transport("gloo", torch.device("cpu"), "--method pipeline")
    check_transport("nccl", torch.device("cuda", 0), "--method pipeline")
    with pytest.raises(DistributedError, match="--backend nccl"):
        check_transport("gloo", torch.device("cuda", 0), "--method pipeline")
