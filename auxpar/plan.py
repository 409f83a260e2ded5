"""``auxpar plan``: where the network is cut, how balanced the cut is, and what the boundaries cost.

Nothing is trained and no data is read: the dataset only contributes its geometry (channels,
image size, classes, training-set size), which is known for every built-in dataset.
``data.train_subset`` replaces the training-set size (it is what the aux store holds).

With ``dist.dp = D`` data-parallel replicas of the K stages (world = K x D ranks, rank = d*K + k),
replica d sees only its shard of every global batch, and the aux states (and AL multipliers) of a
sample live only with the replica that sees it: the store of one rank holds ceil(N / D) samples of
the one boundary it reads (rank k > 0 stores boundary k, its input). The plan reports the busiest
rank's store (per rank) next to the total over all ranks, which D does not change.
"""

from __future__ import annotations

import json
import math

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


def check_dp(dp, n_train: int | None = None) -> int:
    """The data-parallel degree D as a whole number >= 1 (and at most the training samples)."""
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ConfigError(f"--dp {dp}: give the number of data-parallel replicas of the stages, a whole "
                          "number >= 1 (world = K x D ranks; 1 = no replicas)")
    if n_train is not None and dp > n_train:
        raise ConfigError(f"--dp {dp} is more replicas than the {n_train:,} training samples; every replica "
                          "needs a shard of the data")
    return dp


def make_plan(model: str, data: DataConfig, stages: int, split: list[int] | None = None,
              dropout: float = 0.0, dp: int = 1, split_blocks: list[int] | None = None) -> dict:
    check_dp(dp)
    c, size, classes, n_train = dataset_geometry(data)
    check_dp(dp, n_train)
    per_replica = math.ceil(n_train / dp)  # samples in the aux store of one rank (the largest shard)
    with torch.device("meta"):
        # Meta tensors: WRN-28-10 is planned without allocating its 36.5M parameters.
        net = build_model(model, in_channels=c, input_size=size, num_classes=classes, dropout=dropout)
        net = net.split_blocks(split_blocks or [])
    rows = describe_partition(net, stages, split or None)
    flops = [r["flops"] for r in rows]
    boundaries = [r["boundary_bytes_per_sample"] for r in rows if r["boundary_bytes_per_sample"]]
    values_per_sample = sum(b // 4 for b in boundaries)  # fp32 bytes -> values
    memory = []
    for s in DS_FACTORS:
        per_boundary = []  # values per sample of boundary k + 1, stored by rank k + 1 (its input)
        for r in rows[:-1]:
            ch, hh, ww = r["out_shape"]
            per_boundary.append(ch * reduced_size(hh, s) * reduced_size(ww, s))
        vals, busiest = sum(per_boundary), max(per_boundary, default=0)
        for name, nbytes in AUX_DTYPES.items():
            rank_bytes = per_replica * busiest * nbytes
            memory.append({"ds_factor": s, "dtype": name, "aux_bytes": n_train * vals * nbytes,
                           "aux_and_multiplier_bytes": 2 * n_train * vals * nbytes,
                           "aux_bytes_per_rank": rank_bytes, "aux_and_multiplier_bytes_per_rank": 2 * rank_bytes,
                           "busiest_stage": (1 + per_boundary.index(busiest)) if per_boundary else None})
    return {
        "model": model, "dataset": data.dataset, "stages": stages, "dp": dp, "world_size": stages * dp,
        "samples_per_rank": per_replica,
        "input_shape": [c, size, size], "num_classes": classes, "train_samples": n_train,
        "train_subset": data.train_subset or None,
        "params": count_parameters(net), "stage_rows": rows, "split_blocks": sorted(split_blocks or []),
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
            f"{r['index']:>5}  {r['blocks']:>7}  {r.get('units', f'{b0}-{b1 - 1}'):>9}  {r['params']:>12,}  "
            f"{r['flops'] / 1e9:>13.4f}  {'x'.join(map(str, r['out_shape'])):>14}  "
            f"{(f'{bb:,} (fp32)' if bb else '-'):>21}"
        )
    lines.append("")
    lines.append(f"balance (max stage FLOPs / mean): {plan['balance']:.3f}  (1.000 is perfect)")
    if plan.get("split_blocks"):
        lines.append(f"blocks cut in two (model.split_blocks): {', '.join(map(str, plan['split_blocks']))}; "
                     "'a' is a block's first half (to its first convolution), 'b' the rest, and the "
                     "blocks column and --split count units")
    if plan.get("cut_by") == "time":
        lines.append("dist.balance = time: a run measures its cut when it starts (forward+backward times on its "
                     "device), so it may differ from the FLOP-balanced cut above; the run logs it and "
                     "summary.json records it. Plan a given cut with --split N,N,...")
    if plan.get("train_subset"):
        lines.append(f"training subset: {plan['train_subset']:,} samples (data.train_subset; fixed, "
                     "class-stratified)")
    if plan["stages"] > 1:
        dp = plan.get("dp", 1)
        lines.append(f"aux-state memory for {plan['train_samples']:,} training samples "
                     "(all boundaries; DS factor s stores each state at 1/s resolution per side, rounded up):")
        if dp > 1:
            lines.append(f"  --dp {dp}: {plan['stages']} stages x {dp} replicas = {plan['world_size']} ranks; "
                         f"a rank stores its replica's {plan['samples_per_rank']:,} samples (ceil(N/D)) "
                         "of its input boundary")
        else:
            lines.append("  per rank = the busiest rank: rank k > 0 stores its input boundary k")
        for m in plan["aux_memory"]:
            lines.append(f"  s={m['ds_factor']} {m['dtype']:>4}: aux {_human(m['aux_bytes']):>10}   "
                         f"with multipliers {_human(m['aux_and_multiplier_bytes']):>10}   "
                         f"| per rank: aux {_human(m['aux_bytes_per_rank']):>10}   "
                         f"with multipliers {_human(m['aux_and_multiplier_bytes_per_rank']):>10}")
        lines.append("  (coupling.stage_input = output stores one more state per sample, the stage's true "
                     "input: add one aux column)")
    return "\n".join(lines)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)
