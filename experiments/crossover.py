"""Where would penalty/AL overtake the pipeline and DDP? The performance model, swept.

    python experiments/crossover.py                                   # profile ResNet-20 / Fashion-MNIST here, ~2 min
    python experiments/crossover.py --profile runs/crossover/perf.json   # reuse a profile: instant

Profiles the model once on this device (``auxpar model-perf``'s profile, 1 thread), then
predicts the epoch time of every method for K = 2, 4, 8 devices like this one, global batch
32 .. 512 and links of 1, 10 and 100 GB/s, and prints, per scenario, the predicted speedups
over serial and the fastest method, with the three quantities that decide it:

* the pipeline's bubble, (K - 1) / (M + K - 1) of every step idle (1F1B, M micro-batches);
* DDP's all-reduce: 2 (K - 1) / K x 4 bytes x parameters per step, independent of the batch;
* the SPH serial share: with ``parallel:2,serial:1`` a third of the epochs run the K stages one
  after another (the layer executor), which caps penalty/AL at 3x whatever K is; parallel-only
  training removes that cap but loses accuracy (README, Fashion-MNIST study). The fashion-mnist
  recipe (``serial:1,parallel:2`` with the serial epochs as a 1F1B pipeline) has more serial
  epochs, but each costs a pipeline epoch instead of a serial one: column ``penalty-recipe``.

The model was validated at K = 2 on this CPU (README, "Performance model"; stated error 16%);
for K > 2 it is a prediction for K devices like the profiled one, not a measurement. Writes
``OUT/crossover.md`` and ``OUT/perf.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auxpar.config import build_config  # noqa: E402
from auxpar.perfmodel import Profile, Scenario, bubble_fraction, predict, profile_model  # noqa: E402

METHODS = ("ddp", "pipeline", "penalty", "penalty-recipe", "penalty-par")
# (method, SPH phases, serial executor) the model is asked for, per column
COLUMNS = {"ddp": ("ddp", "parallel:2,serial:1", "layer"), "pipeline": ("pipeline", "parallel:2,serial:1", "layer"),
           "penalty": ("penalty", "parallel:2,serial:1", "layer"),
           "penalty-recipe": ("penalty", "serial:1,parallel:2", "pipeline"),
           "penalty-par": ("penalty", "parallel", "layer")}


def scenario(B: int, bw: float, K: int, phases: str, epochs: int, serial_executor: str = "layer",
             microbatches: int = 0, contention: float = 1.0) -> Scenario:
    return Scenario(batch_size=B, bandwidth_gbs=bw, latency_us=10.0 if bw >= 10 else 50.0,
                    microbatches=microbatches or max(8, K), phases=phases, epochs=epochs,
                    serial_executor=serial_executor, contention=contention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--train-samples", type=int, default=10000, help="epoch length (the study's subset)")
    ap.add_argument("--stages", default="2,4,8")
    ap.add_argument("--batch-sizes", default="32,128,512")
    ap.add_argument("--bandwidths", default="1,10,100", help="GB/s")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--microbatches", type=int, default=0,
                    help="micro-batches of the pipeline and the pipelined serial epochs (0 = max(8, K))")
    ap.add_argument("--profile", help="perf.json of an earlier run (skips profiling)")
    ap.add_argument("--contention", type=float, default=1.0,
                    help="compute slowdown of every rank of a multi-rank method (model-perf --contention): 1 for "
                         "devices like the profiled one that share nothing; 2 / the 2-process ceiling of "
                         "experiments/bench_parallel.py to compare with K = 2 runs on this machine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/crossover")
    args = ap.parse_args()
    Ks = [int(k) for k in args.stages.split(",")]
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    bws = [float(b) for b in args.bandwidths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.profile:
        data = json.loads(Path(args.profile).read_text())
        prof = Profile.from_json(data.get("profile", data))
    else:
        Ms = [args.microbatches or max(8, K) for K in Ks]
        sizes = sorted({b for B in Bs for b in [B] + [B // K for K in Ks if B % K == 0]
                        + [B // M for M in Ms if B % M == 0]})
        cfg = build_config({}, {"data": {"dataset": args.dataset}, "model": {"name": args.model}})
        print(f"profiling {args.model} on {args.dataset} at batch sizes {sizes} (1 thread)", flush=True)
        prof = profile_model(args.model, args.dataset, sizes, data_cfg=cfg.data, threads=1, repeats=args.repeats,
                             optim_cfg=cfg.optim, stat="min", progress=lambda m: print(f"  {m}", flush=True))
        (out / "perf.json").write_text(json.dumps({"profile": prof.to_json()}, indent=1))
    prof.train_samples = args.train_samples

    P = sum(prof.params)
    lines = [f"# Predicted crossover: {prof.model} on {prof.dataset}, {args.train_samples} samples/epoch, "
             f"{args.epochs} epochs", "",
             f"Profile: {prof.device}, torch {prof.torch_version}, {prof.threads} thread(s), {prof.date}. "
             "Speedup = serial epoch time / the method's (SPH phases and re-initializations included). "
             f"Pipeline: 1F1B with M = {args.microbatches or 'max(8, K)'} micro-batches. penalty: SPH parallel:2,serial:1 (the "
             "default, layer-serial epochs); penalty-recipe: the fashion-mnist recipe, SPH serial:1,parallel:2 "
             "with the serial epochs as the same 1F1B pipeline; penalty-par: parallel phases only. AL costs "
             "what penalty costs. Fastest: among ddp, pipeline and the two SPH schedules."
             + (f" Contention {args.contention:g}: every rank computes {args.contention:g}x slower than the profile."
                if args.contention != 1.0 else ""), "",
             "| K | batch | link GB/s | ddp | pipeline | penalty | penalty-recipe | penalty-par | fastest | bubble | "
             "all-reduce MB/step | serial share of time: penalty, recipe |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for K in Ks:
        for B in Bs:
            for bw in bws:
                sp, share = {}, {}
                for m in METHODS:
                    method, phases, executor = COLUMNS[m]
                    row = predict(prof, method, K, scenario(B, bw, K, phases, args.epochs, executor,
                                                            args.microbatches, args.contention))
                    sp[m] = row.get("speedup")
                    if m in ("penalty", "penalty-recipe") and row.get("epoch_s"):
                        ser = (args.epochs - row["parallel_epochs"]) * row["serial_epoch_s"] + row["reinits"] * row["reinit_s"]
                        share[m] = ser / (row["epoch_s"] * args.epochs)
                cands = {m: v for m, v in sp.items() if v is not None and m != "penalty-par"}
                best = max(cands, key=cands.get) if cands else "-"
                cells = [f"{sp[m]:.2f}" if sp[m] is not None else "n/a" for m in METHODS]
                shares = ", ".join(f"{share[m]:.2f}" if m in share else "n/a" for m in ("penalty", "penalty-recipe"))
                lines.append(f"| {K} | {B} | {bw:g} | " + " | ".join(cells) + f" | {best} | "
                             f"{bubble_fraction(K, args.microbatches or max(8, K)):.2f} | {2 * (K - 1) / K * 4 * P / 1e6:.2f} | {shares} |")
    text = "\n".join(lines) + "\n"
    (out / "crossover.md").write_text(text)
    print(text)
    print(f"wrote {out / 'crossover.md'}")


if __name__ == "__main__":
    main()
