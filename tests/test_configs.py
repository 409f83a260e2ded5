"""The shipped experiment configs (experiments/configs/*.toml): they load, they partition, DS is legal."""

from __future__ import annotations

from pathlib import Path

import pytest

from auxpar.config import build_config, load_toml
from auxpar.errors import ConfigError
from auxpar.plan import make_plan

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
FILES = sorted(CONFIG_DIR.glob("*.toml"))

COMBOS = [("resnet56", "cifar10"), ("resnet110", "cifar10"), ("wrn-28-10", "cifar100"), ("resnet20", "digits")]


def _expected() -> dict[str, tuple]:
    """File stem -> (method, model, dataset, stages, ds_factor) of every config that must ship."""
    out = {f"serial-{m}-{d}": ("serial", m, d, 1, 1) for m, d in COMBOS}
    for method in ("penalty", "al"):
        for m, d in COMBOS:
            for k in (2, 4, 8):
                for s in (1, 2):
                    out[f"{method}-{m}-{d}-k{k}" + ("-ds2" if s == 2 else "")] = (method, m, d, k, s)
    return out


EXPECTED = _expected()


def _load(path: Path):
    return build_config(load_toml(path), source=str(path))


def test_expected_files_present():
    names = {p.stem for p in FILES}
    missing = sorted(set(EXPECTED) - names)
    assert not missing, f"missing configs: {missing}"
    # A file in the serial/penalty/al naming scheme but not in the list is misnamed.
    stray = sorted(n for n in names - set(EXPECTED) if n.split("-")[0] in ("serial", "penalty", "al"))
    assert not stray, f"configs outside the expected set (misnamed?): {stray}"
    assert len(EXPECTED) == 52


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_config_loads(path):
    cfg = _load(path)
    if path.stem in EXPECTED:
        method, model, dataset, stages, ds = EXPECTED[path.stem]
        assert (cfg.run.method, cfg.model.name, cfg.data.dataset) == (method, model, dataset)
        assert (cfg.dist.stages, cfg.coupling.ds_factor) == (stages, ds)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_layer_parallel_config_partitions(path):
    cfg = _load(path)
    if cfg.dist.stages == 1:
        pytest.skip("single stage: nothing to partition")
    if cfg.run.method in ("penalty", "al"):
        assert cfg.dist.nproc == cfg.dist.stages
    plan = make_plan(cfg.model.name, cfg.data, cfg.dist.stages, cfg.dist.split or None, cfg.model.dropout)
    rows = plan["stage_rows"]
    assert len(rows) == cfg.dist.stages
    s = cfg.coupling.ds_factor
    for r in rows[:-1]:
        _, h, w = r["out_shape"]
        assert h % s == 0 and w % s == 0, f"boundary {r['out_shape']} of stage {r['index']} not divisible by ds_factor {s}"


@pytest.mark.parametrize("stem", [n for n in EXPECTED if not n.startswith("serial")])
def test_layer_parallel_recipe_matches_serial(stem):
    # [data] and [optim] are the serial baseline's, so the comparison isolates the method.
    cfg = _load(CONFIG_DIR / f"{stem}.toml")
    _, model, dataset, _, _ = EXPECTED[stem]
    ref = _load(CONFIG_DIR / f"serial-{model}-{dataset}.toml")
    assert cfg.data == ref.data and cfg.optim == ref.optim
    assert (cfg.run.epochs, cfg.run.seed, cfg.model) == (ref.run.epochs, ref.run.seed, ref.model)


def test_unknown_coupling_key_rejected():
    with pytest.raises(ConfigError, match="coupling.rhoo"):
        build_config({"coupling": {"rhoo": 1.0}})
