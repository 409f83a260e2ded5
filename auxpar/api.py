"""The Python API: train any method on your own network and data with one call.

    import auxpar

    def make_net(in_channels, num_classes):            # module level: worker processes import it
        stem = ...; blocks = [MyBlock(...) for _ in range(6)]; head = ...
        return stem, blocks, head                      # or auxpar.staged_net(stem, blocks, head, ...)

    if __name__ == "__main__":                         # needed: the ranks re-import this script
        data = auxpar.TensorData(x_train, y_train, x_test, y_test)
        summary = auxpar.train(model=make_net, data=data, method="penalty", stages=2, epochs=5,
                               out="runs/mine", lr=0.05, **{"data.train_subset": 512})

:func:`train` writes the same run directory as ``auxpar train`` (config.toml, metrics.jsonl,
summary.json, model.pt) and returns the summary. Where the processes come from:

* under ``torchrun`` (or ``auxpar train --nproc``: ``WORLD_SIZE`` is set) it trains in this
  process, as one rank of the job; every rank calls it and gets the summary;
* otherwise, when the run needs K > 1 processes (one per stage for pipeline / penalty / al /
  mgrit, times ``dp`` on a mesh, or ``nproc``), it starts them itself with ``torch.multiprocessing`` (start method
  "spawn", gloo on the CPU) and returns the summary the log rank wrote. Spawned processes get
  the model and the data by pickling: a model *factory* must be a module-level function (not a
  lambda or a nested function), a script must call :func:`train` under
  ``if __name__ == "__main__":`` (each process imports it), and tensors travel through shared
  memory (the data is not copied per process);
* one process (serial, or ``stages=1``): in this process.

Every rank builds the model itself from the run's seed (``torch.manual_seed(seed)``, then the
factory), as for the built-in models, so the factory must be deterministic given torch's RNG.
A ready-made :class:`~auxpar.models.StagedNet` is used as it is (copied into each spawned
process; under torchrun rank 0's parameters are broadcast to the other ranks).
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from auxpar import registry
from auxpar.errors import AuxparError, ConfigError, DistributedError

log = logging.getLogger("auxpar")


def train(model: Any = None, data: Any = None, *, method: str | None = None, stages: int | None = None,
          epochs: int | None = None, out: str | os.PathLike | None = None,
          config: str | os.PathLike | dict | None = None, overwrite: bool = False, **overrides: Any) -> dict:
    """Train ``model`` on ``data`` with ``method``; returns the summary (summary.json's content).

    Args:
        model: a built-in model name (default ``config``'s, else ``"resnet20"``), ``"package.module:factory"``, a factory
            function, an :class:`auxpar.StagedNet`, or a tuple ``(stem, blocks, head)``. A factory
            is called with the keyword arguments ``in_channels``, ``num_classes``, ``input_size``
            it accepts and returns a StagedNet or ``(stem, blocks, head)``.
        data: a built-in dataset name (default ``config``'s, else ``"digits"``; ``"cifar10"``, ...), an
            :class:`auxpar.TensorData`, or a pair ``(train_dataset, test_dataset)`` of map-style
            datasets (``ds[i] -> (x, y)``), materialized once.
        method: serial (default), ddp, pipeline, penalty, al or mgrit.
        stages: K, the number of stages (one process each for the layer-parallel methods).
        epochs: training epochs. ``out``: the run directory (default runs/<method>-<model>-<data>-s<seed>).
        config: a TOML file or a nested dict ``{"optim": {"lr": 0.1}}``, below the keywords.
        overwrite: replace a finished run in ``out`` (like ``--overwrite``).
        **overrides: any ``auxpar train`` flag by its Python name (``lr=0.1``, ``batch_size=64``,
            ``seed=1``, ``nproc=4``, ``split=[3, 6]``, ``rho=10`` ...) or any config key as
            ``section.key`` (``**{"data.train_subset": 512, "optim.grad_clip": 1.0}``).

    Raises:
        ConfigError, DataError, DistributedError, TrainingError: the errors ``auxpar train``
        reports in one line, raised here as exceptions (from the rank that hit them).
    """
    t_launch = time.perf_counter()
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError("auxpar.train was called while a process auxpar started was importing your script: "
                          "put the call under `if __name__ == \"__main__\":` (every process imports the script)")
    from auxpar import distributed as dist

    cfg, model, data = _resolve(model, data, method, stages, epochs, out, config, overrides)
    if (cfg.run_dir() / "summary.json").exists() and not overwrite:
        raise ConfigError(f"run directory {cfg.run_dir()} already holds a finished run (summary.json); "
                          "choose another out=, or pass overwrite=True to replace it")
    _setup_logging()
    if dist.under_launcher():
        return _run_here(cfg, model, data, overwrite, t_launch)
    nproc = _processes(cfg)
    if nproc > 1:
        return _spawn(cfg, model, data, overwrite, nproc)
    return _run_here(cfg, model, data, overwrite, t_launch)


# --------------------------------------------------------------------------------------- the config

def _resolve(model, data, method, stages, epochs, out, config, overrides):
    """(validated Config, the model object or None, the TensorData or None)."""
    from auxpar.cli import FLAG_KEYS
    from auxpar.config import build_config, load_toml, set_dotted

    if isinstance(config, (str, os.PathLike)):
        file_data, source = load_toml(config), str(config)
    elif config is None or isinstance(config, dict):
        file_data, source = copy.deepcopy(config or {}), "config"
    else:
        raise ConfigError(f"config must be a TOML file path or a dict like {{'optim': {{'lr': 0.1}}}}, "
                          f"got {type(config).__name__}")
    flat = {"method": method, "stages": stages, "epochs": epochs, "out": None if out is None else str(out)}
    flat.update(overrides)
    ov: dict = {}
    for key, value in flat.items():
        if value is None and key in ("method", "stages", "epochs", "out"):
            continue
        if "." in key:
            set_dotted(ov, key, value)
        elif key in FLAG_KEYS:
            sec, name = FLAG_KEYS[key]
            if key == "phases" and isinstance(flat.get("method"), str):
                # the SPH phase list of whichever method runs, as on the command line
                sec, name = registry.method(flat["method"]).phases_key.split(".")
            ov.setdefault(sec, {})[name] = list(value) if isinstance(value, tuple) else value
        else:
            raise ConfigError(f"unknown setting {key}={value!r}: give an `auxpar train` flag by its Python name "
                              f"(e.g. lr, batch_size, seed, nproc, split, rho) or a config key as section.key, "
                              f"e.g. **{{'data.train_subset': 512}}")
    if "split" in flat and stages is None and flat["split"]:
        ov.setdefault("dist", {}).setdefault("stages", len(flat["split"]))

    model, model_name = _model_arg(model)
    if model_name is not None:
        ov.setdefault("model", {})["name"] = model_name
    data = _data_arg(data)
    if isinstance(data, str):
        ov.setdefault("data", {})["dataset"] = data
        data = None
    elif data is not None:
        if "dataset" in ov.get("data", {}) or "dataset" in file_data.get("data", {}):
            raise ConfigError("data.dataset was set together with data=<your data>; give one of them")
        ov.setdefault("data", {})["dataset"] = "synthetic"  # plain defaults: no built-in dataset's recipe
    cfg = build_config(file_data, ov, source=source)
    if data is not None:
        cfg.data.dataset = data.name  # summary.json, logs, config.toml and the run directory name
    return cfg, model, data


def _model_arg(model) -> tuple[Any, str | None]:
    """(object for the trainer or None, model.name)."""
    from torch import nn

    from auxpar.models import StagedNet, factory_name

    if model is None or isinstance(model, str):
        return None, model
    if isinstance(model, StagedNet):
        return model, model.name
    if isinstance(model, (tuple, list)) and len(model) == 3:
        return tuple(model), "custom"
    if callable(model) and not isinstance(model, nn.Module):
        return model, factory_name(model)
    return model, None  # the trainer names what is wrong with it


def _data_arg(data):
    from auxpar.data.tensors import TensorData

    if data is None or isinstance(data, (str, TensorData)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return TensorData.from_datasets(*data)
    raise ConfigError(f"data must be a dataset name, an auxpar.TensorData or a pair (train_dataset, test_dataset), "
                      f"got {type(data).__name__}")


def _processes(cfg) -> int:
    """Processes this run needs when nothing launched them (the CLI's rule)."""
    from auxpar.cli import local_processes

    return local_processes(cfg)


def _setup_logging() -> None:
    """The CLI's log lines on stdout, unless the program configured logging itself."""
    lg = logging.getLogger("auxpar")
    if lg.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)


# --------------------------------------------------------------------------------------- one rank

def _run_here(cfg, model, data, overwrite: bool, t_launch: float) -> dict:
    """This process is one rank (or the only one): join the group, train, leave the group."""
    from auxpar import distributed as dist
    from auxpar.trainer import train as train_rank

    import torch.distributed as tdist

    joined_before = tdist.is_available() and tdist.is_initialized()  # the caller's group: leave it as it is
    info = dist.init(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.run.threads)
    clean = False
    try:
        summary = train_rank(cfg, info, t_launch, overwrite=overwrite, model=model, data=data)
        clean = True
        return summary
    except AuxparError:
        raise
    except Exception as exc:  # a peer died: say so rather than show gloo's message
        if info.distributed and dist.is_comm_failure(exc):
            err = dist.comm_failure_error(exc, info, cfg.dist.timeout_s)
            err.peer_failure = True
            raise err from exc
        raise
    finally:
        if not joined_before:
            dist.shutdown(info, clean=clean)


# --------------------------------------------------------------------------------------- K processes

def _spawn(cfg, model, data, overwrite: bool, nproc: int, grace_s: float = 5.0) -> dict:
    """Start ``nproc`` ranks with torch.multiprocessing ("spawn"), wait, return the summary.

    Like ``auxpar train --nproc``: the first rank that fails stops the others (after a moment
    for ranks that hit the same error), and its error is raised here."""
    import torch.multiprocessing as tmp

    from auxpar.distributed import _free_port

    _check_picklable(model, nproc)
    ctx = tmp.get_context("spawn")
    reports = ctx.SimpleQueue()
    port = _free_port()
    procs = []
    try:
        for rank in range(nproc):
            p = ctx.Process(target=_rank_main, args=(rank, nproc, port, cfg, model, data, overwrite, reports),
                            name=f"auxpar-rank-{rank}", daemon=True)
            p.start()
            procs.append(p)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        _stop(procs, grace_s)
        raise ConfigError(f"cannot send the model or the data to the worker processes ({type(exc).__name__}: "
                          f"{exc}); they are pickled for multiprocessing 'spawn': use module-level functions "
                          "and classes, and tensors or TensorData for the data") from None
    failed, got = None, []
    try:
        while failed is None:
            while not reports.empty():  # read as they come: a rank never blocks on a full pipe
                got.append(reports.get())
            codes = [p.exitcode for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is None and all(c == 0 for c in codes):
                break
            time.sleep(0.05)
        if failed is not None:  # an error every rank hits ends them all at once: let them report it
            deadline = time.monotonic() + min(grace_s, 3.0)
            while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
                time.sleep(0.05)
    finally:
        _stop(procs, grace_s)
    while not reports.empty():
        got.append(reports.get())
    if failed is not None:
        raise _rank_error(got, failed, nproc)
    path = cfg.run_dir() / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistributedError(f"all {nproc} ranks finished but {path} cannot be read ({exc})") from None


def _rank_main(rank: int, world: int, port: int, cfg, model, data, overwrite: bool, reports) -> None:
    """Entry point of a spawned rank: the environment torchrun would set, then one rank's run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AUXPAR_LOCAL_LAUNCH="1")
    _setup_logging()
    try:
        if isinstance(model, (tuple, list)) or hasattr(model, "parameters"):
            # Its tensors arrived in memory shared with the other ranks: train a private copy.
            model = copy.deepcopy(model)
        _run_here(cfg, model, data, overwrite, time.perf_counter())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then this rank exits
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        reports.put((rank, exc, tb))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no interpreter teardown with a process group in an unknown state


def _rank_error(reports: list, failed: tuple[int, int], nproc: int) -> BaseException:
    """The error to raise for a failed job: the first rank's own error (not a peer's
    'connection closed' that it caused), with the rank and, for a bug, its traceback."""
    own = [r for r in reports if not getattr(r[1], "peer_failure", False)]
    if not own and not reports:
        rank, code = failed
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return DistributedError(f"rank {rank} of {nproc} {how} before it could report an error; its output above "
                                "says why (a script that calls auxpar.train outside `if __name__ == \"__main__\":`, "
                                "or out of memory)")
    rank, exc, tb = (own or reports)[0]
    if isinstance(exc, AuxparError):
        if nproc > 1 and not getattr(exc, "same_on_every_rank", False):
            exc.add_note(f"(on rank {rank} of {nproc})")
        return exc
    exc.add_note(f"raised on rank {rank} of {nproc}; that rank's traceback:\n{tb}")
    return exc


def _check_picklable(model, nproc: int) -> None:
    if model is None:
        return
    what = getattr(model, "__qualname__", type(model).__name__)
    try:
        pickle.dumps(model)
    except Exception as exc:  # noqa: BLE001 - lambdas, nested functions, local classes ...
        raise ConfigError(
            f"model {what} cannot be sent to the {nproc} processes auxpar starts for this run ({type(exc).__name__}: "
            f"{str(exc)[:200]}): they are started with multiprocessing 'spawn', which pickles it. Define the factory "
            "as a module-level function (def make_net(in_channels, num_classes): ...) in a module or script, not "
            "a lambda or a function inside another function; or start the ranks with torchrun, where each rank "
            "builds it") from None
    main = sys.modules.get("__main__")
    if getattr(model, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise ConfigError(
            f"model {what} is defined in an interactive session (__main__ has no file), which the {nproc} "
            "processes auxpar starts cannot import: put the factory in a module (a .py file on the path) "
            "and import it from there")


def _stop(procs: list, grace_s: float) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def load_run(out: str | os.PathLike) -> dict:
    """summary.json of a finished run directory."""
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
