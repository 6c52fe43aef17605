"""Datasets and loaders: cached volumes in memory, batches padded only as far as they need.

Two ways to make training samples. ``workers``: the cases are read and cached in host memory,
then cropped and augmented by ``data.num_workers`` processes. ``device``: MONAI's fast-training
recipe, the cached cases on the training device, cropped and augmented there by a loader
thread with MONAI's metadata tracking off. ``data.loader: auto`` takes ``device`` on CUDA when
the cached cases fit in a quarter of the free GPU memory."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, ThreadDataLoader, pad_list_data_collate
from monai.data.meta_obj import get_track_meta, set_track_meta
from torch.utils.data import DistributedSampler

from segment.config import ExperimentConfig
from segment.data.tasks import TaskSplit
from segment.data.transforms import training_transforms, validation_transforms
from segment.engine.device import Runtime

# The share of free GPU memory the cached cases may take; the rest is for training.
DEVICE_CACHE_SHARE = 0.25


def collate_padded(batch: list) -> dict:
    """Stack samples of unequal size by padding each batch to its own largest sample.

    Transforms that draw several samples per volume return lists; they are flattened first."""
    flat = [sample for item in batch for sample in (item if isinstance(item, list) else [item])]
    return pad_list_data_collate(flat)


class DeviceLoader(ThreadDataLoader):
    """A thread that crops and augments cached device tensors while the GPU trains. MONAI's
    metadata tracking is off while an epoch runs (it costs time on every transform, and training
    needs none); it is back on for validation and anything else afterwards."""

    def __iter__(self):
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            yield from super().__iter__()
        finally:
            set_track_meta(tracking)


def cached_bytes(config: ExperimentConfig, cases: list[dict[str, str]]) -> int:
    """About how much memory the cached training cases take: float32 images, uint8 labels,
    and int64 voxel indices when patches are sampled by label. Read from the file headers."""
    per_voxel = 4 + 1 + (8 if config.data.patch_size is not None else 0)
    total = 0
    for case in cases:
        header = nib.load(case["image"]).header
        shape, zooms = header.get_data_shape(), header.get_zooms()
        voxels = float(np.prod(shape))
        if config.data.spacing is not None:
            voxels *= float(np.prod(np.asarray(zooms[:3]) / np.asarray(config.data.spacing)))
        total += int(voxels * per_voxel)
    return total


def samples_on_device(config: ExperimentConfig, split: TaskSplit, runtime: Runtime) -> bool:
    """Whether training samples are made on the training device (``data.loader``)."""
    choice = config.data.loader
    if choice != "auto":
        return choice == "device"
    if runtime.device.type != "cuda":
        return False
    try:
        needed = cached_bytes(config, split.train)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        # A header nibabel cannot read: the worker path reads every format through read_scan.
        return False
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return needed <= DEVICE_CACHE_SHARE * free


def training_loader(
    config: ExperimentConfig, split: TaskSplit, runtime: Runtime, distributed: bool = False
) -> DataLoader:
    """Shuffled batches of training samples; with ``distributed`` each process sees its share.
    ``config.data.loader`` must be resolved (workers or device), as :func:`samples_on_device` does."""
    data = config.data
    on_device = data.loader == "device"
    dataset = CacheDataset(
        split.train,
        transform=training_transforms(config, runtime.device if on_device else None),
        cache_rate=data.cache_rate,
        num_workers=max(1, data.num_workers),
        progress=False,
        # MONAI's transforms return new tensors, so the cache needs no copy per sample.
        copy_cache=not on_device,
    )
    sampler = DistributedSampler(dataset, shuffle=True, seed=config.trainer.seed) if distributed else None
    options = dict(
        batch_size=config.trainer.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collate_padded,
        drop_last=len(dataset) > config.trainer.batch_size,
    )
    if on_device:
        return DeviceLoader(dataset, num_workers=0, **options)
    return DataLoader(
        dataset,
        num_workers=data.num_workers,
        pin_memory=runtime.pin_memory,
        persistent_workers=data.num_workers > 0,
        **options,
    )


def validation_dataset(
    config: ExperimentConfig, split: TaskSplit, rank: int = 0, world_size: int = 1
) -> CacheDataset:
    """Whole validation volumes, normalised as for prediction, cached in memory.

    With several processes each takes every ``world_size``-th case; when there are fewer cases
    than processes all take all, which leaves the gathered mean unchanged."""
    cases = split.val[rank::world_size] if len(split.val) >= world_size else split.val
    return CacheDataset(
        cases,
        transform=validation_transforms(config),
        cache_rate=config.data.cache_rate,
        num_workers=max(1, config.data.num_workers),
        progress=False,
    )
