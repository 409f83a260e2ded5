"""Datasets, augmentation and batching for auxpar (plain torch; torchvision is never imported).

Typical use::

    train = load_dataset("cifar10", "train", data_dir="data")
    test = load_dataset("cifar10", "test", data_dir="data")
    small = load_dataset("fashion-mnist", "train", train_subset=6000)  # fixed stratified subset
    sampler = IndexSampler(len(train), 128, seed=0, num_replicas=world, rank=rank)
    loader = BatchLoader(train, sampler, device="cuda",
                         augment=Augment(**default_augment("cifar10")), generator_seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for idx, x, y in loader:   # idx: sample ids (keys of per-sample auxiliary states)
            ...
    for batch in eval_batches(test, 1000, "cuda"):
        ...
"""

from auxpar.data.augment import Augment, AugmentParams, normalize
from auxpar.data.cifar import CIFAR_SOURCES, URL_BASE_ENV, CifarSource, cache_path, load_cifar
from auxpar.data.datasets import (
    DIGITS_SPLIT_SEED,
    SYNTHETIC_DEFAULTS,
    TRAIN_SUBSET_SEED,
    ImageDataset,
    channel_stats,
    check_train_subset,
    default_augment,
    derive_seed,
    load_dataset,
    load_digits,
    load_synthetic,
    stratified_subset,
    subset_indices,
)
from auxpar.data.fashion import FASHION_SHA256, load_fashion
from auxpar.data.loader import Batch, BatchLoader, IndexSampler, ShardBatch, eval_batches

__all__ = [
    "Augment",
    "AugmentParams",
    "Batch",
    "BatchLoader",
    "CIFAR_SOURCES",
    "CifarSource",
    "DIGITS_SPLIT_SEED",
    "FASHION_SHA256",
    "ImageDataset",
    "IndexSampler",
    "SYNTHETIC_DEFAULTS",
    "TRAIN_SUBSET_SEED",
    "ShardBatch",
    "URL_BASE_ENV",
    "cache_path",
    "channel_stats",
    "check_train_subset",
    "default_augment",
    "derive_seed",
    "eval_batches",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_fashion",
    "load_synthetic",
    "normalize",
    "stratified_subset",
    "subset_indices",
]
