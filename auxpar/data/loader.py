"""Deterministic, resumable, shardable batch indices and an on-device batch iterator.

:class:`IndexSampler` decides *which* sample ids form each batch; :class:`BatchLoader` turns the
ids into tensors on the training device (the whole dataset lives there as ``uint8``, so a batch
is one gather + augmentation + normalization, no worker processes).

Guarantees callers rely on:

* The permutation of epoch ``e`` depends only on ``(seed, e)``, never on earlier epochs.
* With ``num_replicas=R`` each rank gets a contiguous slice of every *global* batch of
  ``batch_size`` samples; the R slices together are exactly the batch a single process with the
  same seed sees (DDP equality). With ``num_replicas=1`` every caller with the same seed gets
  identical ids (layer-parallel ranks).
* With ``strata=S`` (a multiple of R) the ids are split into S fixed classes (``id % S``), each
  shuffled on its own, and every global batch takes ``batch_size / S`` ids of each class, in
  class order. Replica r then always sees the same classes (``(id % S) // (S / R) == r``),
  whatever the epoch: the ownership that per-sample aux states need under ``--dp``. The global
  batches depend on S, not on R, so a one-replica run with the same S sees exactly the global
  batches of an R-replica run (the equality tests of the 2-D mesh).
* :class:`BatchLoader` draws augmentation parameters for the whole global batch from a CPU
  generator seeded by ``(generator_seed, epoch, batch position)`` and applies this rank's slice,
  so augmentation is reproducible per epoch, identical across layer-parallel ranks, identical
  between DDP and a single process, identical on CPU and GPU, and exact after a mid-epoch resume.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch

from auxpar.data.augment import Augment, normalize as _normalize
from auxpar.data.datasets import ImageDataset, derive_seed
from auxpar.errors import ConfigError


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class ShardBatch(NamedTuple):
    """One batch as seen by one replica (see :meth:`IndexSampler.iter_shards`)."""

    position: int  # batch number within the epoch (0-based)
    indices: torch.Tensor  # this rank's sample ids, int64, CPU
    offset: int  # where this rank's slice starts inside the global batch
    global_size: int  # number of samples in the global batch


class IndexSampler:
    """Batches of sample ids, deterministic per ``(seed, epoch)``, sharded over replicas, resumable.

    ``batch_size`` is the *global* batch size; each of the ``num_replicas`` ranks gets
    ``batch_size // num_replicas`` ids of it (must divide, else :class:`ConfigError`).
    ``drop_last=False`` keeps a final partial global batch of ``r`` samples, split as evenly as
    possible: the first ``r % R`` ranks get ``r // R + 1`` ids, the others ``r // R`` -- so if
    ``r < R`` some ranks get an *empty* batch (every rank still sees the same number of batches).
    ``drop_last=True`` with fewer samples than one batch is a :class:`ConfigError`.

    ``strata`` (see the module docstring): 1 = one plain shuffle (replicas get contiguous
    slices); above 1 it must be a multiple of ``num_replicas`` and divide ``batch_size``, and
    only full batches are made (``drop_last=True``).

    Resume: :meth:`state_dict` returns ``{"epoch", "position", "seed"}`` where ``position`` is the
    number of batches already handed out this epoch; after :meth:`load_state_dict` the next
    iteration of that epoch skips those batches (calling ``set_epoch`` with the same epoch keeps
    the resume point), and any later epoch starts at position 0.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        strata: int = 1,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in 0..{num_replicas - 1}, got {rank!r}")
        if batch_size % num_replicas:
            raise ConfigError(
                f"batch_size {batch_size} is not divisible by the {num_replicas} data-parallel "
                f"replicas: use a multiple of {num_replicas} (e.g. "
                f"{max(num_replicas, batch_size // num_replicas * num_replicas)})"
            )
        if drop_last and num_samples < batch_size:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the dataset ({num_samples} samples), so "
                f"with drop_last no batch is left: use batch_size <= {num_samples} or drop_last=False"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.strata = _positive_int("strata", strata)
        if strata > 1 and strata % num_replicas:
            raise ConfigError(f"data.strata {strata} must be a multiple of the {num_replicas} data-parallel "
                              f"replicas (each replica owns whole strata); use {num_replicas} or 0 (auto)")
        if batch_size % strata:
            raise ConfigError(f"batch_size {batch_size} does not split into data.strata {strata} equal parts; "
                              f"use a batch size that is a multiple of {strata}")
        if strata > 1 and not drop_last:
            raise ConfigError("data.strata > 1 makes full batches only (drop_last=True)")
        if strata > 1 and num_samples // strata < batch_size // strata:
            raise ConfigError(f"batch_size {batch_size} takes {batch_size // strata} samples of each of the "
                              f"{strata} strata, but the smallest holds {num_samples // strata}: use a smaller "
                              "batch size")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = rank
        self._epoch = 0
        self._position = 0
        self._resume: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def local_batch_size(self) -> int:
        """Ids per rank in a full batch: ``batch_size // num_replicas``."""
        return self.batch_size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses (position 0, unless this is
        the epoch of a pending :meth:`load_state_dict`)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = epoch
        if self._resume is not None and self._resume[0] == epoch:
            self._position = self._resume[1]
        else:
            self._resume = None
            self._position = 0

    def __len__(self) -> int:
        if self.strata > 1:  # full batches only, limited by the smallest stratum
            return (self.num_samples // self.strata) // (self.batch_size // self.strata)
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's order of all sample ids (int64, CPU); identity when ``shuffle=False``."""
        e = self._epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples, dtype=torch.int64)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, e, "sampler"))
        return torch.randperm(self.num_samples, generator=gen, dtype=torch.int64)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The ids of the epoch's batches, one global batch after another (int64, CPU): the
        permutation, or with ``strata > 1`` each batch's ``batch_size / S`` ids of every stratum."""
        if self.strata == 1:
            return self.permutation(epoch)
        e = self._epoch if epoch is None else epoch
        S, per = self.strata, self.batch_size // self.strata
        n = len(self)
        parts = []
        for s in range(S):
            ids = torch.arange(s, self.num_samples, S, dtype=torch.int64)
            if self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, e, "sampler", "stratum", s))
                ids = ids[torch.randperm(ids.numel(), generator=gen)]
            parts.append(ids[: n * per].view(n, per))
        return torch.stack(parts, 1).reshape(-1)

    def _shard(self, global_size: int) -> tuple[int, int]:
        base, extra = divmod(global_size, self.num_replicas)
        r = self.rank
        return r * base + min(r, extra), base + (1 if r < extra else 0)

    def iter_shards(self) -> Iterator[ShardBatch]:
        """Like iterating the sampler, but with each batch's position and place in the global batch."""
        start = self._resume[1] if self._resume is not None and self._resume[0] == self._epoch else 0
        self._resume = None
        self._position = start
        return self._generate(self._epoch, start)

    def _generate(self, epoch: int, start: int) -> Iterator[ShardBatch]:
        perm = self.order(epoch)
        for b in range(start, len(self)):
            lo = b * self.batch_size
            global_ids = perm[lo : min(lo + self.batch_size, self.num_samples)]
            offset, size = self._shard(global_ids.numel())
            self._position = b + 1
            yield ShardBatch(b, global_ids[offset : offset + size], offset, global_ids.numel())

    def __iter__(self) -> Iterator[torch.Tensor]:
        """This rank's sample ids (int64, CPU) for each remaining batch of the current epoch."""
        return (shard.indices for shard in self.iter_shards())

    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`. The saved seed replaces this sampler's seed."""
        try:
            epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"sampler state {state!r} is invalid ({exc}): it needs integer 'epoch', "
                "'position' and 'seed'; the checkpoint is damaged or from another tool"
            ) from None
        if epoch < 0 or not 0 <= position <= len(self):
            raise ConfigError(
                f"sampler state epoch={epoch} position={position} does not fit this run "
                f"({len(self)} batches per epoch): resume with the same dataset and batch size"
            )
        self.seed = seed
        self._epoch = epoch
        self._position = position
        self._resume = (epoch, position)


class Batch(NamedTuple):
    """Sample ids, inputs and labels of one batch, all on the loader's device."""

    idx: torch.Tensor  # int64 (N,)
    x: torch.Tensor  # float32 N x C x H x W (uint8 when the loader has normalize=False)
    y: torch.Tensor  # int64 (N,)


class BatchLoader:
    """Iterate an :class:`ImageDataset` in the batches an :class:`IndexSampler` chooses.

    The dataset's ``uint8`` images and labels are moved to ``device`` once. Each batch is
    gathered, augmented (``uint8``, before normalization) and normalized with the dataset's
    mean/std. ``normalize=False`` yields the raw (augmented) ``uint8`` images instead.

    Augmentation can be switched per phase with the ``augment_enabled`` attribute or per pass
    with :meth:`iterate` (``augment=False``). Its randomness is a pure function of
    ``(generator_seed, epoch, batch position)`` (see the module docstring).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        sampler: IndexSampler,
        *,
        device: torch.device | str,
        augment: Augment | None,
        normalize: bool = True,
        generator_seed: int = 0,
    ) -> None:
        if sampler.num_samples != len(dataset):
            raise ValueError(
                f"sampler covers {sampler.num_samples} samples but the dataset has {len(dataset)}"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device)
        self.augment = augment
        self.augment_enabled = augment is not None and augment.enabled
        self.normalize = normalize
        self.generator_seed = generator_seed
        self._gen = torch.Generator()  # CPU on purpose: same draws on every device

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler; the epoch also selects the augmentation randomness."""
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, augment: bool | None = None) -> Iterator[Batch]:
        """Iterate the current epoch; ``augment`` overrides ``augment_enabled`` for this pass."""
        use_aug = self.augment_enabled if augment is None else bool(augment)
        aug = self.augment if (use_aug and self.augment is not None and self.augment.enabled) else None
        shards = self.sampler.iter_shards()
        epoch = self.sampler.epoch
        return self._generate(shards, epoch, aug)

    def _generate(self, shards: Iterator[ShardBatch], epoch: int, aug: Augment | None) -> Iterator[Batch]:
        for shard in shards:
            idx = shard.indices.to(self.device, non_blocking=True)
            x = self.images.index_select(0, idx)
            if aug is not None:
                self._gen.manual_seed(derive_seed(self.generator_seed, epoch, shard.position, "augment"))
                params = aug.sample(shard.global_size, self._gen)
                x = aug.apply(x, params.select(slice(shard.offset, shard.offset + shard.indices.numel())))
            if self.normalize:
                x = _normalize(x, self.mean, self.std)
            yield Batch(idx, x, self.labels.index_select(0, idx))


def eval_batches(
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device | str,
    *,
    normalize: bool = True,
    shards: int = 1,
    shard: int = 0,
) -> Iterator[Batch]:
    """Samples ``shard, shard + shards, ...`` in id order (all of them by default),
    ``batch_size`` at a time (last batch may be smaller), no augmentation. Data-parallel ranks
    each evaluate one shard and sum the results. Each batch is copied to ``device`` as needed."""
    _positive_int("batch_size", batch_size)
    _positive_int("shards", shards)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    device = torch.device(device)
    mean = torch.tensor(dataset.mean, dtype=torch.float32, device=device)
    std = torch.tensor(dataset.std, dtype=torch.float32, device=device)
    ids = torch.arange(shard, len(dataset), shards, dtype=torch.int64)
    for start in range(0, ids.numel(), batch_size):
        idx = ids[start:start + batch_size]
        x = dataset.images.index_select(0, idx).to(device, non_blocking=True)
        if normalize:
            x = _normalize(x, mean, std)
        y = dataset.labels.index_select(0, idx).to(device, non_blocking=True)
        yield Batch(idx.to(device), x, y)
