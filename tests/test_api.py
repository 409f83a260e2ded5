"""The Python API: a user's network and data, trained from Python and from the CLI.

``experiments/custom_network.py`` defines a squeeze-and-excitation ResNet auxpar does not ship;
it is trained with penalty at K = 2 on digits through ``auxpar.train`` (which starts the two
processes itself) and through ``auxpar train --model experiments.custom_network:make_net``, and
the two runs must write the same numbers. The rest checks the errors a user can cause.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

import auxpar
from auxpar.errors import ConfigError, DataError
from auxpar.metrics import SUMMARY_KEYS, epoch_keys, read_metrics
from conftest import ROOT, cli_env, read_summary, run_cli

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.custom_network import SEBlock, make_net  # noqa: E402

RUN = dict(method="penalty", stages=2, epochs=5, lr=0.1, progress="off")
SUBSET = {"data.train_subset": 512}
TIMES = {"epoch_time_s", "train_time_s", "time_compute_s", "time_comm_s", "time_wait_s", "reinit_time_s"}


def _numbers(path):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in read_metrics(path)]


def test_custom_network_penalty_k2_api_and_cli_write_the_same_run(tmp_path):
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    summary = auxpar.train(model=make_net, data="digits", out=api_out, **RUN, **SUBSET)
    assert summary == read_summary(api_out)
    assert summary["method"] == "penalty" and summary["world_size"] == 2 and summary["stages"] == 2
    assert summary["model"] == "experiments.custom_network:make_net" and summary["split"] == [3, 3]
    assert summary["train_samples"] == 512 and summary["epochs"] == 5
    assert summary["final_test_acc"] > 0.2, summary  # 10 classes: chance is 0.1
    assert set(SUMMARY_KEYS) <= set(summary)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.pt"):
        assert (api_out / name).is_file(), name
    epochs = [r for r in read_metrics(api_out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 5 and all(tuple(r) == epoch_keys() for r in epochs)

    res = run_cli("train", "--model", "experiments.custom_network:make_net", "--method", "penalty", "--stages", "2",
                  "--epochs", "5", "--lr", "0.1", "--progress", "off", "--set", "data.train_subset=512",
                  "--out", str(cli_out))
    assert res.returncode == 0, res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    # Same config, same seed, same processes: the same numbers, the same files.
    assert _numbers(cli_out / "metrics.jsonl") == _numbers(api_out / "metrics.jsonl")
    cli_sum = read_summary(cli_out)
    assert list(cli_sum) == list(summary)
    for key in ("final_test_acc", "best_test_acc", "final_train_loss", "split", "params", "model", "dataset"):
        assert cli_sum[key] == summary[key], key
    strip = lambda p: [ln for ln in p.read_text().splitlines() if not ln.startswith("out = ")]  # noqa: E731
    assert strip(cli_out / "config.toml") == strip(api_out / "config.toml")
    # model.pt reloads into the serial network through the factory's name
    net, meta = auxpar.load_model(api_out / "model.pt")
    assert meta["arch"]["name"] == "experiments.custom_network:make_net" and len(net.blocks) == 6


def _digits_tensors():
    from auxpar.data import load_digits

    tr, te = load_digits("train"), load_digits("test")
    return tr.images.float() / 16.0, tr.labels, te.images.float() / 16.0, te.labels  # float, own scale


def test_tensor_data_serial_in_process(tmp_path):
    xtr, ytr, xte, yte = _digits_tensors()
    data = auxpar.TensorData(xtr, ytr, xte, yte, name="mydigits")
    net = auxpar.staged_net(*make_net(1, 10), input_shape=(1, 8, 8), name="se")
    summary = auxpar.train(model=net, data=data, epochs=3, batch_size=64, lr=0.1, out=tmp_path / "run",
                           progress="off", **SUBSET)
    assert summary["dataset"] == "mydigits" and summary["model"] == "se" and summary["method"] == "serial"
    assert summary["train_samples"] == 512 and summary["final_test_acc"] > 0.2, summary
    cfg = (tmp_path / "run" / "config.toml").read_text()
    assert 'dataset = "mydigits"' in cfg
    # a finished run is not replaced without overwrite=True, as on the command line
    with pytest.raises(ConfigError, match="already holds a finished run"):
        auxpar.train(model=net, data=data, epochs=1, out=tmp_path / "run")


def test_from_datasets_materializes_map_style_datasets():
    class Pairs:
        def __init__(self, n, shift):
            self.n, self.shift = n, shift

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.full((4, 4), float(i + self.shift)), i % 3  # grey-scale H x W: a channel is added

    data = auxpar.TensorData.from_datasets(Pairs(12, 0), Pairs(6, 100))
    train, test = data.splits()
    assert train.shape == (1, 4, 4) and len(train) == 12 and len(test) == 6 and train.num_classes == 3
    assert float(train.images[5, 0, 0, 0]) == 5.0  # sample id i is dataset index i
    assert train.labels.tolist() == [i % 3 for i in range(12)]


@pytest.mark.parametrize("args, fragment", [
    ((torch.zeros(8, 8, 8), torch.zeros(8), torch.zeros(4, 1, 8, 8), torch.zeros(4)), "unsqueeze"),
    ((torch.zeros(8, 1, 8, 6), torch.zeros(8), torch.zeros(4, 1, 8, 6), torch.zeros(4)), "square"),
    ((torch.zeros(8, 1, 8, 8, dtype=torch.int64), torch.zeros(8), torch.zeros(4, 1, 8, 8), torch.zeros(4)), "uint8"),
    ((torch.zeros(8, 1, 8, 8), torch.zeros(7, dtype=torch.long), torch.zeros(4, 1, 8, 8), torch.zeros(4)),
     "one label per image"),
    ((torch.zeros(8, 1, 8, 8), torch.zeros(8), torch.zeros(4, 1, 8, 8), torch.zeros(4)), "integer class"),
    ((torch.zeros(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, -1]), torch.zeros(4, 1, 8, 8),
      torch.zeros(4, dtype=torch.long)), "outside 0.."),
    ((torch.zeros(8, 1, 8, 8), torch.arange(8) % 2, torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)),
     "both splits need the same"),
    ((torch.full((8, 1, 8, 8), float("nan")), torch.arange(8) % 2, torch.zeros(4, 1, 8, 8),
      torch.zeros(4, dtype=torch.long)), "NaN"),
])
def test_bad_data_says_what_is_wrong(args, fragment):
    with pytest.raises(DataError, match=fragment):
        auxpar.TensorData(*args)


def test_labels_must_fit_num_classes():
    with pytest.raises(DataError, match=r"label 5 is outside 0..2"):
        auxpar.TensorData(torch.zeros(6, 1, 4, 4), torch.arange(6), torch.zeros(2, 1, 4, 4),
                          torch.zeros(2, dtype=torch.long), num_classes=3)


def test_staged_net_measures_shapes_and_names_what_does_not_fit():
    stem, blocks, head = make_net(1, 10)
    bn = stem[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    net = auxpar.staged_net(stem, blocks, head, input_shape=(1, 8, 8))
    assert net.num_classes == 10 and net.num_blocks == 6 and net.training
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert net.boundary_shapes()[4] == (32, 4, 4) and net.transition_indices() == [3]
    assert net.partition(2, [3, 3])[1].in_shape == (16, 8, 8)
    with pytest.raises(ConfigError, match=r"block 1 \(SEBlock\) cannot take the output of block 0"):
        auxpar.staged_net(stem, [SEBlock(16, 16), SEBlock(32, 32)], head, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"head must return logits of shape \(batch, num_classes\)"):
        auxpar.staged_net(stem, blocks, nn.Conv2d(32, 10, 1), input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="num_classes = 7"):
        auxpar.staged_net(stem, blocks, head, input_shape=(1, 8, 8), num_classes=7)
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        auxpar.staged_net(stem, [lambda x: x], head, input_shape=(1, 8, 8))


def test_mgrit_names_what_a_plain_block_lacks():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    net = auxpar.staged_net(nn.Conv2d(1, 4, 3, padding=1), [Plain(), Plain()],
                            nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), input_shape=(1, 4, 4))
    assert net.partition(2)[0].blocks[0] is net.blocks[0]  # penalty/AL/pipeline need only forward
    with pytest.raises(ConfigError, match=r"block 0 \(Plain\).*no 'step' attribute.*auxpar.ResidualBlock"):
        net.set_step(1.0)
    se = auxpar.staged_net(*make_net(1, 10), input_shape=(1, 8, 8))
    se.set_step(0.5)  # ResidualBlock subclasses scale their residual branch
    assert all(b.step == 0.5 for b in se.blocks)


FACTORIES = textwrap.dedent('''
    from torch import nn
    from experiments.custom_network import make_net

    def returns_int(in_channels, num_classes):
        return 3

    def returns_plain(in_channels, num_classes):
        return nn.Linear(3, 3)

    def wrong_classes(in_channels, num_classes):
        return make_net(in_channels, num_classes + 1)

    def needs_depth(in_channels, depth):
        return make_net(in_channels, 10)

    def raises(**kwargs):
        raise RuntimeError("boom")

    def with_kwargs(**kwargs):
        assert set(kwargs) == {"in_channels", "num_classes", "input_size"}, kwargs
        return make_net(kwargs["in_channels"], kwargs["num_classes"])
''')


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "userfactories_api.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_module_api:make", "cannot import module 'no_such_module_api'"),
    ("userfactories_api:missing", "has no attribute 'missing'"),
    ("userfactories_api", "package.module:factory"),
    ("userfactories_api:", "write a user model as package.module:function"),
    ("userfactories_api:returns_int", "returned an int; it must return an auxpar.StagedNet"),
    ("userfactories_api:returns_plain", "returned a Linear"),
    ("userfactories_api:wrong_classes", "num_classes = 10"),
    ("userfactories_api:needs_depth", "requires 'depth'"),
    ("userfactories_api:raises", "raised RuntimeError: boom"),
])
def test_factory_errors_name_the_factory_and_the_fix(factories, spec, fragment):
    from auxpar.models import build_model

    with pytest.raises(ConfigError, match=fragment):
        build_model(spec, in_channels=1, input_size=8, num_classes=10)


def test_factory_gets_the_arguments_it_accepts(factories):
    from auxpar.models import build_model

    net = build_model("userfactories_api:with_kwargs", in_channels=1, input_size=8, num_classes=10)
    assert net.name == "userfactories_api:with_kwargs" and net.num_blocks == 6
    with pytest.raises(ConfigError, match="model.dropout = 0.3 was given.*no 'dropout' parameter"):
        build_model("experiments.custom_network:make_net", in_channels=1, input_size=8, num_classes=10, dropout=0.3)


def test_cli_factory_errors_are_one_line(factories, tmp_path):
    res = run_cli("train", "--model", "userfactories_api:returns_int", "--epochs", "1", "--out",
                  str(tmp_path / "run"), cwd=factories)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("auxpar: error:") == 1
    assert "model factory userfactories_api:returns_int returned an int" in res.stderr


def test_unpicklable_factory_with_several_processes_says_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigError, match="module-level function"):
        auxpar.train(model=lambda in_channels, num_classes: make_net(in_channels, num_classes), data="digits",
                     method="penalty", stages=2, epochs=1, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_error_on_the_ranks_reaches_the_caller(factories, tmp_path):
    import userfactories_api

    with pytest.raises(ConfigError, match="returns 11 logits per sample"):
        auxpar.train(model=userfactories_api.wrong_classes, data="digits", method="penalty", stages=2, epochs=1,
                     out=tmp_path / "run", progress="off", **SUBSET)


def test_unknown_settings_and_data_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting lrate"):
        auxpar.train(lrate=0.1, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        auxpar.train(out=tmp_path / "run", **{"optim.lrr": 0.1})
    with pytest.raises(ConfigError, match="data must be a dataset name"):
        auxpar.train(data=torch.zeros(3), out=tmp_path / "run")
    with pytest.raises(ConfigError, match="plain Linear"):
        auxpar.train(model=nn.Linear(3, 3), out=tmp_path / "run", epochs=1, progress="off")


def test_decide_split_precedence():
    from auxpar.config import build_config
    from auxpar.distributed import DistInfo
    from auxpar.models import build_model, partition_counts
    from auxpar.resume import Resume
    from auxpar.trainer import decide_split

    net = build_model("resnet20", in_channels=1, input_size=8, num_classes=10)
    info = DistInfo()
    resumed = Resume(ROOT, {"meta": {"split": [2, 7]}})
    cfg = build_config(overrides={"run": {"method": "penalty"}, "dist": {"stages": 2, "split": [4, 5]}})
    assert decide_split(cfg, info, net, resumed) == [4, 5]  # explicit wins
    cfg = build_config(overrides={"run": {"method": "penalty"}, "dist": {"stages": 2}})
    assert decide_split(cfg, info, net, resumed) == [2, 7]  # then the checkpoint's
    assert decide_split(cfg, info, net, None) == partition_counts(net, 2)  # then FLOP-balanced
    cfg = build_config(overrides={"run": {"method": "mgrit"}, "dist": {"stages": 2},
                                  "mgrit": {"levels": 2, "cfactor": [3]}})
    cut = decide_split(cfg, info, net, None)
    assert sum(cut) == 9 and cut[0] % 3 == 0  # MGRIT: boundaries on the coarse grid
    assert decide_split(build_config(), info, net, None) == []  # serial: no cut


def test_import_auxpar_stays_light():
    import subprocess

    code = "import sys, auxpar; assert 'torch' not in sys.modules; print(sorted(auxpar.__all__))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=cli_env())
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and "TensorData" in res.stdout
    with pytest.raises(AttributeError):
        auxpar.no_such_thing  # noqa: B018
    assert json.dumps(auxpar.__all__)
