"""One registry for methods and one for datasets (auxpar.registry).

A toy method and a toy dataset are registered by a plugin module that this test writes (the
package is not edited), then run through `auxpar train` (one process, and K = 2 ranks that
each load the plugin), `auxpar plan` and `auxpar study`. The negative cases check that an
unknown name is one clear error everywhere, and that a bad registration is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from auxpar import registry
from auxpar.errors import ConfigError
from conftest import ROOT, cli_env, read_summary

PLUGIN = textwrap.dedent('''
    """A toy method and a toy dataset, registered from outside the package."""
    import torch

    from auxpar.coupling.serial import SerialMethod
    from auxpar.data import ImageDataset
    from auxpar.registry import register_dataset, register_method


    class ToyMethod(SerialMethod):
        """Serial backprop that reports one metric of its own per epoch."""

        name = "toy"

        def epoch_metrics(self):
            return {"toy_metric": 42.0}


    def load_toy(split, seed=0, **_):
        """3 classes of 8x8 images, told apart by brightness: learnable in two epochs."""
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 96 if split == "train" else 48
        labels = torch.arange(n) % 3
        noise = torch.randint(0, 40, (n, 1, 8, 8), generator=g)
        images = (labels.view(n, 1, 1, 1) * 90 + noise).to(torch.uint8)
        return ImageDataset("toy-data", images, labels, 3, (0.4,), (0.3,), split=split)


    register_method("toy", "toy_plugin:ToyMethod", layout="single", epoch_keys=("toy_metric",),
                    description="serial backprop with a metric of its own")
    register_dataset("toy-data", "toy_plugin:load_toy", geometry=(1, 8, 3, 96, 48),
                     recipe={"run": {"epochs": 2}, "data": {"batch_size": 32}},
                     augment={"crop_pad": 1, "pad_mode": "zero", "flip": False})
''')


@pytest.fixture()
def plugin_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "toy_plugin.py").write_text(PLUGIN)
    return d


def run(args, plugin_dir, timeout=180, cwd=None):
    env = cli_env()
    env["PYTHONPATH"] = str(plugin_dir) + os.pathsep + env["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "auxpar", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


def test_builtins_are_registered_once_with_what_readers_need():
    assert registry.method_names() == ("serial", "ddp", "pipeline", "penalty", "al", "mgrit")
    assert set(registry.dataset_names()) == {"cifar10", "cifar100", "digits", "synthetic", "fashion-mnist"}
    assert registry.methods_with_layout("stages") == ("pipeline", "penalty", "al", "mgrit")
    assert registry.method("mgrit").precisions == ("fp32", "bf16")
    from auxpar.coupling import get_method
    from auxpar.coupling.layer_parallel import PenaltyMethod

    assert get_method("penalty") is PenaltyMethod
    assert registry.dataset("digits").recipe["run"]["epochs"] == 15
    assert registry.dataset("digits").geometry == (1, 8, 10, 1437, 360)


def test_bad_names_and_registrations_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown method 'sgd'; choose one of serial, ddp"):
        registry.method("sgd")
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet': valid names are cifar10"):
        registry.dataset("imagenet")
    with pytest.raises(ConfigError, match="layout 'mesh' is not one of single, replicas, stages"):
        registry.register_method("x", "m:C", layout="mesh")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_method("penalty", "elsewhere:Penalty", layout="stages")
    with pytest.raises(ConfigError, match="built in"):
        registry.unregister("serial")
    with pytest.raises(ConfigError, match="plugin 'no_such_plugin' cannot be imported"):
        registry.load_plugins(["no_such_plugin"])
    registry.register_method("broken-toy", "auxpar.no_such_module:Nope", layout="single")
    try:
        from auxpar.coupling import get_method

        with pytest.raises(ConfigError, match="cannot load auxpar.no_such_module:Nope"):
            get_method("broken-toy")
        assert not registry.method_available("broken-toy")
        with pytest.raises(ConfigError, match="not a subclass"):
            registry.register_method("not-a-method", "auxpar.config:Config", layout="single")
            get_method("not-a-method")
    finally:
        registry.unregister("broken-toy")
        registry.unregister("not-a-method")
    assert "broken-toy" not in registry.method_names()


def test_in_process_registration_reaches_config_metrics_and_perf_model(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    from auxpar.config import build_config
    from auxpar.metrics import epoch_keys

    try:
        cfg = build_config({"run": {"plugins": ["toy_plugin"], "method": "toy"}, "data": {"dataset": "toy-data"}})
        assert cfg.run.epochs == 2 and cfg.data.batch_size == 32  # the dataset's recipe
        assert "toy_metric" in epoch_keys()
        from auxpar.perfmodel import predict

        from test_perfmodel import _toy_profile
        from auxpar.perfmodel import Scenario

        row = predict(_toy_profile(), "toy", 1, Scenario(batch_size=8))
        assert row["epoch_s"] is None and "no performance model for --method toy" in row["note"]
    finally:
        registry.unregister("toy")
        registry.unregister("toy-data")
        registry._plugins_loaded.discard("toy_plugin")
        sys.modules.pop("toy_plugin", None)
    assert "toy_metric" not in epoch_keys()


@pytest.mark.slow
def test_toy_method_and_dataset_through_train_plan_and_study(plugin_dir, tmp_path):
    # 1. without the plugin both names are unknown: one clear line, exit 2
    res = run(["train", "--method", "toy", "--out", str(tmp_path / "x")], plugin_dir, timeout=60)
    assert res.returncode == 2 and "run.method = 'toy' is not a known method" in res.stderr
    assert "Traceback" not in res.stderr
    res = run(["train", "--dataset", "toy-data"], plugin_dir, timeout=60)
    assert res.returncode == 2 and "toy-data" in res.stderr and "Traceback" not in res.stderr

    # 2. auxpar train --plugin: the toy method on the toy dataset, with its own metric
    out = tmp_path / "toy"
    res = run(["train", "--plugin", "toy_plugin", "--method", "toy", "--dataset", "toy-data", "--out", str(out),
               "--threads", "1"], plugin_dir)
    assert res.returncode == 0, res.stderr
    s = read_summary(out)
    assert s["method"] == "toy" and s["dataset"] == "toy-data" and s["epochs"] == 2
    assert s["final_test_acc"] > 0.6  # brightness classes: far above chance (1/3)
    epochs = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"epoch"' in ln]
    assert [e["toy_metric"] for e in epochs] == [42.0, 42.0] and all(e["beta"] is None for e in epochs)
    assert 'plugins = ["toy_plugin"]' in (out / "config.toml").read_text()
    # the run directory's config reproduces the run, plugin included
    res = run(["train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--threads", "1"],
              plugin_dir)
    assert res.returncode == 0, res.stderr
    assert read_summary(tmp_path / "again")["final_test_acc"] == s["final_test_acc"]

    # 3. a built-in layer-parallel method on the plugin's dataset: every rank loads the plugin
    res = run(["train", "--plugin", "toy_plugin", "--method", "penalty", "--stages", "2", "--dataset", "toy-data",
               "--model", "resnet8", "--out", str(tmp_path / "pen")], plugin_dir)
    assert res.returncode == 0, res.stderr
    assert read_summary(tmp_path / "pen")["world_size"] == 2

    # 4. auxpar plan knows the plugin dataset's geometry without loading it
    res = run(["plan", "--plugin", "toy_plugin", "--dataset", "toy-data", "--stages", "2"], plugin_dir, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "resnet20" in res.stdout

    # 5. auxpar study: [base.run] plugins makes the toy method a study method like any other
    study = tmp_path / "toy-study.toml"
    study.write_text(textwrap.dedent("""
        [study]
        name = "toy-study"
        [base.run]
        plugins = ["toy_plugin"]
        threads = 1
        [base.data]
        dataset = "toy-data"
        [methods.serial]
        [methods.toy]
    """))
    res = run(["study", "--config", str(study), "--out", str(tmp_path / "st"), "--no-progress"], plugin_dir,
              timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert read_summary(tmp_path / "st" / "runs" / "toy-s0")["method"] == "toy"
    assert "### toy (`--method toy`)" not in (tmp_path / "st" / "report.md").read_text()  # label == method
    assert "### toy" in (tmp_path / "st" / "report.md").read_text()
    # an unknown method in a study file is an error, never another method
    study.write_text(study.read_text().replace('plugins = ["toy_plugin"]', "").replace('"toy-data"', '"digits"'))
    res = run(["study", "--config", str(study), "--dry-run"], plugin_dir, timeout=60)
    assert res.returncode == 2 and "unknown method 'toy'" in res.stderr
