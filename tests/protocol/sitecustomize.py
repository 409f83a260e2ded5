"""Protocol recorder for the NCCL checker (tests only; see tests/protocol_check.py).

Python imports ``sitecustomize`` at start-up from sys.path. The protocol tests put this folder
on PYTHONPATH and set ``AUXPAR_PROTOCOL_TRACE=DIR``; every process of the run then records each
``torch.distributed`` communication call it makes, one JSON line per event, in
``DIR/trace-<rank>-<pid>.jsonl``:

* ``{"ev": "issue", "id", "kind": "p2p", "ops": [[send|recv, peer, shape, dtype, device]], "group"}``
  (an isend/irecv/send/recv is one op; a batch_isend_irecv is ONE item with all its ops);
* ``{"ev": "issue", "id", "kind": "coll", "name", "group", "shape", "dtype", "device"}``;
* ``{"ev": "wait", "id"}``: the host blocked until that item completed (``work.wait()``, or a
  blocking call, which records its issue and its wait).

Tags are not recorded: NCCL has none. Without the environment variable this file does nothing.
"""

import os

if os.environ.get("AUXPAR_PROTOCOL_TRACE"):
    import atexit
    import inspect
    import itertools
    import json
    import threading

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    _dir = os.environ["AUXPAR_PROTOCOL_TRACE"]
    _ids = itertools.count(1)
    _local = threading.local()
    _buffer: list = []
    _file = {"f": None}

    def _emit(rec):
        if _file["f"] is None and dist.is_initialized():
            _file["f"] = open(os.path.join(_dir, f"trace-{dist.get_rank()}-{os.getpid()}.jsonl"), "a")
            _file["f"].write(json.dumps({"ev": "header", "rank": dist.get_rank(),
                                         "world": dist.get_world_size(),
                                         "backend": str(dist.get_backend())}) + "\n")
        _buffer.append(rec)
        if _file["f"] is not None:
            for r in _buffer:
                _file["f"].write(json.dumps(r) + "\n")
            _buffer.clear()
            _file["f"].flush()

    atexit.register(lambda: _file["f"] and _file["f"].close())

    def _group_ranks(group):
        if group is None or group is c10d.GroupMember.WORLD or group is c10d._get_default_group():
            return "world"
        try:
            return sorted(dist.get_process_group_ranks(group))
        except Exception:  # noqa: BLE001
            return "world"

    def _tensor_meta(t):
        return list(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)

    class _Work:
        """A Work proxy that records the host's wait on it."""

        def __init__(self, work, iid):
            self._w, self._id = work, iid

        def wait(self, *a, **k):
            _emit({"ev": "wait", "id": self._id})
            return self._w.wait(*a, **k)

        def is_completed(self):
            return self._w.is_completed()

        def __getattr__(self, name):
            return getattr(self._w, name)

    def _depth():
        return getattr(_local, "depth", 0)

    def _peer(bound, key, gkey):
        group = bound.get("group")
        if bound.get(key) is not None:
            return int(bound[key])
        if bound.get(gkey) is not None:
            return dist.get_global_rank(group, int(bound[gkey]))
        return None

    def _wrap_p2p(name, kind, blocking):
        orig = getattr(c10d, name)
        sig = inspect.signature(orig)

        def f(*args, **kwargs):
            if _depth():
                return orig(*args, **kwargs)
            b = sig.bind_partial(*args, **kwargs).arguments
            t = b["tensor"]
            peer = _peer(b, "dst", "group_dst") if kind == "send" else _peer(b, "src", "group_src")
            iid = next(_ids)
            _emit({"ev": "issue", "id": iid, "kind": "p2p", "group": _group_ranks(b.get("group")),
                   "ops": [[kind, peer, *_tensor_meta(t)]], "call": name, "tags": [int(b.get("tag") or 0)]})
            out = orig(*args, **kwargs)
            if blocking:
                _emit({"ev": "wait", "id": iid})
                return out
            return _Work(out, iid) if out is not None else out

        f.__wrapped__ = orig
        return f

    def _wrap_batch():
        orig = c10d.batch_isend_irecv

        def f(p2p_op_list):
            if _depth():
                return orig(p2p_op_list)
            ops = []
            for op in p2p_op_list:
                kind = "send" if op.op in (c10d.isend, getattr(c10d.isend, "__wrapped__", None)) else "recv"
                peer = op.peer if getattr(op, "peer", None) is not None else dist.get_global_rank(op.group, op.group_peer)
                ops.append([kind, int(peer), *_tensor_meta(op.tensor)])
            iid = next(_ids)
            _emit({"ev": "issue", "id": iid, "kind": "p2p", "group": _group_ranks(p2p_op_list[0].group),
                   "ops": ops, "call": "batch_isend_irecv", "tags": [int(op.tag or 0) for op in p2p_op_list]})
            _local.depth = 1
            try:
                works = orig(p2p_op_list)
            finally:
                _local.depth = 0
            return [_Work(w, iid) for w in works] if works else works

        return f

    def _wrap_coll(name, tensor_arg):
        orig = getattr(c10d, name, None)
        if orig is None:
            return None
        sig = inspect.signature(orig)

        def f(*args, **kwargs):
            if _depth():
                return orig(*args, **kwargs)
            b = sig.bind_partial(*args, **kwargs).arguments
            t = b.get(tensor_arg) if tensor_arg else None
            if isinstance(t, (list, tuple)):
                t = t[0] if t else None
            shape, dtype, device = _tensor_meta(t) if t is not None and hasattr(t, "shape") else (None, None, None)
            iid = next(_ids)
            _emit({"ev": "issue", "id": iid, "kind": "coll", "name": name, "group": _group_ranks(b.get("group")),
                   "shape": shape, "dtype": dtype, "device": device})
            _local.depth = 1
            try:
                out = orig(*args, **kwargs)
            finally:
                _local.depth = 0
            if b.get("async_op"):
                return _Work(out, iid) if out is not None else out
            _emit({"ev": "wait", "id": iid})
            return out

        return f

    patched = {
        "send": _wrap_p2p("send", "send", True), "recv": _wrap_p2p("recv", "recv", True),
        "isend": _wrap_p2p("isend", "send", False), "irecv": _wrap_p2p("irecv", "recv", False),
        "batch_isend_irecv": _wrap_batch(),
    }
    for _name, _arg in (("all_reduce", "tensor"), ("broadcast", "tensor"), ("all_gather", "tensor"),
                        ("all_gather_into_tensor", "input_tensor"), ("reduce_scatter_tensor", "input"),
                        ("reduce", "tensor"), ("barrier", None), ("all_to_all_single", "input"),
                        ("gather", "tensor"), ("scatter", "tensor")):
        w = _wrap_coll(_name, _arg)
        if w is not None:
            patched[_name] = w
    for _name, _f in patched.items():
        setattr(c10d, _name, _f)
        setattr(dist, _name, _f)

    _orig_bc = getattr(dist, "_broadcast_coalesced", None)
    if _orig_bc is not None:
        def _bc(group, tensors, *args, **kwargs):
            iid = next(_ids)
            t = tensors[0] if tensors else None
            _emit({"ev": "issue", "id": iid, "kind": "coll", "name": "broadcast_coalesced",
                   "group": _group_ranks(group), "shape": [sum(x.numel() for x in tensors)],
                   "dtype": None, "device": str(t.device) if t is not None else None})
            out = _orig_bc(group, tensors, *args, **kwargs)
            _emit({"ev": "wait", "id": iid})
            return out

        dist._broadcast_coalesced = _bc
