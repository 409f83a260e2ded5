"""Command line: ``auxpar train`` and ``auxpar plan`` (also ``python -m auxpar`` and torchrun -m auxpar).

Flags override the TOML file given with ``--config``, which overrides the defaults. Any
setting without a dedicated flag can be set with ``--set section.key=value`` (TOML syntax for
the value). Errors a user can cause print one line, ``auxpar: error: ...``, and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from auxpar import registry
from auxpar.errors import AuxparError, ConfigError

EXTRA_COMMANDS: list[str] = ["auxpar.perfmodel", "auxpar.study", "auxpar.export"]
"""Modules that add a subcommand: each has ``add_parser(subparsers)``, which registers its parser
with ``set_defaults(func=run)``; ``run(args) -> int`` raises AuxparError for user errors."""

# flag dest -> (section, key). Flags default to None so that only flags given override.
FLAG_KEYS = {
    "method": ("run", "method"), "seed": ("run", "seed"), "epochs": ("run", "epochs"),
    "max_steps": ("run", "max_steps"),
    "out": ("run", "out"), "threads": ("run", "threads"), "eval_every": ("run", "eval_every"),
    "log_every": ("run", "log_every"), "progress": ("run", "progress"),
    "model": ("model", "name"), "dropout": ("model", "dropout"), "norm": ("model", "norm"),
    "dataset": ("data", "dataset"), "data_dir": ("data", "data_dir"), "batch_size": ("data", "batch_size"),
    "lr": ("optim", "lr"), "momentum": ("optim", "momentum"), "weight_decay": ("optim", "weight_decay"),
    "lr_schedule": ("optim", "lr_schedule"),
    "stages": ("dist", "stages"), "split": ("dist", "split"), "nproc": ("dist", "nproc"),
    "split_blocks": ("model", "split_blocks"),
    "balance": ("dist", "balance"),
    "backend": ("dist", "backend"), "device": ("dist", "device"),
    "rho": ("coupling", "rho"), "rho_growth": ("coupling", "rho_growth"), "rho_max": ("coupling", "rho_max"),
    "aux_update": ("coupling", "aux_update"), "aux_lr": ("coupling", "aux_lr"),
    "ds_factor": ("coupling", "ds_factor"), "ds_mode": ("coupling", "ds_mode"),
    "upsample": ("coupling", "upsample"), "aux_dtype": ("coupling", "aux_dtype"),
    "aux_device": ("coupling", "aux_device"), "phases": ("coupling", "phases"),
    "mu_damping": ("coupling", "mu_damping"), "stage_input": ("coupling", "stage_input"),
    "serial_executor": ("coupling", "serial_executor"),
    "dp": ("dist", "dp"), "microbatches": ("dist", "microbatches"),
    "pipeline_schedule": ("dist", "pipeline_schedule"), "timeout": ("dist", "timeout_s"),
    "checkpoint_every": ("run", "checkpoint_every"), "keep": ("run", "keep"),
    "resume": ("run", "resume"), "on_nan": ("run", "on_nan"),
    "precision": ("run", "precision"), "channels_last": ("run", "channels_last"),
    "host_memory": ("run", "host_memory"),
    "mgrit_levels": ("mgrit", "levels"), "mgrit_cfactor": ("mgrit", "cfactor"),
    "mgrit_fwd_iters": ("mgrit", "fwd_iters"), "mgrit_bwd_iters": ("mgrit", "bwd_iters"),
    "mgrit_tol": ("mgrit", "tol"), "mgrit_relax": ("mgrit", "relax"), "mgrit_nested": ("mgrit", "nested"),
    "mgrit_step": ("mgrit", "step"), "mgrit_cweight": ("mgrit", "cweight"),
    "mgrit_final_relax": ("mgrit", "final_relax"), "mgrit_warm_start": ("mgrit", "warm_start"),
    "mgrit_warm_mode": ("mgrit", "warm_mode"), "mgrit_warm_adjoint": ("mgrit", "warm_adjoint"),
}


def _split_arg(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split {text!r}: give whole block counts separated by commas, e.g. --split 4,4,4") from None
    if not counts:
        raise argparse.ArgumentTypeError("--split is empty: give block counts per stage, e.g. --split 4,4,4")
    return counts


def _block_list_arg(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split-blocks {text!r}: give block indices separated by commas, e.g. --split-blocks 3") from None


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is an error that names the new flag."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f"{option_string} was renamed {self.new}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="TOML config; flags override it")
    p.add_argument("--model", help="resnet20|32|44|56|110, preact-resnet<6n+2>, wrn-<6n+4>-<k>, or your own "
                                   "network as package.module:factory")
    p.add_argument("--dataset", choices=registry.dataset_names())
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import MODULE first: it registers methods or datasets (auxpar.registry); repeatable, "
                        "recorded as run.plugins")
    p.add_argument("--stages", type=int, metavar="K", help="layer-parallel stages")
    p.add_argument("--split", type=_split_arg, metavar="N,N,...", help="explicit blocks per stage")
    p.add_argument("--split-blocks", type=_block_list_arg, metavar="J[,J...]",
                   help="cut these blocks in two units (after their first convolution), so a stage boundary can "
                        "fall inside them; --split then counts units")
    p.add_argument("--dropout", type=float, help="dropout inside WRN blocks")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set optim.grad_clip=1.0 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxpar",
        description="Layer-parallel training of deep residual networks (serial and DDP baselines included).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model", description="Train a model. Flags override --config.")
    _add_common(t)
    t.add_argument("--method", help="; ".join(f"{m.name}: {m.description}" for m in map(
        registry.method, registry.method_names())))
    t.add_argument("--data-dir", help="where datasets are downloaded and cached (default: data)")
    t.add_argument("--no-download", dest="no_download", action="store_true",
                   help="fail instead of downloading a missing dataset")
    t.add_argument("--nproc", type=int, metavar="N", help="start N local worker processes (gloo on CPU)")
    t.add_argument("--balance", choices=["flops", "time"],
                   help="default cut balanced by estimated FLOPs or by measured block time")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", dest="max_steps", type=int, metavar="N",
                   help="stop after N training steps, inside the last epoch; the lr schedule spans "
                        "the N steps (run.max_steps; 0 = all of --epochs)")
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--lr-schedule", choices=["constant", "step", "multistep", "cosine"],
                   help="learning-rate schedule over global epochs")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads per process")
    t.add_argument("--out", metavar="DIR", help="run directory")
    t.add_argument("--no-augment", dest="no_augment", action="store_true", help="no random crop / flip")
    t.add_argument("--norm", choices=["bn", "none"], help="normalization layers (none: exactness tests)")
    t.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N epochs")
    t.add_argument("--log-every", type=int, metavar="N", help="write a step record every N steps")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--backend", choices=["auto", "gloo", "nccl"])
    t.add_argument("--progress", choices=["auto", "on", "off"], help="progress bar (auto: when a TTY)")
    t.add_argument("--overwrite", action="store_true",
                   help="allow --out to point at a directory that holds a finished run")
    g = t.add_argument_group("layer-parallel coupling (--method penalty | al)")
    g.add_argument("--rho", type=float, help="penalty parameter beta, per element of a boundary state")
    g.add_argument("--rho-growth", type=float, help="beta <- min(growth * beta, rho_max) every epoch")
    g.add_argument("--rho-max", type=float, help="cap of the geometric beta schedule")
    g.add_argument("--aux-update", choices=["gradient", "prox", "forward"], help="aux-state update rule")
    g.add_argument("--aux-lr", type=float, help="aux step eta_z (gradient) or tau (prox); 0 = 1/beta")
    g.add_argument("--ds-factor", type=int, help="store/send boundary states at 1/s resolution (1 = exact)")
    g.add_argument("--ds-mode", choices=["avg", "max"], help="downsampling (pooling) operator")
    g.add_argument("--upsample", choices=["nearest", "bilinear"], help="upsampling operator")
    g.add_argument("--aux-dtype", choices=["fp32", "bf16", "fp16"], help="aux-state storage dtype")
    g.add_argument("--aux-device", choices=["device", "host"], help="aux states in device or (pinned) host memory")
    g.add_argument("--phases", metavar="PHASES", help='SPH phases, repeated, e.g. "parallel:8,serial:2" '
                   "(coupling.phases; mgrit.phases under --method mgrit)")
    g.add_argument("--schedule", action=_Renamed, new="--phases (the SPH phase list; the learning-rate "
                   "schedule is --lr-schedule)", help=argparse.SUPPRESS)
    g.add_argument("--mu-damping", type=float, help="AL multiplier damping in [0, 1)")
    g.add_argument("--stage-input", choices=["aux", "output"],
                   help="what a stage reads in the parallel phase: its aux states, or the last true "
                   "output of the stage below (z then only serves as the target)")
    g.add_argument("--serial-executor", choices=["layer", "pipeline"],
                   help="SPH serial phase over the K ranks: layer-serial or micro-batched pipeline")
    g = t.add_argument_group("MGRIT (--method mgrit)")
    g.add_argument("--mgrit-levels", type=int, metavar="L", help="grid levels (1 = serial propagation)")
    g.add_argument("--mgrit-cfactor", type=_split_arg, metavar="M[,M...]",
                   help="coarsening factor, one value or one per coarsening")
    g.add_argument("--mgrit-fwd-iters", type=int, metavar="N", help="forward iterations per step")
    g.add_argument("--mgrit-bwd-iters", type=int, metavar="N", help="adjoint iterations per step")
    g.add_argument("--mgrit-tol", type=float, help="stop at this residual norm (0 = run the iteration caps)")
    g.add_argument("--mgrit-relax", choices=["F", "FCF"], help="relaxation per iteration")
    g.add_argument("--mgrit-cweight", type=float, help="weight of C-relaxation")
    g.add_argument("--mgrit-final-relax", choices=["F", "FC"], help="final relaxation sweep")
    g.add_argument("--mgrit-nested", action="store_const", const=True, help="nested-iteration start")
    g.add_argument("--mgrit-no-warm-start", dest="mgrit_warm_start", action="store_const", const=False,
                   help="start every step's solve from scratch instead of the previous step's states")
    g.add_argument("--mgrit-warm-mode", choices=["mean", "states"],
                   help="warm start from the previous step's batch-mean states or its per-sample states")
    g.add_argument("--mgrit-warm-adjoint", action="store_const", const=True,
                   help="warm-start the adjoint solve too")
    g.add_argument("--mgrit-step", type=float, metavar="H", help="h scaling the residual branch (1 = ResNet)")
    g = t.add_argument_group("parallel layout")
    g.add_argument("--dp", type=int, metavar="N", help="data-parallel replicas of the layer-parallel group (penalty, al, mgrit): world = stages x dp")
    g.add_argument("--microbatches", type=int, metavar="N", help="pipeline micro-batches per batch")
    g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], help="pipeline baseline schedule")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="process-group timeout (a stalled rank ends the job)")
    g = t.add_argument_group("checkpoints and failures")
    g.add_argument("--checkpoint-every", metavar="N|Ns", help="checkpoint every N epochs, or N steps with an s suffix")
    g.add_argument("--keep", type=int, metavar="K", help="complete checkpoints kept (>= 2)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="DIR|latest",
                   help="resume from the latest checkpoint of --out (default) or from checkpoint DIR")
    g.add_argument("--on-nan", choices=["stop", "skip", "off"],
                   help="non-finite loss on any rank: stop all ranks (default), skip the step, or off "
                        "(no per-step check; only the epoch-end check)")
    g = t.add_argument_group("precision and memory format")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="forward under autocast to bf16/fp16 (fp16 adds loss scaling; not with mgrit; on CPU "
                        "fp16 runs but slowly, use bf16); fp32 (default) = no autocast. Aux states and "
                        "messages keep --aux-dtype (fp32 default)")
    g.add_argument("--channels-last", dest="channels_last", action="store_const", const=True,
                   help="model/stages and 4-D inputs in torch.channels_last memory format")
    g.add_argument("--host-memory", choices=["keep", "release"],
                   help="keep (default): freed CPU tensor memory stays in the process and is reused, no page "
                        "faults in the hot loop; release: glibc's defaults (large blocks go back to the kernel)")
    t.add_argument("--debug", action="store_true", help="show the traceback of errors")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("plan", help="show the stage cut, balance and boundary memory (no training)")
    _add_common(p)
    p.add_argument("--dp", type=int, metavar="D",
                   help="data-parallel replicas of the K stages (world = K x D ranks): the aux memory per "
                        "rank is that of ceil(N/D) samples (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    import importlib

    for module in EXTRA_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict:
    from auxpar.config import parse_value, set_dotted

    out: dict = {}
    for dest, (sec, key) in FLAG_KEYS.items():
        v = getattr(args, dest, None)
        if v is not None:
            out.setdefault(sec, {})[key] = v
    if getattr(args, "no_augment", False):
        out.setdefault("data", {})["augment"] = False
    if getattr(args, "no_download", False):
        out.setdefault("data", {})["download"] = False
    if getattr(args, "plugin", None):
        out.setdefault("run", {})["plugins"] = list(args.plugin)
    if args.split is not None and args.stages is None:
        out.setdefault("dist", {})["stages"] = len(args.split)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. --set optim.lr=0.1")
        k, v = item.split("=", 1)
        set_dotted(out, k.strip(), parse_value(v.strip()))
    return out


def load_config(args: argparse.Namespace):
    from auxpar.config import build_config, load_toml

    file_data = load_toml(args.config) if args.config else {}
    overrides = overrides_from_args(args)
    method = overrides.get("run", {}).get("method") or file_data.get("run", {}).get("method")
    if getattr(args, "phases", None) is not None and isinstance(method, str):
        # --phases is the SPH phase list of whichever method runs; a method may keep its own key
        registry.load_plugins(overrides.get("run", {}).get("plugins", []) + file_data.get("run", {}).get("plugins", []))
        if method in registry.method_names():
            sec, key = registry.method(method).phases_key.split(".")
            overrides.setdefault(sec, {})[key] = overrides["coupling"].pop("phases")
    return build_config(file_data, overrides, source=args.config or "config")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stdout)


def local_processes(cfg) -> int:
    """Processes a run needs when nothing launched it: ``dist.nproc``, or one per stage (times
    ``dist.dp``) for a method with the ``stages`` layout, so `--method penalty --stages 4` alone
    is a complete command."""
    nproc = cfg.dist.nproc
    want = cfg.dist.stages * cfg.dist.dp
    if nproc == 1 and want > 1 and registry.method(cfg.run.method).layout == "stages":
        nproc = want
        print(f"auxpar: starting {nproc} local processes, one per stage (gloo on CPU)", file=sys.stderr)
    return nproc


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from auxpar import distributed as dist

    t_launch = time.perf_counter()
    cfg = load_config(args)
    if args.print_config:
        from auxpar.config import config_to_toml

        print(config_to_toml(cfg.resolved()))
        return 0
    if not dist.under_launcher():
        nproc = local_processes(cfg)
        if nproc > 1:
            return dist.launch_local(argv, nproc)

    from auxpar.trainer import train

    if (cfg.run_dir() / "summary.json").exists() and not args.overwrite:
        raise ConfigError(
            f"run directory {cfg.run_dir()} already holds a finished run (summary.json); "
            "choose another --out, or pass --overwrite to replace it"
        )
    _setup_logging(quiet=False)
    info = dist.init(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.run.threads)
    clean = False
    try:
        train(cfg, info, t_launch, overwrite=args.overwrite)
        clean = True
    except AuxparError:
        raise
    except Exception as exc:  # noqa: BLE001 - classify communication failures for the user
        if info.distributed and dist.is_comm_failure(exc) and not args.debug:
            raise dist.comm_failure_error(exc, info, cfg.dist.timeout_s) from None
        raise
    finally:
        dist.shutdown(info, clean=clean)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from auxpar.config import build_config, load_toml
    from auxpar.plan import check_dp, format_plan, make_plan, plan_json

    if args.dp is not None:
        check_dp(args.dp)  # before the config, so that the message names the flag
    file_data = load_toml(args.config) if args.config else {}
    cfg = build_config(file_data, overrides_from_args(args), source=args.config or "config")
    plan = make_plan(cfg.model.name, cfg.data, cfg.dist.stages, cfg.dist.split or None, cfg.model.dropout,
                     dp=cfg.dist.dp, split_blocks=cfg.model.split_blocks)
    plan["cut_by"] = ("split" if cfg.dist.split else "flops" if cfg.dist.stages <= 1 or cfg.dist.balance == "flops"
                      else "time")
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0


def _prescan_plugins(argv: list[str]) -> None:
    """Import --plugin modules before the parser is built, so their names are valid choices."""
    mods = [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
    mods += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    registry.load_plugins(mods)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _prescan_plugins(argv)
    except AuxparError as exc:
        _report(exc)
        return exc.exit_code
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except AuxparError as exc:  # a renamed flag (_Renamed)
        _report(exc)
        return exc.exit_code
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "plan":
            return cmd_plan(args)
        return int(args.func(args) or 0)
    except AuxparError as exc:
        if getattr(args, "debug", False):
            raise
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("auxpar: interrupted", file=sys.stderr)
        return 130
    return 2  # pragma: no cover


def _report(exc: AuxparError) -> None:
    """Print a user error once: rank 0 speaks for errors every rank hits, others add their rank.
    On several nodes (torchrun --nnodes N) the first local rank of every node speaks too, so
    each node's log holds the error."""
    from auxpar.distributed import env_layout

    try:
        rank, world, local_rank, local_world = env_layout()
    except AuxparError:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    node_voice = local_rank == 0 and local_world < world
    if world > 1 and rank != 0 and not node_voice and getattr(exc, "same_on_every_rank", False):
        return  # every rank raised the same error; rank 0 (and each node's local rank 0) reports it
    prefix = f"[rank {rank}] " if world > 1 else ""
    print(f"auxpar: error: {prefix}{exc}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
