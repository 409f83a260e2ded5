"""Shared test helpers: run the CLI as a user would, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # tests never need a GPU
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m auxpar ARGS`` in a fresh process; returns the completed process (never hangs)."""
    return subprocess.run([sys.executable, "-m", "auxpar", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd or ROOT)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture
def run_cli_fixture():
    return run_cli


# ---- device under test (tests/test_gpu_check.py; experiments/gpu_check.py sets it to cuda)

TEST_DEVICE_ENV = "AUXPAR_TEST_DEVICE"


def selected_device_name() -> str:
    """``$AUXPAR_TEST_DEVICE`` (cpu or cuda; cpu when unset): the device the device checks run on."""
    name = os.environ.get(TEST_DEVICE_ENV, "").strip().lower() or "cpu"
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{TEST_DEVICE_ENV}={name!r}: choose cpu or cuda")
    return name


@pytest.fixture
def device_under_test():
    """The torch device of ``$AUXPAR_TEST_DEVICE``; fails (never skips) when cuda is asked for
    and torch sees no CUDA device, so a GPU check cannot pass by quietly running nothing."""
    import torch

    name = selected_device_name()
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{TEST_DEVICE_ENV}=cuda but torch sees no CUDA device")
    return torch.device(name)
