"""Replay recorded torch.distributed calls under NCCL's matching rules (the protocol checker).

gloo forgives what NCCL does not. The recorder (``tests/protocol/sitecustomize.py``) writes
what every rank of a real gloo run issued and when its host blocked; :func:`replay` then
executes those records on an abstract NCCL:

* no tags: between two ranks, the n-th send from a to b matches the n-th receive at b from a,
  and the two must agree in shape and dtype;
* ops run in issue order per queue, and an op at the head of its queue blocks it: a receive
  until the peer's send, a send until the peer's receive (no eager buffering), a collective
  until every member of the group has it at the head of its queue;
* a batch (``batch_isend_irecv``) is ONE item: its ops progress together and it leaves the
  queue when all of them matched;
* the host of a rank blocks at each recorded wait until that item completed, and issues
  nothing meanwhile.

Two queue models, both checked: ``"rank_group"`` (``device_id`` given to
``init_process_group``: every p2p op and collective of a rank on a group shares one queue) and
``"rank_group_peer"`` (without it: one queue per peer for p2p, one for collectives).

Every tensor must also be on the rank's device (an NCCL-only group has no CPU backend).
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field

MODELS = ("rank_group", "rank_group_peer")


class ProtocolError(AssertionError):
    pass


@dataclass(eq=False)
class Item:
    rank: int
    id: int
    kind: str  # p2p | coll
    group: tuple
    ops: list = field(default_factory=list)  # p2p: [kind, peer, shape, dtype, device, seq, matched]
    name: str = ""
    shape: object = None
    dtype: object = None
    done: bool = False
    queues: list = field(default_factory=list)


def load(trace_dir: str) -> dict[int, list[dict]]:
    """{rank: events} from one run's trace files (one process per rank)."""
    out: dict[int, list[dict]] = {}
    files = sorted(glob.glob(os.path.join(trace_dir, "trace-*.jsonl")))
    if not files:
        raise ProtocolError(f"no trace files in {trace_dir}: did the recorder run?")
    for path in files:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        head = lines[0]
        assert head["ev"] == "header", path
        rank = head["rank"]
        if rank in out:
            raise ProtocolError(f"two processes recorded rank {rank} in {trace_dir} (a restart?)")
        out[rank] = lines[1:]
    return out


def _group(g, world: int) -> tuple:
    return tuple(range(world)) if g == "world" else tuple(g)


def replay(traces: dict[int, list[dict]], model: str = "rank_group", device: str | None = None) -> dict:
    """Replay ``traces`` under ``model``; raise ProtocolError on a deadlock, a mismatch, an
    unmatched message or a tensor off ``device``. Returns counts for the test to inspect."""
    if model not in MODELS:
        raise ValueError(model)
    world = max(traces) + 1
    errors: list[str] = []
    items: dict[tuple[int, int], Item] = {}
    seq = defaultdict(int)  # (src, dst, group, kind) -> next sequence number
    pos = {r: 0 for r in traces}
    queues: dict[tuple, deque] = defaultdict(deque)
    n_p2p = n_coll = 0

    def check_device(rank, dev, what):
        if device is not None and dev is not None and dev != device and not dev.startswith(device + ":"):
            errors.append(f"rank {rank}: {what} handed a tensor on {dev} to torch.distributed "
                          f"(the rank's device is {device})")

    def issue(rank, ev):
        nonlocal n_p2p, n_coll
        g = _group(ev["group"], world)
        it = Item(rank, ev["id"], ev["kind"], g)
        if ev["kind"] == "p2p":
            n_p2p += 1
            keys = []
            for kind, peer, shape, dtype, dev in ev["ops"]:
                check_device(rank, dev, f"a {kind} to/from rank {peer}")
                src, dst = (rank, peer) if kind == "send" else (peer, rank)
                key = (src, dst, g, kind)
                it.ops.append([kind, peer, shape, dtype, dev, seq[key], False])
                seq[key] += 1
                keys.append((rank, g) if model == "rank_group" else (rank, g, peer))
            it.queues = list(dict.fromkeys(keys))
        else:
            n_coll += 1
            check_device(rank, ev.get("device"), f"collective {ev['name']}")
            it.name, it.shape, it.dtype = ev["name"], ev.get("shape"), ev.get("dtype")
            it.queues = [(rank, g) if model == "rank_group" else (rank, g, "coll")]
        items[(rank, it.id)] = it
        for q in it.queues:
            queues[q].append(it)

    def at_head(it, q) -> bool:
        return bool(queues[q]) and queues[q][0] is it

    def op_queue(rank, g, peer):
        return (rank, g) if model == "rank_group" else (rank, g, peer)

    def complete(it):
        it.done = True
        for q in it.queues:
            assert queues[q][0] is it
            queues[q].popleft()

    def try_match() -> bool:
        progress = False
        heads = [q[0] for q in list(queues.values()) if q]
        for it in dict.fromkeys(heads):
            if it.done:
                continue
            if it.kind == "coll":
                members = it.group
                others = []
                for m in members:
                    q = (m, it.group) if model == "rank_group" else (m, it.group, "coll")
                    if not queues[q] or queues[q][0].kind != "coll":
                        break
                    others.append(queues[q][0])
                else:
                    first = others[0]
                    for o in others:
                        if (o.name, o.shape, o.dtype) != (first.name, first.shape, first.dtype):
                            errors.append(f"collective mismatch on group {list(it.group)}: rank {first.rank} "
                                          f"issued {first.name} {first.shape} {first.dtype}, rank {o.rank} "
                                          f"issued {o.name} {o.shape} {o.dtype}")
                    for o in others:
                        complete(o)
                    progress = True
                continue
            if not all(at_head(it, q) for q in it.queues if model == "rank_group"):
                continue
            for op in it.ops:
                kind, peer, shape, dtype, dev, n, matched = op
                if matched or not at_head(it, op_queue(it.rank, it.group, peer)):
                    continue
                q = op_queue(peer, it.group, it.rank)
                if not queues[q]:
                    continue
                other = queues[q][0]
                if other.kind != "p2p":
                    continue
                want = "recv" if kind == "send" else "send"
                for oop in other.ops:
                    if oop[0] == want and oop[1] == it.rank and oop[5] == n and not oop[6]:
                        if (oop[2], oop[3]) != (shape, dtype):
                            a, b = (it.rank, peer) if kind == "send" else (peer, it.rank)
                            errors.append(f"message {n} from rank {a} to rank {b}: sent {op[2] if kind == 'send' else oop[2]} "
                                          f"{op[3] if kind == 'send' else oop[3]}, received into "
                                          f"{oop[2] if kind == 'send' else op[2]} {oop[3] if kind == 'send' else op[3]}")
                        op[6] = oop[6] = True
                        progress = True
                        break
            for x in (it,):
                if all(o[6] for o in x.ops) and not x.done:
                    complete(x)
                    progress = True
        # items completed as the peer side of a match
        for q in list(queues.values()):
            while q and q[0].kind == "p2p" and all(o[6] for o in q[0].ops) and not q[0].done:
                complete(q[0])
                progress = True
        return progress

    def advance_hosts() -> bool:
        progress = False
        for r, evs in traces.items():
            while pos[r] < len(evs):
                ev = evs[pos[r]]
                if ev["ev"] == "issue":
                    issue(r, ev)
                elif ev["ev"] == "wait":
                    if not items[(r, ev["id"])].done:
                        break
                pos[r] += 1
                progress = True
        return progress

    while True:
        moved = advance_hosts()
        moved = try_match() or moved
        if not moved:
            break
    blocked = {r: traces[r][pos[r]] for r in traces if pos[r] < len(traces[r])}
    pending = [it for q in queues.values() for it in q]
    if blocked or pending:
        lines = [f"deadlock under the {model!r} queue model:"]
        for r in sorted(traces):
            if r in blocked:
                ev = blocked[r]
                it = items.get((r, ev["id"]))
                lines.append(f"  rank {r} host waits for {_describe(it)}")
            heads = [f"{q}: {_describe(d[0])}" for q, d in queues.items() if d and q[0] == r]
            if heads:
                lines.append(f"  rank {r} queue heads: " + "; ".join(heads))
        errors.insert(0, "\n".join(lines))
    if errors:
        raise ProtocolError("\n".join(errors[:20]))
    return {"p2p_items": n_p2p, "collectives": n_coll, "ranks": len(traces),
            "messages": sum(v for k, v in seq.items() if k[3] == "send")}


def _describe(it) -> str:
    if it is None:
        return "?"
    if it.kind == "coll":
        return f"{it.name} on {list(it.group)}"
    ops = ", ".join(f"{o[0]} {'to' if o[0] == 'send' else 'from'} {o[1]} #{o[5]} {o[2]}" for o in it.ops)
    return f"[{ops}]"


def check_dir(trace_dir: str, device: str = "cpu") -> dict:
    """Replay one run's traces in both queue models; return the counts of the first. Also
    asserts that no point-to-point op used a tag (they carry no meaning under NCCL)."""
    traces = load(trace_dir)
    tagged = [(r, ev.get("call"), ev["tags"]) for r, evs in traces.items() for ev in evs
              if ev["ev"] == "issue" and any(ev.get("tags") or [])]
    if tagged:
        raise ProtocolError(f"point-to-point ops with a tag (NCCL ignores tags): {tagged[:5]}")
    out = None
    for model in MODELS:
        res = replay(traces, model, device)
        out = out or res
    return out


def main(argv=None) -> int:
    """``python tests/protocol_check.py TRACE_DIR [--device cpu]``: replay a recorded run.

    Record one with ``AUXPAR_PROTOCOL_TRACE=TRACE_DIR PYTHONPATH=tests/protocol auxpar train ...``
    (any method, any flags; TRACE_DIR must exist and be empty)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--device", default="cpu", help="the device every recorded tensor must be on")
    a = ap.parse_args(argv)
    traces = load(a.trace_dir)
    ok = True
    for model in MODELS:
        try:
            res = replay(traces, model, a.device)
            print(f"{model}: ok ({res['ranks']} ranks, {res['messages']} messages, {res['p2p_items']} p2p items, "
                  f"{res['collectives']} collectives)")
        except ProtocolError as exc:
            ok = False
            print(f"{model}: FAILED\n{exc}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
