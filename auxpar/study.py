"""``auxpar study``: run a grid of training runs (methods x K x settings x seeds) and report them.

A study file (TOML, format in ``experiments/studies/README.md``) names a base training config
and, per method, the stage counts K, fixed overrides and a grid of settings; ``[study] seeds``
multiplies everything. Every run is a separate ``python -m auxpar train`` process (which starts
its own K gloo processes on CPU), or a printed ``torchrun`` command for a cluster
(``--print-commands``). The study directory holds::

    STUDY/study.toml          the study file as given (provenance)
    STUDY/study.json          the expanded plan (what --report-only reads)
    STUDY/configs/NAME.toml   one fully resolved train config per run
    STUDY/runs/NAME/          the run directories (config.toml, metrics.jsonl, summary.json, ...)
    STUDY/logs/NAME.log       each run's stdout and stderr (last attempt)
    STUDY/commands.sh         with --print-commands: the commands of the unfinished runs
    STUDY/results.csv, STUDY/report.md, STUDY/plots/*.png     (auxpar.report)

A run whose ``summary.json`` exists and whose ``config.toml`` matches the plan is complete and
skipped, so re-running a study resumes it. An unfinished run restarts from its latest
checkpoint when ``RUN/checkpoints/`` exists (``--resume latest``), from scratch otherwise.
``auxpar study`` without ``--config`` runs the embedded quick study (:data:`QUICK_STUDY`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auxpar import registry
from auxpar.errors import ConfigError
from auxpar.settings import EQUAL_TIME_KEYS, _flatten, config_differences, setting_tag, settings_text

# --------------------------------------------------------------------------- the embedded default

QUICK_STUDY: dict = {
    "study": {
        "name": "quick",
        "description": "Quick study: ResNet-20 on the embedded digits set, serial backprop against "
                       "penalty, AL and MGRIT layer-parallel training at K = 2, one process per stage "
                       "(gloo on CPU), 1 thread per process.",
        "seeds": [0],
        "target_acc": 0.95,
    },
    "base": {
        "run": {"epochs": 15, "threads": 1},
        "model": {"name": "resnet20"},
        "data": {"dataset": "digits"},
    },
    "methods": {
        "serial": {},
        "penalty": {"stages": [2]},
        "al": {"stages": [2]},
        "mgrit": {"stages": [2], "optional": True},
    },
}
"""What ``auxpar study`` runs without ``--config`` (experiments/studies/quick-digits.toml is the
same study as a file). About two minutes on a 2-core CPU (MGRIT is the slowest run)."""

DEFAULT_OUT_ROOT = "studies"

STUDY_KEYS = ("name", "description", "config", "seeds", "target_acc", "report_targets", "out")
METHOD_KEYS = ("method", "stages", "seeds", "grid", "optional", "equal_time", "equal_time_round")
EQUAL_TIME_ROUND = ("epoch", "step")
TOP_KEYS = ("study", "base", "methods")

CONTROLLED = {
    "run.method": "the method is the name of its [methods.NAME] table (or its method = key)",
    "run.seed": "seeds are listed in [study] seeds (or a method's seeds)",
    "run.out": "run directories are named by the study (STUDY/runs/NAME)",
    "run.resume": "the study resumes unfinished runs from their checkpoints by itself",
    "dist.stages": "K is listed in the method's stages = [...]",
    "dist.nproc": "the study starts one process per stage (DDP: per K) by itself",
}
"""Settings the study sets for each run; a study file may not set them elsewhere."""


# --------------------------------------------------------------------------- plan

@dataclass
class RunSpec:
    name: str
    """Run directory name under STUDY/runs, e.g. penalty-k4-ds2-sph-p8s2-s0."""
    label: str
    """The [methods.LABEL] table the run comes from (the method name unless method = is given)."""
    method: str
    k: int
    """Devices along the parallel axis: stages for layer-parallel methods, ranks for ddp, 1 for serial."""
    world: int
    """Processes of the run (K, or K * dp for penalty, al and mgrit on a mesh)."""
    seed: int
    settings: dict
    """The run's grid values, dotted key -> value (fixed per-method overrides are not listed)."""
    config: dict
    """Fully resolved train config (Config.resolved(); run.out is set when it is written)."""
    optional: bool = False
    equal_time: str = ""
    """Label of the method table whose training time this run gets (``equal_time = "LABEL"``);
    its epoch count is derived when it starts (:func:`resolve_equal_time`)."""
    equal_time_round: str = "epoch"
    """epoch: as many whole epochs as fit (never more time than the reference); step: as many
    steps as fit, the last epoch cut short (run.max_steps), so the time matches to one step."""
    pace: str = ""
    """Label of the full-length table of the same method whose runs give the time per epoch."""

    def plan_entry(self) -> dict:
        entry = {"name": self.name, "label": self.label, "method": self.method, "k": self.k,
                 "world": self.world, "seed": self.seed, "settings": self.settings,
                 "optional": self.optional, "equal_time": self.equal_time, "pace": self.pace}
        if self.equal_time_round != "epoch":
            entry["equal_time_round"] = self.equal_time_round
        return entry


@dataclass
class Study:
    name: str
    source: str
    description: str = ""
    target_acc: float | None = None
    report_targets: list[float] = field(default_factory=list)
    """More test accuracies for the report's time-to-accuracy table (besides target_acc)."""
    out: str = ""
    runs: list[RunSpec] = field(default_factory=list)
    text: str = ""
    """The study file's text (copied to STUDY/study.toml)."""

    def plan(self) -> dict:
        plan = {"name": self.name, "source": self.source, "description": self.description,
                "target_acc": self.target_acc, "runs": [r.plan_entry() for r in self.runs]}
        if self.report_targets:
            plan["report_targets"] = list(self.report_targets)
        return plan


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        sec, _, rest = key.partition(".")
        if not rest:
            raise ConfigError(f"setting {key!r}: write section.key, e.g. coupling.ds_factor")
        out.setdefault(sec, {})[rest] = v
    return out


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _sections() -> tuple[str, ...]:
    from auxpar.config import Config

    return tuple(f.name for f in dataclasses.fields(Config))


def _check_controlled(flat: dict, where: str) -> None:
    for key in flat:
        if key in CONTROLLED:
            raise ConfigError(f"{where}: {key} is set by the study ({CONTROLLED[key]}); remove it")


def _int_list(value: Any, where: str, minimum: int = 1) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in value)):
        raise ConfigError(f"{where} = {value!r}: give a list of whole numbers >= {minimum}, e.g. [2, 4, 8]")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where} = {value!r} lists a value twice")
    return list(value)


def parse_study(data: dict, source: str = "study", base_dir: Path | None = None, text: str = "") -> Study:
    """Validate a study mapping and expand it into runs (methods x K x settings x seeds)."""
    from auxpar.config import Config, apply_dict, build_config, load_toml

    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study is a TOML table")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown top-level key or table [{key}]; a study has "
                              + ", ".join(f"[{k}]" for k in TOP_KEYS)
                              + " (train settings go in [base.SECTION] or [methods.NAME.SECTION])")
    st = data.get("study", {})
    if not isinstance(st, dict):
        raise ConfigError(f"{source}: [study] must be a table")
    for key in st:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{source}: unknown key study.{key}; valid keys in [study]: {', '.join(STUDY_KEYS)}")
    study_name = st.get("name") or (Path(source).stem if source not in ("study", "") else "study")
    if not isinstance(study_name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", study_name):
        raise ConfigError(f"{source}: study.name = {study_name!r}: use letters, digits, '.', '_' and '-' only")
    seeds = _int_list(st.get("seeds", [0]), f"{source}: study.seeds", minimum=0)
    target = st.get("target_acc")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ConfigError(f"{source}: study.target_acc = {target!r}: give a test accuracy as a "
                              "fraction in (0, 1], e.g. 0.93 for 93%")
        target = float(target)
    report_targets = parse_targets(st.get("report_targets", []), f"{source}: study.report_targets")
    for key in ("description", "out", "config"):
        if key in st and not isinstance(st[key], str):
            raise ConfigError(f"{source}: study.{key} must be a string")

    # ---- base train config: a file ([study] config, or base = "file.toml"), then [base.*] tables
    sections = _sections()
    base: dict = {}
    base_file = st.get("config")
    base_tables = data.get("base", {})
    if isinstance(base_tables, str):  # base = "path.toml": the shorthand without [base.*] tables
        if base_file:
            raise ConfigError(f"{source}: give the base config once, as [study] config = ... or base = ...")
        base_file, base_tables = base_tables, {}
    if base_file:
        path = Path(base_file)
        if not path.is_absolute():
            path = base_dir / path
        base = load_toml(path)
        for key in CONTROLLED:  # a train config names its method, seed, stages...: the study sets them
            sec, _, k = key.partition(".")
            if isinstance(base.get(sec), dict):
                base[sec].pop(k, None)
    if not isinstance(base_tables, dict):
        raise ConfigError(f"{source}: [base] must hold train config tables, e.g. [base.data]")
    for sec, vals in base_tables.items():
        if sec not in sections:
            raise ConfigError(f"{source}: unknown table [base.{sec}]; train config sections are "
                              + ", ".join(sections))
        if not isinstance(vals, dict):
            raise ConfigError(f"{source}: [base.{sec}] must be a table of key = value pairs")
    _merge(base, base_tables)
    _check_controlled(_flatten(base_tables), f"{source}: [base]")
    plugins = base.get("run", {}).get("plugins", [])
    if not isinstance(plugins, list):
        raise ConfigError(f"{source}: run.plugins must be a list of module names, e.g. [\"my_plugin\"]")
    registry.load_plugins(plugins)  # before the method names are checked: a plugin may add one
    methods_known = registry.method_names()
    apply_dict(Config(), copy.deepcopy(base), source=f"{source}: [base]")  # unknown keys, wrong types

    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{source}: no [methods.NAME] tables; add at least one, e.g. [methods.serial] "
                          f"(methods: {', '.join(methods_known)})")

    runs: list[RunSpec] = []
    for label, mt in methods.items():
        where = f"{source}: [methods.{label}]"
        if not isinstance(mt, dict):
            raise ConfigError(f"{where} must be a table")
        for key, v in mt.items():
            if key not in METHOD_KEYS and key not in sections:
                raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(METHOD_KEYS)}, "
                                  f"or a train config section ({', '.join(sections)}) for fixed overrides")
            if key in sections and not isinstance(v, dict):
                raise ConfigError(f"{where}: {key} must be a table, e.g. {key}.key = value")
        method = mt.get("method", label)
        if not isinstance(method, str) or method not in methods_known:
            raise ConfigError(f"{where}: unknown method {method!r}; choose one of {', '.join(methods_known)}"
                              + ("" if "method" in mt else " (or name the table freely and set method = ...)"))
        if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
            raise ConfigError(f"{where}: use letters, digits, '.', '_' and '-' in method table names")
        optional = mt.get("optional", False)
        if not isinstance(optional, bool):
            raise ConfigError(f"{where}: optional must be true or false")
        equal_time = mt.get("equal_time", "")
        if not isinstance(equal_time, str) or ("equal_time" in mt and not equal_time):
            raise ConfigError(f"{where}: equal_time names another method table, e.g. equal_time = \"penalty\"")
        rounding = mt.get("equal_time_round", "epoch")
        if rounding not in EQUAL_TIME_ROUND:
            raise ConfigError(f"{where}: equal_time_round = {rounding!r}; choose \"epoch\" (whole epochs that "
                              f"fit) or \"step\" (the steps that fit, the last epoch cut short)")
        if "equal_time_round" in mt and not equal_time:
            raise ConfigError(f"{where}: equal_time_round needs equal_time = \"LABEL\" in the same table")
        layout = registry.method(method).layout
        if layout == "single":
            ks = _int_list(mt.get("stages", [1]), f"{where} stages")
            if ks != [1]:
                raise ConfigError(f"{where}: --method {method} runs in one process; drop stages (or stages = [1])")
        elif layout == "stages":
            if "stages" not in mt:
                raise ConfigError(f"{where}: give the stage counts K, e.g. stages = [2, 4, 8]")
            ks = _int_list(mt["stages"], f"{where} stages", minimum=2)
        else:  # replicas (ddp): K = ranks
            if "stages" not in mt:
                raise ConfigError(f"{where}: give the process counts K (data-parallel ranks), e.g. stages = [2, 4, 8]")
            ks = _int_list(mt["stages"], f"{where} stages")
        mseeds = _int_list(mt["seeds"], f"{where} seeds", minimum=0) if "seeds" in mt else seeds

        fixed = {sec: mt[sec] for sec in sections if sec in mt}
        _check_controlled(_flatten(fixed), where)
        grid = mt.get("grid", {})
        if not isinstance(grid, dict):
            raise ConfigError(f"{where}: grid must be a table of setting = [values], e.g. grid.coupling.ds_factor = [1, 2]")
        flat_grid = _flatten(grid)
        _check_controlled(flat_grid, f"{where} grid")
        for key, values in flat_grid.items():
            sec = key.split(".", 1)[0]
            if "." not in key or sec not in sections:
                raise ConfigError(f"{where}: grid key {key!r} is not section.key of a train setting "
                                  f"(sections: {', '.join(sections)}), e.g. grid.coupling.ds_factor = [1, 2]")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid.{key} = {values!r} must be a non-empty list of values; "
                                  f"for one fixed value write {key} = {values!r} instead")
        keys = list(flat_grid)
        combos = list(itertools.product(*(flat_grid[k] for k in keys))) if keys else [()]

        for k in ks:
            for combo in combos:
                settings = dict(zip(keys, combo))
                for seed in mseeds:
                    layer = copy.deepcopy(base)
                    _merge(layer, fixed)
                    _merge(layer, _nest(settings))
                    _merge(layer, {"run": {"method": method, "seed": seed}})
                    if layout == "stages":
                        _merge(layer, {"dist": {"stages": k}})
                    elif layout == "replicas":
                        _merge(layer, {"dist": {"stages": 1}})
                    what = f"{where} (K = {k}" + (f", {settings_text(settings)}" if settings else "") + ")"
                    try:
                        cfg = build_config(layer, {}, source=what)
                    except ConfigError as exc:
                        msg = str(exc)
                        raise ConfigError(msg if msg.startswith(what) else f"{what}: {msg}") from None
                    world = k * cfg.dist.dp if layout == "stages" else k
                    cfg.dist.nproc = world
                    tags = [setting_tag(key, v) for key, v in settings.items()]
                    run_name = "-".join([label] + ([f"k{k}"] if layout != "single" else []) + tags
                                        + [f"s{seed}"])
                    runs.append(RunSpec(name=run_name, label=label, method=method, k=k, world=world, seed=seed,
                                        settings=settings, config=cfg.resolved(), optional=optional,
                                        equal_time=equal_time, equal_time_round=rounding))
    _link_equal_time(runs, methods, source)
    _dedupe_names(runs)
    return Study(name=study_name, source=source, description=st.get("description", ""), target_acc=target,
                 report_targets=report_targets, out=st.get("out", ""), runs=runs, text=text)


def parse_targets(value, where: str) -> list[float]:
    """Test accuracies as fractions in (0, 1]: a list, or text "0.90,0.92" (the --targets flag)."""
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{where} = {value!r}: give accuracies as fractions, e.g. 0.90,0.92") from None
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                          or not 0 < v <= 1 for v in value):
        raise ConfigError(f"{where} = {value!r}: give a list of test accuracies as fractions in (0, 1], "
                          "e.g. [0.90, 0.92]")
    return sorted({float(v) for v in value})


def _link_equal_time(runs: list[RunSpec], methods: dict, source: str) -> None:
    """Check every ``equal_time`` reference, pick each equal-time table's pace table, and move the
    equal-time runs to the end of the plan (they start once the runs they depend on are done)."""
    labels = {r.label: r for r in runs}
    for label, mt in methods.items():
        ref = mt.get("equal_time") if isinstance(mt, dict) else None
        if not ref:
            continue
        where = f"{source}: [methods.{label}]"
        if ref not in methods or ref not in labels:
            raise ConfigError(f"{where}: equal_time = {ref!r} names no method table of this study; "
                              f"tables: {', '.join(m for m in methods if m != label)}")
        if ref == label or methods[ref].get("equal_time"):
            raise ConfigError(f"{where}: equal_time = {ref!r} must name a full-length table, not an "
                              "equal-time one (or itself)")
        method = labels[label].method
        pace = next((r.label for r in runs if r.method == method and not r.equal_time), None)
        if pace is None:
            raise ConfigError(
                f"{where}: equal_time needs a full-length table of --method {method} in the study too "
                f"(its runs give the time per epoch), e.g. [methods.{method}]")
        for r in runs:
            if r.label == label:
                r.pace = pace
    runs.sort(key=lambda r: bool(r.equal_time))  # stable: plan order otherwise


def equal_time_deps(study: Study, spec: RunSpec) -> list[str]:
    """Names of the runs an equal-time run needs finished before it can start."""
    if not spec.equal_time:
        return []
    return [r.name for r in study.runs if r.label in (spec.equal_time, spec.pace)]


def _scale_schedule(config: dict, epochs: int, max_steps: int = 0, steps_per_epoch: int = 0) -> dict:
    """The same lr schedule shape over ``epochs`` instead of ``run.epochs`` (or over
    ``max_steps`` steps, the last of the ``epochs`` cut short): epoch-valued settings
    (milestones, step size, warm-up) scale with the run length; cosine needs nothing."""
    cfg = copy.deepcopy(config)
    length = max_steps / steps_per_epoch if max_steps else epochs
    f = length / cfg["run"]["epochs"]
    o = cfg["optim"]
    o["milestones"] = sorted({max(1, round(m * f)) for m in o["milestones"]})
    o["step_size"] = max(1, round(o["step_size"] * f))
    o["warmup_epochs"] = round(o["warmup_epochs"] * f)
    cfg["run"]["epochs"] = epochs
    cfg["run"]["max_steps"] = max_steps
    return cfg


def resolve_equal_time(study: Study, spec: RunSpec, study_dir: Path) -> tuple[dict, str]:
    """(config, explanation) of an equal-time run: as many epochs of its own method as fit into
    the training time of its reference runs (the same seed's when there is one, else their
    mean), at the time per epoch its pace table's full-length runs measured in this study.
    Rounded down, so the baseline never gets more time than the method it is compared with:
    to whole epochs, or with ``equal_time_round = "step"`` to whole steps (run.max_steps)."""
    def times(label: str, seed: int | None) -> list[tuple[float, int, int]]:
        out = []
        for r in study.runs:
            if r.label != label or (seed is not None and r.seed != seed):
                continue
            try:
                s = json.loads((study_dir / "runs" / r.name / "summary.json").read_text())
                out.append((float(s["train_time_s"]), int(s["epochs"]), int(s.get("steps") or 0)))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return out

    ref = times(spec.equal_time, spec.seed) or times(spec.equal_time, None)
    pace = times(spec.pace, None)
    if not ref or not pace:
        missing = spec.equal_time if not ref else spec.pace
        raise ConfigError(
            f"{spec.name}: equal_time needs finished runs of [methods.{missing}] (their training time "
            f"sets this run's epoch count); run them first (they are part of this study, or select "
            f"them with --only)")
    budget = sum(t for t, _, _ in ref) / len(ref)
    per_epoch = sum(t / e for t, e, _ in pace) / len(pace)
    full = spec.config["run"]["epochs"]
    if spec.equal_time_round == "step":
        pace = [p for p in pace if p[2] > 0]
        if not pace:
            raise ConfigError(f"{spec.name}: equal_time_round = \"step\" needs the step counts of the "
                              f"[methods.{spec.pace}] runs (summary.json \"steps\"); rerun them with this auxpar")
        spe = pace[0][2] // pace[0][1]  # steps per epoch of the pace runs (same data and batch)
        per_step = sum(t / n for t, _, n in pace) / len(pace)
        steps = max(1, min(full * spe, int(budget / per_step + 1e-9)))
        if steps < full * spe:
            epochs = -(-steps // spe)
            why = (f"equal time to [methods.{spec.equal_time}]: {budget:.1f}s of training at {per_step * 1e3:.1f}ms "
                   f"per step ([methods.{spec.pace}]) = {steps} steps = {steps / spe:.2f} of {full} epochs "
                   f"(run.max_steps = {steps})")
            return _scale_schedule(spec.config, epochs, steps, spe), why
        epochs = full
    else:
        epochs = max(1, min(full, int(budget / per_epoch + 1e-9)))
    why = (f"equal time to [methods.{spec.equal_time}]: {budget:.1f}s of training at {per_epoch:.2f}s per "
           f"epoch ([methods.{spec.pace}]) = {epochs} of {full} epochs")
    return _scale_schedule(spec.config, epochs), why


def _dedupe_names(runs: list[RunSpec]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            h = hashlib.sha1(json.dumps(r.settings, sort_keys=True).encode()).hexdigest()[:6]
            r.name = r.name.rsplit("-s", 1)[0] + f"-{h}-s{r.seed}"
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"the study lists the same run twice ({', '.join(dup)}); remove the duplicate "
                          "method table or grid value")


def load_study(path: str | Path) -> Study:
    from auxpar.config import load_toml

    p = Path(path)
    data = load_toml(p)
    return parse_study(data, source=str(p), base_dir=p.parent, text=p.read_text(encoding="utf-8"))


def quick_study() -> Study:
    return parse_study(copy.deepcopy(QUICK_STUDY), source="quick", text=study_to_toml(QUICK_STUDY))


def study_to_toml(data: dict) -> str:
    """A study mapping as TOML text (the embedded quick study is written to STUDY/study.toml)."""
    from auxpar.config import config_to_toml

    blocks = [config_to_toml({"study": data.get("study", {})})]
    for sec, vals in data.get("base", {}).items():
        blocks.append(config_to_toml({f"base.{sec}": vals}))
    for label, mt in data.get("methods", {}).items():
        flat = {k: v for k, v in mt.items() if not isinstance(v, dict)}
        blocks.append(config_to_toml({f"methods.{label}": flat}))
        for sec, vals in mt.items():
            if isinstance(vals, dict):  # grid or a config section: dotted keys inside the table
                blocks.append(config_to_toml({f"methods.{label}.{sec}": _flatten(vals)}))
    return "\n".join(b.strip() + "\n" for b in blocks)


def _write_text(text: str, path: Path) -> None:
    """Write a file atomically (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- run state


def run_state(spec: RunSpec, run_dir: Path) -> tuple[str, str]:
    """(state, detail): complete | changed | resume | new."""
    from auxpar.config import load_toml

    summary = run_dir / "summary.json"
    if summary.is_file():
        cfg_file = run_dir / "config.toml"
        if not cfg_file.is_file():
            return "changed", "summary.json without config.toml"
        try:
            stored = load_toml(cfg_file)
        except ConfigError as exc:
            return "changed", str(exc)
        diffs = config_differences(stored, spec.config, EQUAL_TIME_KEYS if spec.equal_time else ())
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            return "changed", "; ".join(diffs[:3]) + more
        return "complete", ""
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "resume", "checkpoints found"
    return "new", ""


def method_available(method: str) -> bool:
    return registry.method_available(method)


# --------------------------------------------------------------------------- commands

def train_args(spec: RunSpec, cfg_path: Path, run_dir: Path, state: str) -> list[str]:
    args = ["train", "--config", str(cfg_path), "--out", str(run_dir)]
    if state == "resume":
        args += ["--resume", "latest"]
    elif state in ("changed", "new") and run_dir.exists():
        args += ["--overwrite"]
    return args


def cluster_command(spec: RunSpec, cfg_path: Path, run_dir: Path, state: str) -> str:
    """The command a cluster user runs: torchrun for multi-process runs, python -m for one process."""
    args = train_args(spec, cfg_path, run_dir, state)
    if spec.world > 1:
        head = ["torchrun", "--standalone", f"--nproc_per_node={spec.world}", "-m", "auxpar"]
    else:
        head = ["python", "-m", "auxpar"]
    return shlex.join(head + args)


def write_run_config(study: Study, spec: RunSpec, study_dir: Path, config: dict | None = None,
                     note: str = "") -> Path:
    """Write STUDY/configs/NAME.toml (only when its text changes); returns the path."""
    from auxpar.config import config_to_toml

    cfg = copy.deepcopy(config if config is not None else spec.config)
    cfg["run"]["out"] = str(study_dir / "runs" / spec.name)
    if spec.equal_time and not note:
        note = (f"equal time to [methods.{spec.equal_time}]: run.epochs (and the lr schedule's epoch "
                "settings) are set when the run starts")
    header = (f"# Study {study.name}, run {spec.name}: {spec.method}, K = {spec.k}, seed {spec.seed}"
              + (f", {settings_text(spec.settings)}" if spec.settings else "")
              + (f"\n# {note}" if note else "")
              + f"\n# Written by auxpar study from {study.source}; edit the study, not this file.\n")
    path = study_dir / "configs" / f"{spec.name}.toml"
    text = header + config_to_toml(cfg)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        _write_text(text, path)
    return path


def write_configs(study: Study, study_dir: Path) -> None:
    for spec in study.runs:
        write_run_config(study, spec, study_dir)
    _write_text(json.dumps(study.plan(), indent=2) + "\n", study_dir / "study.json")
    if study.text:
        _write_text(study.text, study_dir / "study.toml")


# --------------------------------------------------------------------------- execution

@dataclass
class Outcome:
    name: str
    status: str
    """complete (skipped), done, failed, changed (conflict), unavailable, not-selected (--only)."""
    seconds: float = 0.0
    detail: str = ""


def _child_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env


_EPOCH_RE = re.compile(r"epoch\s+(\d+)/(\d+)")


class _Runner:
    def __init__(self, study: Study, study_dir: Path, bar, jobs: int):
        self.study, self.dir, self.bar, self.jobs = study, study_dir, bar, jobs
        self.lock = threading.Lock()
        self.live: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def _postfix(self) -> None:
        if self.bar is not None:
            text = " | ".join(f"{n} {e}".strip() for n, e in self.live.items())
            self.bar.set_postfix_str(text[:120], refresh=True)

    def say(self, msg: str) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

    def run_one(self, spec: RunSpec, state: str, devices: list[str] | None = None) -> Outcome:
        if self.stopping:
            return Outcome(spec.name, "failed", detail="interrupted before it started")
        run_dir = self.dir / "runs" / spec.name
        cfg_path = self.dir / "configs" / f"{spec.name}.toml"
        log_path = self.dir / "logs" / f"{spec.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.equal_time:
            try:
                config, why = resolve_equal_time(self.study, spec, self.dir)
            except ConfigError as exc:
                log_path.write_text(f"{exc}\n", encoding="utf-8")
                return Outcome(spec.name, "failed", detail=f"not started\n{exc}")
            write_run_config(self.study, spec, self.dir, config, note=why)
            self.say(f"{spec.name}: {why}")
        cmd = [sys.executable, "-m", "auxpar", *train_args(spec, cfg_path, run_dir, state), "--progress", "off"]
        with self.lock:
            self.live[spec.name] = "starting"
            self._postfix()
        tail: deque[str] = deque(maxlen=25)
        t0 = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            env = _child_env()
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
                log.write(f"# CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, env=env, start_new_session=True)
            with self.lock:
                self.procs[spec.name] = proc
                if self.stopping:  # stop_all ran while this run was starting
                    os.killpg(proc.pid, signal.SIGTERM)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
                m = _EPOCH_RE.search(line)
                if m:
                    with self.lock:
                        self.live[spec.name] = f"epoch {m.group(1)}/{m.group(2)}"
                        self._postfix()
            code = proc.wait()
        secs = time.perf_counter() - t0
        with self.lock:
            self.procs.pop(spec.name, None)
            self.live.pop(spec.name, None)
            self._postfix()
            if self.bar is not None:
                self.bar.update(1)
        if code == 0 and (run_dir / "summary.json").is_file():
            return Outcome(spec.name, "done", secs)
        why = f"exit code {code}" if code != 0 else "exited 0 but wrote no summary.json"
        return Outcome(spec.name, "failed", secs, why + "\n" + "\n".join(tail))

    def stop_all(self) -> None:
        self.stopping = True
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:  # each run is its own session: stop its launcher and ranks together
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def plan_states(study: Study, study_dir: Path, rerun_changed: bool) -> list[tuple[RunSpec, str, str]]:
    out = []
    avail: dict[str, bool] = {}
    for spec in study.runs:
        state, detail = run_state(spec, study_dir / "runs" / spec.name)
        if state != "complete" and spec.optional:
            if spec.method not in avail:
                avail[spec.method] = method_available(spec.method)
            if not avail[spec.method]:
                state, detail = "unavailable", f"--method {spec.method} is not in this build (optional)"
        if state == "changed" and rerun_changed:
            detail = "config changed, rerunning: " + detail
        out.append((spec, state, detail))
    return out


def select(study: Study, only: list[str] | None) -> set[str]:
    """Names of the runs matched by ``--only`` patterns (shell globs on run names); all if none."""
    import fnmatch

    if not only:
        return {r.name for r in study.runs}
    names = {r.name for r in study.runs if any(fnmatch.fnmatchcase(r.name, pat) for pat in only)}
    if not names:
        raise ConfigError(f"--only {' '.join(only)} matches no run of study {study.name}; run names look like "
                          + ", ".join(r.name for r in study.runs[:3]) + " (see --dry-run)")
    return names


def parse_gpus(text: str | None) -> list[str] | None:
    """``--gpus 8`` (GPUs 0..7) or ``--gpus 0,1,4,5`` -> device ids; None when not given."""
    if text is None:
        return None
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        n = int(t)
        if n < 1:
            raise ConfigError("--gpus 0: give the number of GPUs (e.g. --gpus 8) or their ids (e.g. --gpus 0,1,2,3)")
        return [str(i) for i in range(n)]
    ids = [x.strip() for x in t.split(",") if x.strip()]
    if not ids or any(not re.fullmatch(r"\d+", x) for x in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {text!r}: give a count (--gpus 8) or distinct ids (--gpus 0,1,2,3)")
    return ids


def execute(study: Study, study_dir: Path, jobs: int | None = None, rerun_changed: bool = False,
            progress: bool = True, only: set[str] | None = None, gpus: list[str] | None = None) -> list[Outcome]:
    """Run every unfinished run of the study; returns one outcome per run (plan order).

    ``jobs`` runs go at a time (default 1; with ``gpus``, as many as the GPUs hold). With
    ``gpus``, each run gets ``world`` GPUs of its own through CUDA_VISIBLE_DEVICES and a run
    starts when enough are free (first fit in plan order).
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    from tqdm import tqdm

    states = plan_states(study, study_dir, rerun_changed)
    outcomes: dict[str, Outcome] = {}
    todo: list[tuple[RunSpec, str]] = []
    for spec, state, detail in states:
        if only is not None and spec.name not in only:
            if state == "complete":
                outcomes[spec.name] = Outcome(spec.name, "complete", detail="skipped: already complete")
            else:
                outcomes[spec.name] = Outcome(spec.name, "not-selected", detail="not selected by --only")
        elif state == "complete":
            outcomes[spec.name] = Outcome(spec.name, "complete", detail="skipped: already complete")
        elif state == "unavailable":
            outcomes[spec.name] = Outcome(spec.name, "unavailable", detail=detail)
        elif state == "changed" and not rerun_changed:
            outcomes[spec.name] = Outcome(
                spec.name, "changed",
                detail=f"{study_dir / 'runs' / spec.name} holds a finished run with a different config "
                       f"({detail}); delete that directory or pass --rerun-changed to replace it")
        else:
            todo.append((spec, state))
    if jobs is None:
        jobs = len(gpus) if gpus else 1
    bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="run", file=sys.stderr,
               dynamic_ncols=True, disable=not progress or not sys.stderr.isatty()) if todo else None
    runner = _Runner(study, study_dir, bar, jobs)
    for spec, _state, detail in states:
        o = outcomes.get(spec.name)
        if o is None or o.status == "not-selected":
            continue
        if o.status == "complete":
            runner.say(f"skipped {spec.name}: already complete")
        elif o.status == "unavailable":
            runner.say(f"not run {spec.name}: {detail}")
        else:
            runner.say(f"conflict {spec.name}: {o.detail}")
    if todo:
        where = f"GPUs {','.join(gpus)}" if gpus else f"{jobs} at a time"
        runner.say(f"running {len(todo)} of {len(study.runs)} runs in {study_dir} ({where}; "
                   f"logs in {study_dir / 'logs'})")
    started = [0]

    def work(item: tuple[RunSpec, str], devices: list[str] | None) -> Outcome:
        spec, state = item
        with runner.lock:
            started[0] += 1
            idx = started[0]
        verb = {"resume": "resuming", "changed": "rerunning"}.get(state, "starting")
        on = f" on GPU {','.join(devices)}" if devices else ""
        runner.say(f"[{idx}/{len(todo)}] {verb} {spec.name}{on}")
        o = runner.run_one(spec, state, devices)
        if o.status == "done":
            acc = _final_acc(study_dir / "runs" / spec.name)
            runner.say(f"[{idx}/{len(todo)}] done {spec.name} in {o.seconds:.1f}s{acc}")
        elif runner.stopping:
            runner.say(f"[{idx}/{len(todo)}] stopped {spec.name}")
        else:
            lines = o.detail.splitlines() or [""]
            runner.say(f"[{idx}/{len(todo)}] FAILED {spec.name} ({lines[0]}); last lines of "
                       f"{study_dir / 'logs' / (spec.name + '.log')}:\n" + "\n".join("    " + ln for ln in lines[1:]))
        return o

    pending = list(todo)
    free = list(gpus) if gpus else []
    if gpus:
        for item in list(pending):
            if item[0].world > len(gpus):
                pending.remove(item)
                outcomes[item[0].name] = o = Outcome(
                    item[0].name, "failed",
                    detail=f"needs {item[0].world} GPUs, --gpus gives {len(gpus)}")
                runner.say(f"FAILED {item[0].name}: {o.detail}")
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        running: dict = {}
        while pending or running:
            busy = {it[0].name for it in pending} | {name for name, _ in running.values()}
            for item in list(pending):
                if len(running) >= jobs:
                    break
                if any(dep in busy for dep in equal_time_deps(study, item[0])):
                    continue  # an equal-time run starts once the runs that set its length are done
                devices = None
                if gpus:
                    if item[0].world > len(free):
                        continue
                    devices, free = free[:item[0].world], free[item[0].world:]
                pending.remove(item)
                running[pool.submit(work, item, devices)] = (item[0].name, devices)
            if not running:  # cannot happen with a valid plan; never spin
                for item in pending:
                    outcomes[item[0].name] = Outcome(item[0].name, "failed", detail="could not be scheduled")
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                _name, devices = running.pop(fut)
                if devices:
                    free = sorted(free + devices, key=lambda d: gpus.index(d))
                o = fut.result()
                outcomes[o.name] = o
    except BaseException:
        runner.stop_all()  # the runs are in sessions of their own: Ctrl-C reaches only us
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        raise
    pool.shutdown(wait=True)
    if bar is not None:
        bar.close()
    return [outcomes[s.name] for s in study.runs]


def _final_acc(run_dir: Path) -> str:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        return f", final test {100 * s['final_test_acc']:.2f}%, train time {s['train_time_s']:.1f}s"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# --------------------------------------------------------------------------- CLI

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="run a grid of runs (methods x K x settings x seeds) and write a report",
        description="Run a study: every run of the grid in its own process group, skipping runs "
                    "already complete, then write results.csv, report.md and plots. Without --config "
                    "runs the embedded quick study (digits, serial/penalty/AL/MGRIT at K = 2, about 2 "
                    "minutes on a 2-core CPU). Format: experiments/studies/README.md.")
    p.add_argument("--config", metavar="STUDY.toml", help="study file (default: the embedded quick study)")
    p.add_argument("--out", metavar="DIR", help="study directory (default: study.out, or studies/NAME)")
    p.add_argument("--print-commands", action="store_true",
                   help="write the run configs and print a command per unfinished run (torchrun for "
                        "multi-process runs) instead of running them; also written to DIR/commands.sh")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; write nothing")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="runs at a time (default 1, or as many as --gpus holds; each run already uses K processes)")
    p.add_argument("--gpus", metavar="N|ID,ID,...",
                   help="GPUs of this node to share among runs: each run gets its own K GPUs "
                        "(CUDA_VISIBLE_DEVICES) and runs start as GPUs free up")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="run (or print) only the runs whose name matches, e.g. 'penalty-k4-*' (repeatable); "
                        "the report still covers the whole study")
    p.add_argument("--rerun-changed", action="store_true",
                   help="rerun finished runs whose config differs from the study (replaces them)")
    p.add_argument("--report-only", metavar="DIR", help="only regenerate the report of an existing study directory")
    p.add_argument("--targets", metavar="ACC,ACC", default="",
                   help="more test accuracies for the report's time-to-accuracy table, e.g. 0.90,0.92 "
                        "(with study.report_targets and study.target_acc)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")
    p.set_defaults(func=run)


def resolve_dir(study: Study, out: str | None) -> Path:
    if out:
        return Path(out)
    if study.out:
        return Path(study.out)
    return Path(DEFAULT_OUT_ROOT) / study.name


def run(args: argparse.Namespace) -> int:
    from auxpar import report

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("auxpar study starts its own runs (one process group each); run it without "
                          "torchrun, or use --print-commands to get torchrun commands for the runs")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 or more")
    gpus = parse_gpus(args.gpus)
    extra = parse_targets(args.targets or "", "--targets")
    if args.report_only:
        if args.config or args.print_commands or args.dry_run:
            raise ConfigError("--report-only reads an existing study directory; drop --config, "
                              "--print-commands and --dry-run")
        d = Path(args.report_only)
        if not (d / "study.json").is_file():
            raise ConfigError(f"{d} is not a study directory (no study.json); give the directory an "
                              "earlier `auxpar study` wrote, e.g. studies/quick")
        res = report.write_report(d, targets=extra)
        print(res["table"])
        print(f"\nwrote {d / 'report.md'}, {d / 'results.csv'} and {len(res['plots'])} plot(s) in {d / 'plots'}")
        return 0

    study = load_study(args.config) if args.config else quick_study()
    study_dir = resolve_dir(study, args.out)
    only = select(study, args.only) if args.only else None

    if args.dry_run:
        states = plan_states(study, study_dir, args.rerun_changed)
        counts: dict[str, int] = {}
        print(f"study {study.name}: {len(study.runs)} runs in {study_dir}")
        for spec, state, detail in states:
            if only is not None and spec.name not in only:
                state, detail = "not-selected", ""
            counts[state] = counts.get(state, 0) + 1
            extra = f"  ({detail})" if detail else ""
            print(f"  {state:<11} {spec.name}  [{spec.method}, K={spec.k}, {spec.world} proc]{extra}")
        print("  " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0

    write_configs(study, study_dir)

    if args.print_commands:
        lines = [f"# study {study.name}: {len(study.runs)} runs; run these from {Path.cwd()}",
                 "# (each line is one run; runs are independent and may go to different nodes)"]
        for spec, state, detail in plan_states(study, study_dir, args.rerun_changed):
            if only is not None and spec.name not in only:
                continue
            if state == "complete":
                lines.append(f"# complete: {spec.name}")
            elif state == "unavailable":
                lines.append(f"# not available in this build: {spec.name}")
            elif state == "changed" and not args.rerun_changed:
                lines.append(f"# conflict (finished with another config, see --rerun-changed): {spec.name}")
            else:
                if spec.equal_time:
                    try:
                        config, why = resolve_equal_time(study, spec, study_dir)
                    except ConfigError:
                        lines.append(f"# after the runs of [methods.{spec.equal_time}] and [methods.{spec.pace}] "
                                     f"finish, print the commands again to get {spec.name} (equal time)")
                        continue
                    write_run_config(study, spec, study_dir, config, note=why)
                # --resume latest on every line: submitting a line again continues that run
                # from its latest checkpoint (and starts it fresh when it has none)
                lines.append(cluster_command(spec, study_dir / "configs" / f"{spec.name}.toml",
                                             study_dir / "runs" / spec.name,
                                             "changed" if state == "changed" else "resume"))
        lines.append(f"# then: auxpar study --report-only {shlex.quote(str(study_dir))}")
        text = "\n".join(lines) + "\n"
        _write_text(text, study_dir / "commands.sh")
        print(text, end="")
        return 0

    t0 = time.perf_counter()
    outcomes = execute(study, study_dir, jobs=args.jobs, rerun_changed=args.rerun_changed,
                       progress=not args.no_progress, only=only, gpus=gpus)
    res = report.write_report(study_dir, targets=extra)
    elapsed = time.perf_counter() - t0
    print(res["table"])
    bad = [o for o in outcomes if o.status in ("failed", "changed")]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"\nstudy {study.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" in {elapsed:.0f}s; wrote {study_dir / 'report.md'}, {study_dir / 'results.csv'} and "
          f"{len(res['plots'])} plot(s) in {study_dir / 'plots'}")
    for o in bad:
        first = o.detail.splitlines()[0] if o.detail else ""
        print(f"  {o.status}: {o.name}: {first}", file=sys.stderr)
    return 1 if bad else 0
