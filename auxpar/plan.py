"""``auxpar plan``: where the network is cut, how balanced the cut is, and what the boundaries cost.

Nothing is trained and no data is read: the dataset only contributes its geometry (channels,
image size, classes, training-set size), which is known for every built-in dataset.
``data.train_subset`` replaces the training-set size (it is what the aux store holds).
"""

from __future__ import annotations

import json

import torch

from auxpar.config import DataConfig
from auxpar.coupling.ds import reduced_size
from auxpar import registry
from auxpar.data.datasets import check_train_subset
from auxpar.errors import ConfigError
from auxpar.models import build_model, count_parameters, describe_partition

AUX_DTYPES = {"fp32": 4, "bf16": 2}
DS_FACTORS = (1, 2, 4)


def dataset_geometry(data: DataConfig) -> tuple[int, int, int, int]:
    """(channels, image size, classes, training samples) without loading the data.

    The training samples are ``data.train_subset`` when it is set (checked against the full size
    and the number of classes, as loading would)."""
    if data.dataset == "synthetic":
        c, h, w = data.synthetic_shape
        if h != w:
            raise ConfigError(f"data.synthetic_shape = {data.synthetic_shape}: models take square images; use H == W")
        c, s, k, n = c, h, data.synthetic_classes, data.synthetic_num_train
    else:
        geometry = registry.dataset(data.dataset).geometry  # (channels, size, classes, train, test)
        if geometry is None:
            raise ConfigError(f"dataset {data.dataset!r} registers no geometry, so auxpar plan cannot size it "
                              "without loading it; give geometry=(C, S, classes, train, test) in register_dataset")
        c, s, k, n, _ = geometry
    subset = getattr(data, "train_subset", 0)
    check_train_subset(subset, n, k, data.dataset)
    return c, s, k, (subset or n)


def make_plan(model: str, data: DataConfig, stages: int, split: list[int] | None = None,
              dropout: float = 0.0) -> dict:
    c, size, classes, n_train = dataset_geometry(data)
    with torch.device("meta"):
        # Meta tensors: WRN-28-10 is planned without allocating its 36.5M parameters.
        net = build_model(model, in_channels=c, input_size=size, num_classes=classes, dropout=dropout)
    rows = describe_partition(net, stages, split or None)
    flops = [r["flops"] for r in rows]
    boundaries = [r["boundary_bytes_per_sample"] for r in rows if r["boundary_bytes_per_sample"]]
    values_per_sample = sum(b // 4 for b in boundaries)  # fp32 bytes -> values
    memory = []
    for s in DS_FACTORS:
        vals = 0
        for r in rows[:-1]:
            ch, hh, ww = r["out_shape"]
            vals += ch * reduced_size(hh, s) * reduced_size(ww, s)
        for name, nbytes in AUX_DTYPES.items():
            memory.append({"ds_factor": s, "dtype": name, "aux_bytes": n_train * vals * nbytes,
                           "aux_and_multiplier_bytes": 2 * n_train * vals * nbytes})
    return {
        "model": model, "dataset": data.dataset, "stages": stages,
        "input_shape": [c, size, size], "num_classes": classes, "train_samples": n_train,
        "train_subset": data.train_subset or None,
        "params": count_parameters(net), "stage_rows": rows,
        "balance": (max(flops) / (sum(flops) / len(flops))) if flops else 1.0,
        "boundary_values_per_sample": values_per_sample,
        "aux_memory": memory,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_plan(plan: dict) -> str:
    lines = [
        f"{plan['model']} on {plan['dataset']} (input {'x'.join(map(str, plan['input_shape']))}, "
        f"{plan['num_classes']} classes): {plan['params']:,} parameters, {plan['stages']} stage(s)",
        "",
        f"{'stage':>5}  {'blocks':>7}  {'range':>9}  {'params':>12}  {'GFLOPs/sample':>13}  "
        f"{'output shape':>14}  {'boundary bytes/sample':>21}",
    ]
    for r in plan["stage_rows"]:
        b0, b1 = r["block_range"]
        bb = r["boundary_bytes_per_sample"]
        lines.append(
            f"{r['index']:>5}  {r['blocks']:>7}  {f'{b0}-{b1 - 1}':>9}  {r['params']:>12,}  "
            f"{r['flops'] / 1e9:>13.4f}  {'x'.join(map(str, r['out_shape'])):>14}  "
            f"{(f'{bb:,} (fp32)' if bb else '-'):>21}"
        )
    lines.append("")
    lines.append(f"balance (max stage FLOPs / mean): {plan['balance']:.3f}  (1.000 is perfect)")
    if plan.get("train_subset"):
        lines.append(f"training subset: {plan['train_subset']:,} samples (data.train_subset; fixed, "
                     "class-stratified)")
    if plan["stages"] > 1:
        lines.append(f"aux-state memory for {plan['train_samples']:,} training samples "
                     "(all boundaries; DS factor s stores each state at 1/s resolution per side, rounded up):")
        for m in plan["aux_memory"]:
            lines.append(f"  s={m['ds_factor']} {m['dtype']:>4}: aux {_human(m['aux_bytes']):>10}   "
                         f"with multipliers {_human(m['aux_and_multiplier_bytes']):>10}")
    return "\n".join(lines)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)
