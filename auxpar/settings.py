"""Dotted run settings shared by ``auxpar study`` (planning) and its report: flattening, the
readable tags of run names, their text form, and the comparison of a finished run's config
with the plan. A module of its own so that the report does not import the study runner."""

from __future__ import annotations

import re
from typing import Any


EQUAL_TIME_KEYS = ("run.epochs", "run.max_steps", "optim.milestones", "optim.step_size", "optim.warmup_epochs")
"""What ``equal_time`` derives when the run starts (so a finished equal-time run matches its plan
whatever epoch count its references gave it)."""


IGNORED_IN_MATCH = {
    "run.out", "run.progress", "run.resume", "run.checkpoint_every", "run.keep",
    "dist.nproc", "dist.timeout_s", "data.data_dir", "data.download",
}
"""Keys that do not change what a run computes: a finished run whose config differs from the
plan only in these is still complete."""


SLUG_ALIASES = {
    "coupling.ds_factor": "ds", "coupling.phases": "", "mgrit.phases": "", "coupling.rho": "rho",
    "coupling.rho_growth": "rhog", "coupling.aux_dtype": "", "coupling.aux_update": "",
    "coupling.serial_executor": "exec-", "coupling.mu_damping": "mud",
    "dist.microbatches": "mb", "dist.pipeline_schedule": "", "dist.dp": "dp", "dist.balance": "bal-",
    "mgrit.levels": "L", "mgrit.cfactor": "cf", "mgrit.fwd_iters": "fwd", "mgrit.bwd_iters": "bwd",
    "mgrit.relax": "", "optim.lr": "lr", "data.batch_size": "bs", "run.epochs": "ep",
}
"""Short run-name tags for common grid keys (others use the key's last part)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _slug_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return "x".join(_slug_value(x) for x in v)
    if isinstance(v, float):
        text = f"{v:g}"
    else:
        text = str(v)
    text = text.replace(":", "").replace(",", "-").replace(" ", "")
    return re.sub(r"[^A-Za-z0-9.+_-]", "", text)


def setting_tag(key: str, value: Any) -> str:
    """Readable run-name tag of one grid value: ds2, sph-p8s2, nosph, mb8, 1f1b, lr0.1..."""
    if key == "coupling.phases" and isinstance(value, str):
        from auxpar.phases import parse_phases

        phases = parse_phases(value)
        if all(name == "parallel" for name, _ in phases):
            return "nosph"
        return "sph-" + "".join(f"{name[0]}{n}" for name, n in phases)
    if isinstance(value, bool):
        short = SLUG_ALIASES.get(key) or key.rsplit(".", 1)[-1]
        return short if value else f"no-{short}"
    prefix = SLUG_ALIASES.get(key, key.rsplit(".", 1)[-1].replace("_", "-") + "-")
    return prefix + _slug_value(value)


def settings_text(settings: dict) -> str:
    """Human-readable settings of a run for tables: ``ds_factor=2 phases=parallel:8,serial:2``."""
    parts = []
    for key, v in settings.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, list):
            v = ",".join(str(x) for x in v)
        parts.append(f"{key.rsplit('.', 1)[-1]}={v}")
    return " ".join(parts)


def config_differences(stored: dict, planned: dict, ignore: tuple = ()) -> list[str]:
    """Keys (section.key: stored -> planned) on which a finished run differs from the plan.

    Keys present on one side only (a newer or older auxpar) and keys that do not change what
    is computed (:data:`IGNORED_IN_MATCH`) are not compared. An empty planned ``dist.split``
    (cut automatically) matches the cut the run recorded.
    """
    a, b = _flatten(stored), _flatten(planned)
    diffs = []
    for key in sorted(set(a) & set(b)):
        if key in IGNORED_IN_MATCH or key in ignore:
            continue
        va, vb = a[key], b[key]
        if key == "dist.split" and vb == []:
            continue  # an empty split means "cut automatically"; the run records the cut it used
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            if float(va) == float(vb):
                continue
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs
