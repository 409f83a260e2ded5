"""metrics.jsonl and summary.json: the files studies and later tools read.

Records have fixed keys (a value may be null, a key is never missing), so a reader can build a
table from any run without guessing. Only the rank that owns a number writes it: the method's
``log_rank`` (rank 0 for serial and DDP; the last stage for layer-parallel methods).
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

COMMON_EPOCH_KEYS = (
    "kind", "epoch", "step", "phase", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    # the loss of the epoch's first step: after a parallel -> serial switch, how far the stages drifted
    "first_step_loss",
    "epoch_time_s", "train_time_s", "comm_bytes",
)
TAIL_EPOCH_KEYS = ("reinit_time_s", "skipped_steps")
COMMON_STEP_KEYS = ("kind", "epoch", "step", "phase", "lr", "loss")


def epoch_keys() -> tuple[str, ...]:
    """The epoch record's keys: the common ones, then every registered method's own (its
    ``epoch_keys`` in :mod:`auxpar.registry`; null for other methods), then the tail.

    Built-in method keys: layer-parallel methods' beta; per boundary k = 1..K-1 the mean
    residual ||F_{k-1}(z_{k-1}) - z_k||, the penalty value and the mean multiplier norm; per
    rank the cumulative compute / communication / waiting seconds (penalty, AL, pipeline,
    MGRIT); MGRIT's per-step {"fwd": n, "bwd": n} iterations and {"fwd": [...], "bwd": [...]}
    residual norms (epoch records carry the epoch means / last step's)."""
    from auxpar import registry

    own = [k for k in registry.epoch_keys() if k not in COMMON_EPOCH_KEYS + TAIL_EPOCH_KEYS]
    return COMMON_EPOCH_KEYS + tuple(own) + TAIL_EPOCH_KEYS


def step_keys() -> tuple[str, ...]:
    """The step record's keys: the common ones plus every registered method's ``step_keys``."""
    from auxpar import registry

    return COMMON_STEP_KEYS + tuple(k for k in registry.step_keys() if k not in COMMON_STEP_KEYS)


SUMMARY_KEYS = (
    "method", "model", "dataset", "world_size", "stages", "split", "epochs", "steps",
    "final_test_acc", "best_test_acc", "final_train_loss", "final_train_acc",
    "wall_time_s", "train_time_s", "eval_time_s", "phase_times_s", "comm_bytes",
    "peak_memory_bytes", "peak_memory_bytes_per_rank", "torch_version", "device", "backend",
    "threads", "seed", "params", "aux_store_bytes",
)


def _clean(v):
    """JSON has no NaN/inf: write them as null (the NaN guard reports them separately)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Append-only JSON-lines writer (one flush per record, so a crash loses at most one line)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, keys: tuple, **values) -> None:
        unknown = set(values) - set(keys)
        if unknown:
            raise KeyError(f"metrics record has keys outside its schema: {sorted(unknown)}")
        if self._fh is None:
            return
        rec = {k: _clean(values.get(k)) for k in keys}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    def epoch(self, **values) -> None:
        self.write(epoch_keys(), kind="epoch", **values)

    def step(self, **values) -> None:
        self.write(step_keys(), kind="step", **values)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
