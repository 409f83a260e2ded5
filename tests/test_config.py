"""Config loading, precedence, validation messages, and the config.toml round trip."""

from __future__ import annotations

import pytest

from auxpar.config import Config, build_config, config_to_toml, load_toml, parse_value
from auxpar.errors import ConfigError


def test_defaults_validate():
    cfg = build_config()
    assert cfg.run.method == "serial" and cfg.data.dataset == "digits"


def test_dataset_recipe_defaults_and_precedence(tmp_path):
    # cifar recipe: WRN schedule; a TOML value beats the recipe; a flag beats the TOML file.
    cfg = build_config({"data": {"dataset": "cifar100"}})
    assert (cfg.optim.lr, cfg.optim.lr_schedule, cfg.optim.milestones, cfg.optim.gamma) == (0.1, "multistep", [60, 120, 160], 0.2)
    assert (cfg.run.epochs, cfg.data.batch_size, cfg.optim.weight_decay, cfg.optim.nesterov) == (200, 128, 5e-4, True)
    cfg = build_config({"data": {"dataset": "cifar10"}, "optim": {"lr": 0.2}}, {"optim": {"lr": 0.3}})
    assert cfg.optim.lr == 0.3
    cfg = build_config({"data": {"dataset": "cifar10"}, "optim": {"lr": 0.2}})
    assert cfg.optim.lr == 0.2


@pytest.mark.parametrize("data, words", [
    ({"optim": {"lrr": 0.1}}, ["optim.lrr", "valid keys"]),
    ({"optimizer": {"lr": 0.1}}, ["[optimizer]", "valid sections"]),
    ({"optim": {"lr": "fast"}}, ["optim.lr", "expected a number"]),
    ({"run": {"epochs": 2.5}}, ["run.epochs", "whole number"]),
    ({"optim": {"nesterov": 1}}, ["optim.nesterov", "true or false"]),
    ({"run": {"method": "magic"}}, ["run.method", "serial"]),
    ({"optim": {"lr": -1.0}}, ["optim.lr", "> 0"]),
    ({"data": {"dataset": "imagenet"}}, ["data.dataset", "cifar10"]),
    ({"optim": {"momentum": 0.0}}, ["nesterov", "momentum"]),
    ({"dist": {"stages": 2, "split": [3, 3, 3]}}, ["dist.split", "3 entries"]),
    ({"optim": {"milestones": [120, 60]}}, ["milestones", "increasing"]),
    ({"data": {"synthetic_shape": [3, 32]}}, ["synthetic_shape", "[C, H, W]"]),
])
def test_bad_config_is_named(data, words):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    for w in words:
        assert w in str(err.value)


def test_toml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nmethod = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config({"data": {"dataset": "cifar10"}}, {"optim": {"lr": 0.07}, "dist": {"split": []}})
    p = tmp_path / "config.toml"
    p.write_text(config_to_toml(cfg.resolved()))
    again = build_config(load_toml(p))
    assert again == cfg
    assert again != Config()  # the round trip carries real, non-default values


def test_parse_value_uses_toml_syntax():
    assert parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("cosine") == "cosine"


@pytest.mark.parametrize("section, old, new", [("optim", "schedule", "optim.lr_schedule"),
                                               ("coupling", "schedule", "coupling.phases"),
                                               ("mgrit", "schedule", "mgrit.phases")])
def test_renamed_keys_name_the_new_key(section, old, new):
    with pytest.raises(ConfigError, match=f"{section}.{old} was renamed {new}"):
        build_config({section: {old: "cosine"}})
    sec, key = new.split(".")
    if sec == "optim":
        assert build_config({sec: {key: "step"}}).optim.lr_schedule == "step"
    else:
        assert getattr(getattr(build_config({sec: {key: "parallel:3,serial:1"}}), sec), key) == "parallel:3,serial:1"


def test_renamed_flag_names_the_new_flag():
    from conftest import run_cli

    res = run_cli("train", "--schedule", "parallel", timeout=60)
    assert res.returncode == 2 and "--schedule was renamed --phases" in res.stderr
    assert "Traceback" not in res.stderr
