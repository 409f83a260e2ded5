"""The report of a study: results.csv, report.md and PNG plots, from the runs' own files.

Every number comes from a run's ``summary.json`` (final/best test accuracy, train time, comm
bytes, aux-store and peak memory, phase times and per-rank compute/comm/wait seconds) or, for
curves and the time to a target accuracy, from its ``metrics.jsonl`` epoch records. Nothing is
re-measured. Definitions:

* runs are grouped by method table, K and grid settings; a group's value is the mean over its
  seeds (``± std`` over seeds, the sample standard deviation, when there are several);
* speedup = the serial group's mean ``train_time_s`` / the group's mean ``train_time_s``, in the
  same study (training time only: evaluation and start-up are excluded);
* time to target = ``train_time_s`` of the first epoch record whose ``test_acc`` reaches the
  study's ``target_acc`` (mean over the seeds that reach it); when the study sets no target it is
  99% of the serial group's mean final accuracy;
* time split: serial and DDP runs report no split (all compute). Layer-parallel runs split their
  training time into the serial phase (SPH serial epochs plus aux re-initialization) and the
  parallel phase; the parallel phase is divided in the proportions of the ranks' mean compute,
  communication and waiting seconds over the parallel epochs (epoch-record deltas).

matplotlib (the ``plot`` extra) is imported only to draw, with the Agg backend; without it the
report says so and the tables are still written.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path

SPLIT_KEYS = ("compute", "comm", "wait", "serial_phase")
SPLIT_LABELS = {"compute": "compute", "comm": "communication", "wait": "waiting", "serial_phase": "serial phase"}
MB = 1e6

CSV_FIELDS = (
    "name", "label", "method", "k", "world_size", "seed", "settings", "status",
    "final_test_acc", "best_test_acc", "final_train_loss", "final_train_acc",
    "train_time_s", "wall_time_s", "eval_time_s", "speedup_vs_serial", "target_acc", "time_to_target_s",
    "comm_bytes", "aux_store_bytes", "peak_memory_bytes", "params", "epochs", "steps", "ds_factor",
    "phases", "equal_time", "switch_loss_jump", "split_compute_s", "split_comm_s", "split_wait_s", "split_serial_phase_s",
    "device", "backend", "threads", "torch_version", "run_dir",
)


# --------------------------------------------------------------------------- collection

def load_plan(study_dir: Path) -> dict:
    return json.loads((Path(study_dir) / "study.json").read_text(encoding="utf-8"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _epoch_records(path: Path) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a crashed run
                if rec.get("kind") == "epoch":
                    out.append(rec)
    except OSError:
        pass
    return out


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or [""])[-1].strip()


def collect(study_dir: Path, plan: dict) -> list[dict]:
    """One record per planned run: the plan entry, status, summary and epoch records."""
    from auxpar.config import load_toml
    from auxpar.errors import ConfigError
    from auxpar.registry import method_available
    from auxpar.settings import config_differences

    study_dir = Path(study_dir)
    records = []
    available: dict[str, bool] = {}
    for entry in plan["runs"]:
        run_dir = study_dir / "runs" / entry["name"]
        rec = dict(entry)
        rec["run_dir"] = str(run_dir)
        rec["summary"] = None
        rec["epoch_records"] = []
        rec["note"] = ""
        summary = _read_json(run_dir / "summary.json")
        if not isinstance(summary, dict):
            rec["status"] = "missing"
            tail = _log_tail(study_dir / "logs" / f"{entry['name']}.log")
            rec["note"] = tail or "not run"
            if entry.get("optional") and not tail:
                if entry["method"] not in available:
                    available[entry["method"]] = method_available(entry["method"])
                if not available[entry["method"]]:
                    rec["status"] = "unavailable"
                    rec["note"] = f"--method {entry['method']} is not in this build (optional in the study)"
            records.append(rec)
            continue
        planned = study_dir / "configs" / f"{entry['name']}.toml"
        if planned.is_file() and (run_dir / "config.toml").is_file():
            try:
                diffs = config_differences(load_toml(run_dir / "config.toml"), load_toml(planned))
            except ConfigError:
                diffs = []
            if diffs:
                rec["status"] = "stale"
                rec["note"] = "finished with another config: " + "; ".join(diffs[:3])
                records.append(rec)
                continue
        rec["status"] = "complete"
        rec["summary"] = summary
        rec["epoch_records"] = _epoch_records(run_dir / "metrics.jsonl")
        records.append(rec)
    return records


# --------------------------------------------------------------------------- per-run numbers

def time_to_target(epoch_records: list[dict], target: float | None) -> float | None:
    """train_time_s of the first epoch whose test accuracy reaches ``target`` (None: not reached)."""
    if target is None:
        return None
    for rec in epoch_records:
        acc = rec.get("test_acc")
        if acc is not None and acc >= target:
            return rec.get("train_time_s")
    return None


def switch_jumps(epoch_records: list[dict]) -> list[float]:
    """Per parallel -> serial switch: the first serial step's loss minus the mean training loss
    of the parallel epoch before it. A large jump means the stages drifted away from the
    network they form together while they trained apart (SPH runs only)."""
    out = []
    prev = None
    for rec in epoch_records:
        if (prev is not None and rec.get("phase") == "serial" and prev.get("phase") not in (None, "serial")
                and isinstance(rec.get("first_step_loss"), (int, float))
                and isinstance(prev.get("train_loss"), (int, float))):
            out.append(rec["first_step_loss"] - prev["train_loss"])
        prev = rec
    return out


def _rank_lists(obj: dict) -> list[list[float]] | None:
    lists = [obj.get(k) for k in ("time_compute_s", "time_comm_s", "time_wait_s")]
    if all(isinstance(v, list) and v for v in lists):
        return lists
    return None


def time_split(summary: dict, epoch_records: list[dict]) -> dict:
    """Training time split into compute / comm / wait / serial_phase seconds (sums to train_time_s).

    ``split`` is False for methods that report no per-rank times (serial, DDP): all compute.
    """
    total = float(summary.get("train_time_s") or 0.0)
    out = {k: 0.0 for k in SPLIT_KEYS}
    lists = _rank_lists(summary)
    if lists is None:
        out["compute"] = total
        out["split"] = False
        return out
    phases = summary.get("phase_times_s") or {}
    parallel = sum(float(v) for p, v in phases.items() if p not in ("serial", "reinit"))
    if parallel == 0 and set(phases) <= {"serial"}:
        parallel = total  # no SPH phases (the pipeline): all of it splits by the ranks' buckets
    parallel = min(parallel, total)
    out["serial_phase"] = total - parallel
    # shares of compute / comm / wait over the parallel epochs, mean over ranks
    sums = [0.0, 0.0, 0.0]
    prev = None
    for rec in epoch_records:
        cur = _rank_lists(rec)
        if cur is None:
            continue
        if rec.get("phase") not in ("serial",) or parallel == total:
            for i in range(3):
                before = prev[i] if prev is not None else [0.0] * len(cur[i])
                sums[i] += statistics.mean(a - b for a, b in zip(cur[i], before))
        prev = cur
    if sum(sums) <= 0:
        sums = [statistics.mean(v) for v in lists]
    tot = sum(sums)
    for key, part in zip(("compute", "comm", "wait"), sums):
        out[key] = parallel * (part / tot if tot > 0 else (1.0 if key == "compute" else 0.0))
    out["split"] = True
    return out


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def group_key(rec: dict) -> tuple:
    return (rec["label"], rec["k"], json.dumps(rec["settings"], sort_keys=True))


def _settings_text(settings: dict) -> str:
    from auxpar.settings import settings_text

    return settings_text(settings)


def analyse(records: list[dict], target_acc: float | None) -> dict:
    """Groups (plan order) with mean/std stats, the serial reference and the target used."""
    groups: dict[tuple, dict] = {}
    for rec in records:
        g = groups.setdefault(group_key(rec), {"label": rec["label"], "method": rec["method"], "k": rec["k"],
                                               "world": rec["world"], "settings": rec["settings"], "runs": [],
                                               "equal_time": rec.get("equal_time", "")})
        g["runs"].append(rec)
    glist = list(groups.values())

    def vals(g, key):
        return [r["summary"][key] for r in g["runs"]
                if r["summary"] is not None and isinstance(r["summary"].get(key), (int, float))]

    ref = None
    serials = [g for g in glist if g["method"] == "serial" and not g["equal_time"] and vals(g, "train_time_s")]
    if serials:
        ref = next((g for g in serials if not g["settings"]), serials[0])
    ref_time = _mean(vals(ref, "train_time_s")) if ref else None

    target, target_note = target_acc, "study setting target_acc"
    if target is None and ref is not None and vals(ref, "final_test_acc"):
        target = 0.99 * _mean(vals(ref, "final_test_acc"))
        target_note = "99% of serial's mean final test accuracy (the study sets no target_acc)"
    elif target is None:
        target_note = "none (no target_acc and no serial run)"

    for g in glist:
        done = [r for r in g["runs"] if r["summary"] is not None]
        g["n"] = len(done)
        for r in done:
            s = r["summary"]
            r["time_to_target_s"] = time_to_target(r["epoch_records"], target)
            r["speedup"] = (ref_time / s["train_time_s"]) if ref_time and s.get("train_time_s") else None
            r["split"] = time_split(s, r["epoch_records"])
            r["switch_jumps"] = switch_jumps(r["epoch_records"])
        for key in ("final_test_acc", "best_test_acc", "train_time_s", "wall_time_s", "comm_bytes",
                    "aux_store_bytes", "peak_memory_bytes"):
            xs = vals(g, key)
            g[key] = (_mean(xs), _std(xs))
        t = vals(g, "train_time_s")
        g["speedup"] = (ref_time / _mean(t)) if ref_time and t and _mean(t) > 0 else None
        reached = [r["time_to_target_s"] for r in done if r["time_to_target_s"] is not None]
        g["ttt"] = (_mean(reached), len(reached), len(done))
        g["split"] = {k: _mean([r["split"][k] for r in done]) for k in SPLIT_KEYS} if done else None
        jumps = [j for r in done for j in r["switch_jumps"]]
        g["switch_jump"] = _mean(jumps)
        g["epochs"] = sorted({_epochs_of(r["summary"]) for r in done if r["summary"].get("epochs")})
        g["split_reported"] = any(r["split"]["split"] for r in done)
        ds = {r["summary"].get("ds_factor") for r in done}
        g["ds_factor"] = ds.pop() if len(ds) == 1 else None
    ref_acc = _mean(vals(ref, "final_test_acc")) if ref else None
    for g in glist:
        acc = g.get("final_test_acc", (None, None))[0]
        g["gap"] = (acc - ref_acc) if acc is not None and ref_acc is not None else None
    return {"groups": glist, "ref": ref, "ref_time": ref_time, "target": target, "target_note": target_note}


# --------------------------------------------------------------------------- formatting

def fmt_pm(m: float | None, s: float | None, n: int, scale: float = 1.0, nd: int = 2) -> str:
    if m is None:
        return "n/a"
    text = f"{scale * m:.{nd}f}"
    if n > 1 and s is not None:
        text += f" ± {scale * s:.{nd}f}"
    return text


def fmt_num(v: float | None, scale: float = 1.0, nd: int = 2) -> str:
    return "n/a" if v is None else f"{scale * v:.{nd}f}"


def fmt_ttt(ttt: tuple, target: float | None) -> str:
    mean, reached, n = ttt
    if target is None or n == 0:
        return "n/a"
    if reached == 0:
        return "not reached"
    text = f"{mean:.2f}"
    if reached < n:
        text += f" ({reached}/{n} reached)"
    return text


def _epochs_of(summary: dict):
    """Epochs a run trained: whole, or fractional when run.max_steps cut the last one short."""
    if summary.get("max_steps") and summary.get("epochs_trained"):
        return round(float(summary["epochs_trained"]), 2)
    return summary.get("epochs")


def group_settings(g: dict) -> str:
    text = _settings_text(g["settings"])
    if g.get("equal_time"):
        ep = "/".join(str(e) for e in g.get("epochs") or [])
        text = (text + ", " if text else "") + f"equal time to {g['equal_time']}" + (f" ({ep} ep)" if ep else "")
    return text or "-"


def group_cells(g: dict, a: dict) -> list[str]:
    gap = "n/a" if g.get("gap") is None else f"{100 * g['gap']:+.2f}"
    return [
        str(g["k"]), str(g["world"]), group_settings(g), str(g["n"]),
        fmt_pm(*g["final_test_acc"], g["n"], scale=100), gap, fmt_pm(*g["best_test_acc"], g["n"], scale=100),
        fmt_pm(*g["train_time_s"], g["n"]), fmt_num(g["speedup"]), fmt_ttt(g["ttt"], a["target"]),
        fmt_num(g.get("switch_jump"), nd=3),
        fmt_num(g["comm_bytes"][0], 1 / MB), fmt_num(g["aux_store_bytes"][0], 1 / MB),
        fmt_num(g["peak_memory_bytes"][0], 1 / MB),
    ]


def _target_header(a: dict) -> str:
    return f"time to {100 * a['target']:.2f}% (s)" if a["target"] is not None else "time to target (s)"


def group_headers(a: dict) -> list[str]:
    return ["K", "procs", "settings", "seeds", "final test acc %", "gap to serial (pts)", "best test acc %",
            "train time (s)", "speedup vs serial", _target_header(a), "loss jump at switch", "comm MB",
            "aux store MB", "peak mem MB"]


def run_headers(a: dict) -> list[str]:
    return ["run", "method", "K", "settings", "seed", "final test acc %", "best test acc %", "train time (s)",
            "wall time (s)", "speedup vs serial", _target_header(a), "comm MB", "aux store MB", "peak mem MB"]


def run_cells(r: dict, a: dict) -> list[str]:
    s = r["summary"]
    ttt = "n/a" if a["target"] is None else (
        "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.2f}")
    return [r["name"], r["method"], str(r["k"]), _settings_text(r["settings"]) or "-", str(r["seed"]),
            fmt_num(s.get("final_test_acc"), 100), fmt_num(s.get("best_test_acc"), 100),
            fmt_num(s.get("train_time_s")), fmt_num(s.get("wall_time_s")), fmt_num(r["speedup"]), ttt,
            fmt_num(s.get("comm_bytes"), 1 / MB), fmt_num(s.get("aux_store_bytes"), 1 / MB),
            fmt_num(s.get("peak_memory_bytes"), 1 / MB)]


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(ln.rstrip() for ln in out)


def format_table(a: dict) -> str:
    """The table `auxpar study` prints: one line per group (method, K, settings)."""
    headers = ["method"] + group_headers(a)
    headers[headers.index("final test acc %")] = "final acc %"
    headers[headers.index("best test acc %")] = "best acc %"
    rows = [[g["label"]] + group_cells(g, a) for g in a["groups"] if g["n"]]
    if not rows:
        return "no finished runs yet"
    return text_table(headers, rows)


# --------------------------------------------------------------------------- CSV

def write_csv(path: Path, records: list[dict], a: dict) -> None:
    grid_keys: list[str] = []
    for r in records:
        for k in r["settings"]:
            if k not in grid_keys:
                grid_keys.append(k)
    fields = list(CSV_FIELDS[:7]) + grid_keys + list(CSV_FIELDS[7:])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in records:
            s = r["summary"] or {}
            row = {"name": r["name"], "label": r["label"], "method": r["method"], "k": r["k"],
                   "world_size": s.get("world_size", r["world"]), "seed": r["seed"],
                   "settings": _settings_text(r["settings"]), "status": r["status"], "run_dir": r["run_dir"]}
            for k in grid_keys:
                v = r["settings"].get(k)
                row[k] = json.dumps(v) if isinstance(v, (list, bool)) else ("" if v is None else v)
            for k in ("final_test_acc", "best_test_acc", "final_train_loss", "final_train_acc", "train_time_s",
                      "wall_time_s", "eval_time_s", "comm_bytes", "aux_store_bytes", "peak_memory_bytes",
                      "params", "epochs", "steps", "ds_factor", "phases", "device", "backend", "threads",
                      "torch_version"):
                v = s.get(k)
                row[k] = "" if v is None else v
            if r["summary"] is not None:
                row["speedup_vs_serial"] = "" if r["speedup"] is None else r["speedup"]
                row["target_acc"] = "" if a["target"] is None else a["target"]
                row["time_to_target_s"] = "" if r["time_to_target_s"] is None else r["time_to_target_s"]
                row["switch_loss_jump"] = "" if not r["switch_jumps"] else _mean(r["switch_jumps"])
                for k in SPLIT_KEYS:
                    row[f"split_{k}_s"] = r["split"][k]
            row["equal_time"] = r.get("equal_time", "")
            w.writerow(row)


# --------------------------------------------------------------------------- plots

def _group_name(g: dict, with_k: bool = True) -> str:
    parts = [g["label"]]
    if with_k and g["method"] != "serial":
        parts.append(f"K={g['k']}")
    st = _settings_text(g["settings"])
    if st:
        parts.append(st)
    return " ".join(parts)


def make_plots(study_dir: Path, a: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the plots that have data; returns ([(title, relative path)], [notes on skipped plots])."""
    notes: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install 'auxpar[plot]')"]

    plot_dir = Path(study_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    made: list[tuple[str, str]] = []
    groups = [g for g in a["groups"] if g["n"]]

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append((title, f"plots/{name}"))

    # 1. test accuracy against training time
    curves = []
    for g in groups:
        runs = [r["epoch_records"] for r in g["runs"] if r["summary"] is not None and r["epoch_records"]]
        if not runs:
            continue
        n_ep = min(len(e) for e in runs)
        xs, ys = [], []
        for i in range(n_ep):
            accs = [e[i].get("test_acc") for e in runs]
            times = [e[i].get("train_time_s") for e in runs]
            if any(v is None for v in accs + times):
                continue
            xs.append(statistics.mean(times))
            ys.append(100 * statistics.mean(accs))
        if xs:
            curves.append((_group_name(g), xs, ys))
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, xs, ys in curves:
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        if a["target"] is not None:
            ax.axhline(100 * a["target"], color="gray", ls="--", lw=1, label=f"target {100 * a['target']:.2f}%")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Test accuracy against training time (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "accuracy_vs_time.png", "Test accuracy against training time")
    else:
        notes.append("accuracy against time: skipped, no run has epoch records with a test accuracy")

    # 2. speedup against K
    lines: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        if g["method"] == "serial" or g["speedup"] is None:
            continue
        lines.setdefault(_group_name(g, with_k=False), []).append((g["k"], g["speedup"]))
    if a["ref"] is None:
        notes.append("speedup against K: skipped, the study has no finished serial run to compare with")
    elif not lines:
        notes.append("speedup against K: skipped, no finished parallel run")
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        kmax = max(k for pts in lines.values() for k, _ in pts)
        ax.plot([1, kmax], [1, kmax], color="gray", ls=":", lw=1, label="linear (ideal)")
        ax.scatter([1], [1.0], color="black", zorder=3, label="serial")
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("K (stages; ranks for ddp)")
        ax.set_ylabel("speedup vs serial (training time)")
        ax.set_xscale("log", base=2)
        ks = sorted({1} | {k for pts in lines.values() for k, _ in pts})
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_title("Speedup against K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "speedup_vs_k.png", "Speedup against K")
        if len({k for pts in lines.values() for k, _ in pts}) < 2:
            notes.append("speedup against K: the study has one K, so each method is a single point")

    # 3. communication against DS factor
    ds_lines: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        if g["ds_factor"] is None or g["comm_bytes"][0] is None:
            continue
        rest = {k: v for k, v in g["settings"].items() if k != "coupling.ds_factor"}
        name = " ".join([g["label"], f"K={g['k']}"] + ([_settings_text(rest)] if rest else []))
        ds_lines.setdefault(name, []).append((g["ds_factor"], g["comm_bytes"][0] / MB))
    ds_values = {d for pts in ds_lines.values() for d, _ in pts}
    if len(ds_values) < 2:
        notes.append("communication against DS factor: skipped, "
                     + (f"every layer-parallel run uses ds_factor {ds_values.pop()}" if ds_values
                        else "no layer-parallel run reports a ds_factor")
                     + " (vary it with grid.coupling.ds_factor = [1, 2, 4])")
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, pts in ds_lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("DS factor s (boundary states at 1/s resolution per side)")
        ax.set_ylabel("communication per run (MB)")
        ax.set_xticks(sorted(ds_values))
        ax.set_yscale("log")
        ax.set_title("Communication against DS factor")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "comm_vs_ds.png", "Communication against DS factor")

    # 4. time split
    split_groups = [g for g in groups if g["split"] is not None]
    if split_groups:
        fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(split_groups) + 1.8))
        names = [_group_name(g) + ("" if g["split_reported"] else " (not split)") for g in split_groups]
        left = [0.0] * len(split_groups)
        colors = {"compute": "#4c72b0", "comm": "#dd8452", "wait": "#c44e52", "serial_phase": "#8172b3"}
        for key in SPLIT_KEYS:
            vals = [g["split"][key] for g in split_groups]
            ax.barh(range(len(split_groups)), vals, left=left, color=colors[key], label=SPLIT_LABELS[key])
            left = [x + v for x, v in zip(left, vals)]
        ax.set_yticks(range(len(split_groups)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("training time (s, mean over seeds)")
        ax.set_title("Where the training time goes")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.5 / (len(split_groups) + 3)),
                  ncol=4, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        save(fig, "time_split.png", "Training time split")
    else:
        notes.append("time split: skipped, no finished run")
    return made, notes


# --------------------------------------------------------------------------- report.md

def write_markdown(path: Path, plan: dict, records: list[dict], a: dict, plots, notes) -> None:
    done = [r for r in records if r["status"] == "complete"]
    sums = [r["summary"] for r in done]
    devices = sorted({f"{s.get('device')} ({s.get('backend')})" for s in sums})
    torches = sorted({str(s.get("torch_version")) for s in sums})
    L = [f"# Study `{plan['name']}`", ""]
    if plan.get("description"):
        L += [plan["description"], ""]
    L += [
        f"- study file: `{plan.get('source', '?')}`; report written {time.strftime('%Y-%m-%d %H:%M')} "
        f"on {platform.machine()} {platform.system()}",
        f"- runs: {len(done)} of {len(records)} complete"
        + (f" (missing or failed: {len(records) - len(done)}, listed below)" if len(done) < len(records) else ""),
        f"- devices: {', '.join(devices) or 'n/a'}; torch {', '.join(torches) or 'n/a'}",
        "- target accuracy: " + (f"{100 * a['target']:.2f}% ({a['target_note']})" if a["target"] is not None
                                  else a["target_note"]),
        "- speedup: serial's mean training time / the row's mean training time (same study; "
        "training time excludes evaluation and start-up)"
        + ("" if a["ref"] is not None else " -- n/a here: the study has no finished serial run"),
        "- gap to serial: the row's mean final test accuracy minus full-length serial's, in points; "
        "`equal time to X` rows are serial with the same schedule shape cut to the epochs that fit "
        "into X's training time (the honest baseline for X's speedup)",
        "- loss jump at switch: first serial step's loss minus the last parallel epoch's mean "
        "training loss, mean over the SPH switches (how far the stages drifted apart)",
        "- accuracy: mean over seeds, `± std` (sample) when there are several; MB = 10^6 bytes; "
        "peak memory is the largest rank's (CUDA allocator peak on GPU, max RSS on CPU)",
        "",
        "## Results by method",
        "",
    ]
    labels: list[str] = []
    for g in a["groups"]:
        if g["label"] not in labels:
            labels.append(g["label"])
    for label in labels:
        gs = [g for g in a["groups"] if g["label"] == label and g["n"]]
        method = next(g["method"] for g in a["groups"] if g["label"] == label)
        L.append(f"### {label}" + (f" (`--method {method}`)" if method != label else ""))
        L.append("")
        if gs:
            L.append(md_table(group_headers(a), [group_cells(g, a) for g in gs]))
        else:
            L.append("No finished run.")
        L.append("")

    L += ["## Plots", ""]
    for title, rel in plots:
        L += [f"### {title}", "", f"![{title}]({rel})", ""]
        if rel.endswith("time_split.png"):
            L += ["Serial and DDP runs report no split (all their time is shown as compute). "
                  "Layer-parallel runs: serial phase = SPH serial epochs + aux re-initialization; the "
                  "parallel phase is divided in the proportions of the ranks' mean compute, "
                  "communication and waiting seconds.", ""]
            split_rows = [[_group_name(g)] + [fmt_num(g["split"][k]) for k in SPLIT_KEYS]
                          + [fmt_pm(*g["train_time_s"], 1)] for g in a["groups"] if g["n"]]
            L += [md_table(["run group"] + [f"{SPLIT_LABELS[k]} (s)" for k in SPLIT_KEYS] + ["train time (s)"],
                           split_rows), ""]
    if notes:
        L += ["Not drawn:", ""] + [f"- {n}" for n in notes] + [""]

    L += write_ladder_and_phases(a, a.get("ladder") or [])
    L += ["## All runs", "", md_table(run_headers(a), [run_cells(r, a) for r in done]), ""]
    missing = [r for r in records if r["status"] != "complete"]
    if missing:
        L += ["### Missing or failed runs", "",
              md_table(["run", "status", "note"], [[r["name"], r["status"], r["note"] or "-"] for r in missing]),
              "", "Their logs are in `logs/`; rerunning the study runs them (finished runs are skipped).", ""]
    L += ["Every number above is read from the runs' `runs/NAME/summary.json` (curves and time to "
          "target from `runs/NAME/metrics.jsonl`); `results.csv` holds them unrounded, one row per run.", ""]
    path.write_text("\n".join(L), encoding="utf-8")


def phase_epochs(epoch_records: list[dict]) -> dict[str, list[float]]:
    """Seconds of each parallel and each serial epoch (``epoch_time_s``, which excludes the
    re-initialization before it), and of each re-initialization (``reinit_time_s`` > 0)."""
    out: dict[str, list[float]] = {"parallel": [], "serial": [], "reinit": []}
    for e in epoch_records:
        t = e.get("epoch_time_s")
        if isinstance(t, (int, float)) and e.get("phase") in ("parallel", "serial"):
            out[e["phase"]].append(float(t))
        r = e.get("reinit_time_s")
        if isinstance(r, (int, float)) and r > 0:
            out["reinit"].append(float(r))
    return out


def accuracy_ladder(a: dict, targets: list[float]) -> list[dict]:
    """Per group and target: mean time to the target over the seeds that reach it, how many do,
    and serial's mean time to it / the group's (the speedup to that accuracy)."""
    rows = []
    ref = a["ref"]
    for g in a["groups"]:
        done = [r for r in g["runs"] if r["summary"] is not None]
        if not done:
            continue
        cells = []
        for t in targets:
            reached = [x for x in (time_to_target(r["epoch_records"], t) for r in done) if x is not None]
            ref_reached = ([x for x in (time_to_target(r["epoch_records"], t) for r in ref["runs"]
                                        if r["summary"] is not None) if x is not None] if ref else [])
            mean, ref_mean = _mean(reached), _mean(ref_reached)
            cells.append({"target": t, "time": mean, "n": len(reached), "of": len(done),
                          "speedup": (ref_mean / mean) if mean and ref_mean else None})
        rows.append({"group": g, "cells": cells})
    return rows


def write_ladder_and_phases(a: dict, targets: list[float]) -> list[str]:
    """report.md sections: time to each accuracy, and the per-epoch times of the SPH phases."""
    L: list[str] = []
    rows = accuracy_ladder(a, targets)
    if targets and rows:
        L += ["## Time to accuracy", "",
              "Mean training time to the first epoch end at or above each test accuracy, over the "
              "seeds that reach it (reached/run), and serial's mean time to it divided by the row's "
              "(evaluations are at epoch ends, so these move in steps of an epoch).", ""]
        head = ["run group"] + [f"to {100 * t:.2f}%: time (s), speedup" for t in targets]
        body = []
        for row in rows:
            cells = [_group_name(row["group"])]
            for c in row["cells"]:
                if c["time"] is None:
                    cells.append(f"not reached (0/{c['of']})")
                else:
                    sp = "" if c["speedup"] is None else f", {c['speedup']:.2f}x"
                    cells.append(f"{c['time']:.1f} ({c['n']}/{c['of']}){sp}")
            body.append(cells)
        L += [md_table(head, body), ""]
    ref = a["ref"]
    ref_epoch = None
    if ref is not None:
        ts = [t for r in ref["runs"] if r["summary"] is not None
              for t in phase_epochs(r["epoch_records"])["serial"] + phase_epochs(r["epoch_records"])["parallel"]]
        ref_epoch = _mean(ts)
    phase_rows = []
    for g in a["groups"]:
        done = [r for r in g["runs"] if r["summary"] is not None]
        per = [phase_epochs(r["epoch_records"]) for r in done]
        par = [t for p in per for t in p["parallel"]]
        if not par:
            continue
        ser = [t for p in per for t in p["serial"]]
        re_ = [t for p in per for t in p["reinit"]]

        def cell(xs, n_per_run=True):
            if not xs:
                return "-"
            m = _mean(xs)
            return f"{m:.1f} ({len(xs) // max(1, len(done))}/run)" if n_per_run else f"{m:.1f}"

        phase_rows.append([_group_name(g), cell(par), fmt_num(ref_epoch / _mean(par) if ref_epoch else None),
                           cell(ser), fmt_num(ref_epoch / _mean(ser) if ref_epoch and ser else None), cell(re_)])
    if phase_rows:
        L += ["## Phase times", "",
              "Mean seconds per parallel epoch, per SPH serial epoch and per aux re-initialization "
              "(epochs per run in brackets), and serial's mean epoch time divided by each"
              + (f" (serial: {ref_epoch:.1f} s per epoch)" if ref_epoch else " (no serial run: n/a)") + ".", "",
              md_table(["run group", "parallel epoch (s)", "vs serial's epoch", "serial epoch (s)",
                        "vs serial's epoch", "re-initialization (s)"], phase_rows), ""]
    return L


def write_report(study_dir: str | Path, targets: list[float] | None = None) -> dict:
    """Collect the study's runs and write results.csv, report.md and plots/; returns
    {"table": printed table, "plots": [paths], "analysis": ..., "records": ...}. ``targets``:
    more accuracies for the time-to-accuracy table (besides the plan's target_acc and
    report_targets)."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    records = collect(study_dir, plan)
    a = analyse(records, plan.get("target_acc"))
    ladder = sorted({*(plan.get("report_targets") or []), *(targets or []),
                     *([a["target"]] if a["target"] is not None else [])})
    a["ladder"] = ladder
    write_csv(study_dir / "results.csv", records, a)
    plots, notes = make_plots(study_dir, a)
    write_markdown(study_dir / "report.md", plan, records, a, plots, notes)
    return {"table": format_table(a), "plots": [str(study_dir / p) for _, p in plots], "analysis": a,
            "records": records, "notes": notes}


