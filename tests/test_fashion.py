"""Fashion-MNIST (strict IDX parsing, payload hashes, Debian folder, download, cache), the
28x28 recipe (models, plan, DS filters at 7x7) and data.train_subset.

The IDX files are tiny ones built here; the real files are only read when the Debian package
dataset-fashion-mnist happens to be installed (CI does not have it)."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import cifar_fixtures as cf  # noqa: E402
from conftest import read_summary, run_cli  # noqa: E402

import auxpar.data.fashion as fashion  # noqa: E402
from auxpar.config import DataConfig, build_config  # noqa: E402
from auxpar.coupling.ds import DSFilter, reduced_size  # noqa: E402
from auxpar.data import (  # noqa: E402
    FASHION_SHA256,
    TRAIN_SUBSET_SEED,
    cache_path,
    channel_stats,
    default_augment,
    load_dataset,
    load_fashion,
    stratified_subset,
    subset_indices,
)
from auxpar.errors import ConfigError, DataError  # noqa: E402

TRAIN_IMG, TRAIN_LAB = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMG, TEST_LAB = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


# ============================================================================================
# tiny IDX files


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    return b"".join(v.to_bytes(4, "big") for v in (magic, n, h, w)) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()


def make_arrays(n_train: int = 80, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMG: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LAB: rng.permutation(np.arange(n_train) % 10),
        TEST_IMG: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LAB: rng.permutation(np.arange(n_test) % 10),
    }


def write_set(directory: Path, arrays: dict[str, np.ndarray] | None = None,
              payloads: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write the four .gz files; ``payloads`` replaces individual decompressed payloads.
    Returns file name -> SHA-256 of the payload written (what a loader should expect)."""
    arrays = make_arrays() if arrays is None else arrays
    raw = {name: (idx_images(a) if "images" in name else idx_labels(a)) for name, a in arrays.items()}
    raw.update(payloads or {})
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in raw.items():
        (directory / name).write_bytes(gzip.compress(payload, mtime=0))
    return {name: hashlib.sha256(payload).hexdigest() for name, payload in raw.items()}


@pytest.fixture
def nosys(tmp_path, monkeypatch):
    """No Debian folder, whatever this machine has installed."""
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "no-system-dir")
    return tmp_path / "no-system-dir"


# ============================================================================================
# valid files, cache, locations


def test_valid_files_layout_stats_and_cache(tmp_path, nosys):
    arrays = make_arrays()
    data = tmp_path / "data"
    hashes = write_set(data, arrays)
    train = load_fashion("train", data, download=False, sha256=hashes)
    test = load_fashion("test", data, download=False, sha256=hashes)
    assert train.shape == (1, 28, 28) and len(train) == 80 and len(test) == 20
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == 10 and train.name == "fashion-mnist"
    assert np.array_equal(train.images.numpy()[:, 0], arrays[TRAIN_IMG])
    assert np.array_equal(test.labels.numpy(), arrays[TEST_LAB])
    mean, std = channel_stats(torch.from_numpy(arrays[TRAIN_IMG]).unsqueeze(1))
    assert train.mean == pytest.approx(mean) and test.std == pytest.approx(std)  # train stats for both
    # Both splits are cached as uint8; the .gz files are then not needed.
    for split in ("train", "test"):
        obj = torch.load(cache_path(data, "fashion-mnist", split), weights_only=True)
        assert obj["images"].dtype == torch.uint8
    for name in hashes:
        (data / name).unlink()
    again = load_fashion("train", data, download=False, sha256=hashes)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # A cache built for other hashes is not trusted: it is rebuilt, and the files are gone now.
    other = {k: "0" * 64 for k in hashes}
    with pytest.raises(DataError, match="not found"):
        load_fashion("train", data, download=False, sha256=other)


def test_debian_folder_fallback_and_missing_files(tmp_path, monkeypatch):
    sysdir = tmp_path / "usr-share"
    hashes = write_set(sysdir)
    monkeypatch.setattr(fashion, "SYSTEM_DIR", sysdir)
    ds = load_fashion("test", tmp_path / "empty", download=False, sha256=hashes)
    assert len(ds) == 20
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "nothing")
    with pytest.raises(DataError) as err:
        load_fashion("train", tmp_path / "empty2", download=False, sha256=hashes)
    msg = str(err.value)
    assert TRAIN_IMG in msg and "dataset-fashion-mnist" in msg and "downloading is disabled" in msg


def test_pinned_hashes_reject_tiny_files(tmp_path, nosys):
    """The pinned hashes are checked by default: a well-formed file that is not the official
    one is refused (and the hash check cannot be turned off)."""
    assert set(FASHION_SHA256) == {TRAIN_IMG, TRAIN_LAB, TEST_IMG, TEST_LAB}
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in FASHION_SHA256.values())
    write_set(tmp_path / "data")
    with pytest.raises(DataError) as err:
        load_fashion("train", tmp_path / "data", download=False)
    msg = str(err.value)
    assert "SHA-256" in msg and TRAIN_IMG in msg and FASHION_SHA256[TRAIN_IMG] in msg


def test_hash_mismatch_with_injected_hashes(tmp_path, nosys):
    hashes = write_set(tmp_path / "data")
    wrong = dict(hashes)
    wrong[TEST_LAB] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DataError, match=rf"{TEST_LAB}.*SHA-256 {hashes[TEST_LAB]}, not the expected {wrong[TEST_LAB]}"):
        load_fashion("test", tmp_path / "data", download=False, sha256=wrong)


def _good() -> dict[str, np.ndarray]:
    return make_arrays()


@pytest.mark.parametrize("name,payload,fragment", [
    (TRAIN_IMG, idx_images(_good()[TRAIN_IMG])[:-5], "is truncated"),
    (TRAIN_IMG, idx_images(_good()[TRAIN_IMG]) + b"\0", "has trailing bytes"),
    (TRAIN_IMG, idx_images(_good()[TRAIN_IMG])[:10], "less than the 16-byte IDX header"),
    (TRAIN_IMG, idx_images(_good()[TRAIN_IMG], magic=2049), "magic number 2049"),
    (TEST_LAB, idx_labels(_good()[TEST_LAB], magic=2051), "magic number 2051"),
    (TEST_LAB, idx_labels(_good()[TEST_LAB])[:-1], "is truncated"),
    (TRAIN_IMG, idx_images(np.zeros((80, 27, 28), np.uint8)), "27x28 images"),
    (TRAIN_LAB, idx_labels(np.r_[np.arange(79) % 10, 10]), "label 10 at position 79"),
    (TEST_IMG, idx_images(np.zeros((21, 28, 28), np.uint8)), "21 images but"),
    (TEST_LAB, idx_labels(np.arange(19) % 10), "19 labels"),
])
def test_strict_idx_parsing(tmp_path, nosys, name, payload, fragment):
    hashes = write_set(tmp_path / "data", payloads={name: payload})  # the hashes match: parsing fails
    with pytest.raises(DataError) as err:
        load_fashion("train", tmp_path / "data", download=False, sha256=hashes)
    msg = str(err.value)
    assert fragment in msg and name in msg, msg


def test_broken_gzip(tmp_path, nosys):
    hashes = write_set(tmp_path / "data")
    path = tmp_path / "data" / TRAIN_LAB
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=rf"{TRAIN_LAB} is not a complete gzip file"):
        load_fashion("train", tmp_path / "data", download=False, sha256=hashes)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a complete gzip file"):
        load_fashion("train", tmp_path / "data", download=False, sha256=hashes)


def test_download_from_mirror(tmp_path, nosys, monkeypatch):
    served = tmp_path / "remote"
    hashes = write_set(served)
    data = tmp_path / "data"
    with cf.serve_directory(served) as (base, requests):
        monkeypatch.setenv(fashion.URL_BASE_ENV, base + "/")
        ds = load_fashion("train", data, download=True, sha256=hashes)
        assert len(ds) == 80 and sorted(requests) == sorted(f"/{n}" for n in hashes)
        assert all((data / n).is_file() for n in hashes)
        # A download whose content is wrong is refused and never left in the data directory.
        wrong = {**hashes, TEST_IMG: "f" * 64}
        (data / TEST_IMG).unlink()
        cache_path(data, "fashion-mnist", "test").unlink()
        with pytest.raises(DataError, match=rf"downloaded {base}/{TEST_IMG}, but the file is not usable.*SHA-256"):
            load_fashion("test", data, download=True, sha256=wrong)
        assert not (data / TEST_IMG).exists() and not list(data.glob(".*.part"))
        (served / TEST_IMG).unlink()
        with pytest.raises(DataError, match="HTTP 404"):
            load_fashion("test", data, download=True, sha256=hashes)
    monkeypatch.setenv(fashion.URL_BASE_ENV, cf.closed_port_url())
    with pytest.raises(DataError, match="could not be reached"):
        load_fashion("test", data, download=True, sha256=hashes)


@pytest.mark.skipif(not all((fashion.SYSTEM_DIR / n).is_file() for n in FASHION_SHA256),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_real_files_from_debian_package(tmp_path):
    train = load_dataset("fashion-mnist", "train", data_dir=str(tmp_path), download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=str(tmp_path), download=False)
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-4) and train.std[0] == pytest.approx(0.3530, abs=1e-4)


# ============================================================================================
# recipe: augmentation, config, models, plan, DS at 7x7


def test_recipe_defaults():
    from auxpar.registry import dataset_names

    assert "fashion-mnist" in dataset_names()
    assert default_augment("fashion-mnist") == {"crop_pad": 2, "pad_mode": "zero", "flip": True}
    cfg = build_config(overrides={"data": {"dataset": "fashion-mnist"}})
    from auxpar.trainer import make_augment

    aug = make_augment(cfg)
    assert (aug.crop_pad, aug.pad_mode, aug.flip) == (2, "zero", True)
    # the measured penalty/AL recipe (README, Fashion-MNIST), which a user's setting overrides
    c = cfg.coupling
    assert (c.phases, c.serial_executor, c.stage_input) == ("serial:1,parallel:2", "pipeline", "output")
    mine = build_config(overrides={"data": {"dataset": "fashion-mnist"}, "coupling": {"stage_input": "aux"}})
    assert mine.coupling.stage_input == "aux" and build_config().coupling.stage_input == "aux"
    # the FLOP cut (the measured one did not pay off in the full-set study; a user may ask for it)
    assert cfg.dist.balance == "flops"
    assert build_config(overrides={"data": {"dataset": "fashion-mnist"}, "dist": {"balance": "time"}}).dist.balance == "time"
    with pytest.raises(ConfigError, match="coupling.reinit_threads"):
        build_config(overrides={"coupling": {"reinit_threads": -1}})
    with pytest.raises(ConfigError, match="coupling.stage_input"):
        build_config(overrides={"coupling": {"stage_input": "true"}})
    with pytest.raises(ConfigError, match="data.train_subset"):
        build_config(overrides={"data": {"train_subset": -1}})
    with pytest.raises(ConfigError, match="fashion-mnist"):
        build_config(overrides={"data": {"dataset": "fashion"}})


@pytest.mark.parametrize("model", ["resnet20", "resnet32", "resnet56", "resnet110", "preact-resnet20",
                                   "wrn-16-2", "wrn-28-10"])
def test_models_and_plan_at_28x28(model):
    from auxpar.plan import make_plan

    plan = make_plan(model, DataConfig(dataset="fashion-mnist"), 4)
    assert plan["input_shape"] == [1, 28, 28] and plan["num_classes"] == 10
    sides = {r["out_shape"][1] for r in plan["stage_rows"][:-1]}
    assert sides <= {28, 14, 7}
    # aux memory counts stored values at ceil(side / s)
    vals = {m["ds_factor"]: m["aux_bytes"] for m in plan["aux_memory"] if m["dtype"] == "fp32"}
    want = sum(r["out_shape"][0] * reduced_size(r["out_shape"][1], 2) ** 2 for r in plan["stage_rows"][:-1])
    assert vals[2] == 60_000 * want * 4


def test_small_models_run_at_28x28():
    from auxpar.models import build_model

    torch.manual_seed(0)
    for name in ("resnet20", "preact-resnet20"):
        net = build_model(name, in_channels=1, input_size=28, num_classes=10)
        out = net(torch.randn(2, 1, 28, 28))
        assert out.shape == (2, 10)
        out.sum().backward()


@pytest.mark.parametrize("side,s,stored", [(7, 2, 4), (14, 4, 4), (7, 4, 2), (7, 8, 1), (28, 2, 14), (14, 2, 7)])
def test_ds_rounding(side, s, stored):
    f = DSFilter((3, side, side), s)
    assert f.shape == (3, stored, stored) and f.numel == 3 * stored * stored
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    d = f.down(x)
    assert d.shape == (2, 3, stored, stored)
    # avg: the mean of the pixels each cell covers (ceil-mode pooling without padding)
    assert torch.allclose(d, F.avg_pool2d(x, s, ceil_mode=True))
    fmax = DSFilter((3, side, side), s, mode="max")
    assert torch.equal(fmax.down(x), F.max_pool2d(x, s, ceil_mode=True))
    z = torch.randn(2, 3, stored, stored, dtype=torch.float64)
    up = f.up(z)
    assert up.shape == (2, 3, side, side)
    # nearest U: each pixel reads the cell it is pooled into, so D(U(z)) == z
    assert torch.equal(up[:, :, side - 1, side - 1], z[:, :, (side - 1) // s, (side - 1) // s])
    assert torch.allclose(f.down(up), z)
    assert DSFilter((3, side, side), s, upsample="bilinear").up(z).shape == (2, 3, side, side)


def test_ds_other_factors_must_divide():
    assert DSFilter((3, 9, 9), 3).shape == (3, 3, 3)
    with pytest.raises(ConfigError, match=r"--ds-factor 3 does not divide the boundary 2 resolution 7x7.*power-of-two"):
        DSFilter((3, 7, 7), 3, where="boundary 2")


def test_ds_divisible_sizes_are_unchanged_and_gradients_are_finite():
    x = torch.randn(2, 4, 8, 8)
    f = DSFilter((4, 8, 8), 2)
    assert torch.equal(f.down(x), F.avg_pool2d(x, 2))
    z = torch.randn(2, 4, 4, 4)
    assert torch.equal(f.up(z), F.interpolate(z, size=(8, 8), mode="nearest"))
    for mode in ("avg", "max"):
        x = torch.randn(2, 4, 7, 7, requires_grad=True)
        f = DSFilter((4, 7, 7), 2, mode=mode, upsample="bilinear")
        f.up(f.down(x)).pow(2).sum().backward()
        assert torch.isfinite(x.grad).all()
    xb = torch.randn(2, 4, 7, 7, dtype=torch.bfloat16)
    assert DSFilter((4, 7, 7), 2).down(xb).dtype == torch.bfloat16


# ============================================================================================
# train_subset


def test_subset_indices_stratified_deterministic_and_minimum_one():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 19 + [3] * 1)
    ids = subset_indices(labels, 20)
    assert ids.tolist() == sorted(ids.tolist()) and len(set(ids.tolist())) == 20
    counts = torch.bincount(labels[ids], minlength=4).tolist()
    assert counts == [10, 6, 3, 1]  # proportional (10, 6, 3.8 -> 3 after the rare class takes 1) and >= 1
    assert torch.equal(ids, subset_indices(labels, 20))
    assert torch.equal(ids, subset_indices(labels, 20, TRAIN_SUBSET_SEED))
    assert not torch.equal(ids, subset_indices(labels, 20, seed=1))
    assert subset_indices(labels, 100).tolist() == list(range(100))


def test_train_subset_through_load_dataset():
    full = load_dataset("digits", "train")
    sub = load_dataset("digits", "train", train_subset=200)
    assert len(sub) == 200 and torch.equal(sub.indices, torch.arange(200))  # ids contiguous
    counts = torch.bincount(sub.labels, minlength=10)
    expected = torch.bincount(full.labels, minlength=10).double() * 200 / len(full)
    assert (counts.double() - expected).abs().max() < 1
    assert sub.mean == full.mean and sub.std == full.std  # normalized like the full set
    # the kept images are the full set's, in their original order
    ids = subset_indices(full.labels, 200)
    assert torch.equal(sub.images, full.images[ids]) and torch.equal(sub.labels, full.labels[ids])
    # fixed: independent of the run seed (which only matters for synthetic data)
    assert torch.equal(load_dataset("digits", "train", seed=7, train_subset=200).images, sub.images)
    assert len(load_dataset("digits", "test", train_subset=200)) == 360  # test split untouched
    syn = load_dataset("synthetic", "train", train_subset=100)
    assert len(syn) == 100
    assert stratified_subset(full, len(full)) is full
    with pytest.raises(ConfigError, match=r"data.train_subset = 2000 is larger than the 1437"):
        load_dataset("digits", "train", train_subset=2000)
    with pytest.raises(ConfigError, match=r"data.train_subset = 9 is smaller than the 10 classes.*at least 10"):
        load_dataset("digits", "train", train_subset=9)


def test_plan_reports_train_subset():
    from auxpar.plan import format_plan, make_plan

    plan = make_plan("resnet20", DataConfig(dataset="fashion-mnist", train_subset=6000), 2)
    assert plan["train_samples"] == 6000 and plan["train_subset"] == 6000
    assert "training subset: 6,000 samples" in format_plan(plan)
    assert make_plan("resnet20", DataConfig(dataset="fashion-mnist"), 2)["train_subset"] is None
    with pytest.raises(ConfigError, match="larger than the 60000 training samples of fashion-mnist"):
        make_plan("resnet20", DataConfig(dataset="fashion-mnist", train_subset=60_001), 2)
    with pytest.raises(ConfigError, match="smaller than the 10 classes"):
        make_plan("resnet20", DataConfig(dataset="fashion-mnist", train_subset=5), 2)


# ============================================================================================
# command line


def test_cli_trains_one_epoch_on_tiny_fashion_set(tmp_path, nosys, monkeypatch, capsys):
    from auxpar import cli

    data = tmp_path / "data"
    monkeypatch.setattr(fashion, "FASHION_SHA256", write_set(data))
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--no-download",
                   "--model", "resnet20", "--epochs", "1", "--batch-size", "16", "--progress", "off",
                   "--set", "data.train_subset=64", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = read_summary(out)
    assert s["dataset"] == "fashion-mnist" and s["train_subset"] == 64 and s["train_samples"] == 64
    assert s["steps"] == 4 and s["final_test_acc"] is not None


def test_cli_plan_and_pinned_hash_error(tmp_path):
    res = run_cli("plan", "--dataset", "fashion-mnist", "--model", "resnet20", "--stages", "4", "--json",
                  "--set", "data.train_subset=600")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["train_subset"] == 600 and plan["input_shape"] == [1, 28, 28]
    # Tiny files with the pinned hashes: one clear error, no traceback (Debian folder or not,
    # the files in --data-dir come first).
    write_set(tmp_path / "data")
    res = run_cli("train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--no-download",
                  "--epochs", "1", "--out", str(tmp_path / "r"))
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("auxpar: error:") == 1 and "SHA-256" in res.stderr


@pytest.mark.slow
def test_layer_parallel_ds2_at_7x7_with_train_subset(tmp_path):
    """penalty with one boundary at 7x7 (28x28 input, cut after 7 of 9 blocks) and --ds-factor 2."""
    res = run_cli("train", "--method", "penalty", "--stages", "2", "--split", "7,2", "--ds-factor", "2",
                  "--dataset", "synthetic", "--set", "data.synthetic_shape=[1, 28, 28]",
                  "--set", "data.synthetic_num_train=48", "--set", "data.synthetic_num_test=16",
                  "--set", "data.train_subset=32", "--epochs", "1", "--batch-size", "16",
                  "--out", str(tmp_path / "r"), timeout=240)
    assert res.returncode == 0, res.stderr
    s = read_summary(tmp_path / "r")
    assert s["train_subset"] == 32 and s["steps"] == 2
    assert s["aux_store_bytes"] == 32 * 64 * 4 * 4 * 4  # 64 x ceil(7/2)^2 fp32 states per sample
