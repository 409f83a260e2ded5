"""``auxpar export RUN_DIR`` and ``auxpar eval MODEL_FILE``: one ordinary model file from any method.

A model file is a plain dict (tensors, strings, numbers) written with ``torch.save``::

    {"format": "auxpar-model/1", "arch": {name, in_channels, input_size, num_classes, dropout, norm},
     "residual_step": h (1 = standard ResNet; MGRIT's --mgrit-step),
     "dataset": ..., "method": ..., "stages": K, "step": ..., "test_acc": ..., "state_dict": {...}}

It loads with ``torch.load(path, weights_only=True)`` into the serial model
``auxpar.models.build_model(**arch)``, whatever method and K trained it. Training writes one
at the end (RUN/model.pt, gathered over the stages); ``auxpar export`` assembles one from a
checkpoint's per-rank files in a single process, without the ranks that wrote them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from auxpar import checkpoint
from auxpar.errors import ConfigError
from auxpar.resume import MODEL_FORMAT

log = logging.getLogger("auxpar")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, the file's metadata) from an auxpar model file."""
    from auxpar.models import build_model

    # Read on the CPU, then move the built model: the file may come from any device.
    obj = checkpoint.load_tensors(path, map_location="cpu")
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT or "state_dict" not in obj:
        raise ConfigError(f"{path} is not an auxpar model file (no '{MODEL_FORMAT}' header); "
                          "make one with `auxpar export RUN_DIR` or use RUN/model.pt")
    arch = obj["arch"]
    net = build_model(arch["name"], in_channels=arch["in_channels"], input_size=arch["input_size"],
                      num_classes=arch["num_classes"], dropout=arch["dropout"], norm=arch["norm"])
    if float(obj.get("residual_step", 1.0)) != 1.0:
        net.set_step(float(obj["residual_step"]))  # MGRIT with --mgrit-step h: u + h f(u)
    try:
        net.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: the weights do not fit a {arch['name']} model ({str(exc)[:300]})") from None
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return net.to(device).eval(), meta


def export_checkpoint(ckpt: Path) -> dict:
    """Merge every rank's share of the model in checkpoint ``ckpt`` into one model-file dict."""
    man = checkpoint.read_manifest(ckpt)
    if man is None:
        raise ConfigError(f"{ckpt} is not a complete auxpar checkpoint (no valid manifest.json)")
    if "arch" not in man:
        raise ConfigError(f"{ckpt}: the manifest has no model architecture; it was not written by auxpar train")
    state: dict = {}
    for name, meta in sorted(man["files"].items()):
        f = ckpt / name
        if checkpoint.sha256_file(f) != meta["sha256"]:
            raise ConfigError(f"checkpoint file {f} does not match its manifest checksum: it is corrupt "
                              "or was replaced; export an older checkpoint with --checkpoint")
        part = checkpoint.load_tensors(f)
        if not isinstance(part, dict) or not isinstance(part.get("model"), dict):
            raise ConfigError(f"{f} is not an auxpar rank checkpoint")
        for key, v in part["model"].items():
            if key in state and not torch.equal(state[key], v):
                raise ConfigError(f"{ckpt}: ranks disagree on {key}; the checkpoint is inconsistent")
            state[key] = v
    from auxpar.models import build_model

    arch = man["arch"]
    ref = build_model(arch["name"], in_channels=arch["in_channels"], input_size=arch["input_size"],
                      num_classes=arch["num_classes"], dropout=arch["dropout"], norm=arch["norm"]).state_dict()
    missing = sorted(set(ref) - set(state))
    if missing:
        raise ConfigError(f"{ckpt}: the ranks' files lack {len(missing)} tensors of the model "
                          f"(e.g. {missing[0]}); a rank file is missing or from another run")
    meta = man["meta"]
    return {"format": MODEL_FORMAT, "arch": dict(arch), "residual_step": man.get("residual_step", 1.0),
            "dataset": meta["dataset"], "method": meta["method"],
            "stages": meta["stages"], "step": man["step"], "test_acc": man.get("test_acc"),
            "state_dict": {k: state[k] for k in ref}}


def run_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint.latest_checkpoint(run_dir)
    out = Path(args.out) if args.out else run_dir / "export.pt"
    if ckpt is None:
        if (run_dir / "model.pt").is_file():
            load_model(run_dir / "model.pt")  # check it before pointing the user at it
            raise ConfigError(f"{run_dir} has no checkpoint to export, but the finished run's "
                              f"{run_dir / 'model.pt'} already is the exported model")
        raise ConfigError(f"{run_dir} has no complete checkpoint to export (train with --checkpoint-every N)")
    obj = export_checkpoint(ckpt)
    try:
        checkpoint.save_tensors(obj, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out} ({exc.strerror}); choose a writable --out") from None
    acc = obj["test_acc"]
    print(f"exported {ckpt} (step {obj['step']}, {obj['method']} K={obj['stages']}) to {out}"
          + (f"; last test accuracy {100 * acc:.2f}%" if acc is not None else ""))
    return 0


@torch.no_grad()
def evaluate_file(path: str | Path, dataset: str | None = None, data_dir: str = "data", download: bool = True,
                  batch_size: int = 500, device: str = "cpu") -> dict:
    from auxpar.data import eval_batches, load_dataset

    net, meta = load_model(path, device)
    name = dataset or meta.get("dataset")
    test = load_dataset(name, "test", data_dir=data_dir, download=download)
    if test.num_classes != meta["arch"]["num_classes"] or tuple(test.shape[1:]) != (
            meta["arch"]["input_size"], meta["arch"]["input_size"]) or test.shape[0] != meta["arch"]["in_channels"]:
        raise ConfigError(f"{path} was trained for {meta['arch']['num_classes']} classes of "
                          f"{meta['arch']['in_channels']}x{meta['arch']['input_size']}x{meta['arch']['input_size']} "
                          f"inputs; --dataset {name} has {test.num_classes} classes of "
                          f"{'x'.join(map(str, test.shape))}")
    loss = correct = 0.0
    n = 0
    for b in eval_batches(test, batch_size, torch.device(device)):
        logits = net(b.x)
        loss += float(F.cross_entropy(logits, b.y, reduction="sum"))
        correct += float((logits.argmax(1) == b.y).sum())
        n += b.y.numel()
    return {"model_file": str(path), "dataset": name, "samples": n, "test_acc": correct / n,
            "test_loss": loss / n, "correct": int(correct), "trained_test_acc": meta.get("test_acc")}


def run_eval(args: argparse.Namespace) -> int:
    res = evaluate_file(args.model_file, args.dataset, args.data_dir, not args.no_download, args.batch_size,
                        args.device)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model_file']} on {res['dataset']} test: accuracy {100 * res['test_acc']:.2f}% "
              f"({res['correct']}/{res['samples']}), loss {res['test_loss']:.4f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="gather a run's stages into one ordinary model file",
                       description="Assemble the latest complete checkpoint of RUN_DIR (any method, any K) "
                                   "into one model file that loads into the serial model.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (default: the latest complete one)")
    p.add_argument("--out", metavar="FILE", help="model file to write (default: RUN_DIR/export.pt)")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")
    p.set_defaults(func=run_export)

    e = sub.add_parser("eval", help="evaluate a model file on a test set",
                       description="Test accuracy of an auxpar model file (RUN/model.pt or an export).")
    e.add_argument("model_file", metavar="MODEL_FILE")
    e.add_argument("--dataset", choices=["cifar10", "cifar100", "digits", "synthetic"],
                   help="test set (default: the dataset the model was trained on)")
    e.add_argument("--data-dir", default="data")
    e.add_argument("--no-download", action="store_true")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--debug", action="store_true", help="show the traceback of errors")
    e.set_defaults(func=run_eval)
