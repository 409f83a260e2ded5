"""run.host_memory: freed CPU tensor memory kept in the process (no page faults in the hot loop)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from auxpar import hostmem
from auxpar.config import build_config
from auxpar.errors import ConfigError
from conftest import run_cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate and free a 32 MiB tensor 20 times, as a training step does with its activations,
# and count the minor page faults it took (each fault is a 4 KiB page the kernel zeroed).
_FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    from auxpar import hostmem
    policy = hostmem.configure(sys.argv[1])
    for _ in range(8):  # warm-up: the heap grows to its working size (a few allocations)
        torch.ones(8 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        x = torch.ones(8 << 20)  # 32 MiB, written
        del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"policy": policy, "in_force": hostmem.in_force(), "faults": faults}))
""")


def _faults(policy: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _FAULTS, policy], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_reuses_freed_buffers_without_page_faults():
    keep, release = _faults("keep"), _faults("release")
    assert keep["policy"] == keep["in_force"] == "keep"
    assert release["policy"] == release["in_force"] == "release"
    pages = 20 * (32 << 20) // 4096  # what 20 fresh 32 MiB buffers cost in 4 KiB pages
    # glibc's defaults unmap the freed buffer: every allocation faults all its pages in again
    assert release["faults"] > pages // 2, release
    # kept: the same memory is reused; at most a few buffers. pages fault while the heap settles
    assert keep["faults"] < pages // 4, keep


def test_policy_is_validated():
    with pytest.raises(ConfigError, match="run.host_memory"):
        build_config({"run": {"host_memory": "forever"}})
    assert build_config({}).run.host_memory == "keep"
    with pytest.raises(ValueError, match="keep or release"):
        hostmem.configure("forever")


@pytest.mark.parametrize("policy", ["keep", "release"])
def test_cli_run_records_its_policy(tmp_path, policy):
    out = tmp_path / policy
    res = run_cli("train", "--out", str(out), "--dataset", "digits", "--epochs", "1", "--progress", "off",
                  "--host-memory", policy, "--set", "data.train_subset=256")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host_memory"] == (policy if GLIBC else "unavailable")
