"""Datasets and loaders: cached volumes in memory, batches padded only as far as they need."""

from __future__ import annotations

from monai.data import CacheDataset, DataLoader, pad_list_data_collate
from torch.utils.data import DistributedSampler

from segment.config import ExperimentConfig
from segment.data.tasks import TaskSplit
from segment.data.transforms import training_transforms, validation_transforms


def collate_padded(batch: list) -> dict:
    """Stack samples of unequal size by padding each batch to its own largest sample.

    Transforms that draw several samples per volume return lists; they are flattened first."""
    flat = [sample for item in batch for sample in (item if isinstance(item, list) else [item])]
    return pad_list_data_collate(flat)


def training_loader(
    config: ExperimentConfig, split: TaskSplit, pin_memory: bool, distributed: bool = False
) -> DataLoader:
    """Shuffled batches of training samples; with ``distributed`` each process sees its share."""
    dataset = CacheDataset(
        split.train,
        transform=training_transforms(config),
        cache_rate=config.data.cache_rate,
        num_workers=max(1, config.data.num_workers),
        progress=False,
    )
    sampler = DistributedSampler(dataset, shuffle=True, seed=config.trainer.seed) if distributed else None
    return DataLoader(
        dataset,
        batch_size=config.trainer.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.data.num_workers,
        collate_fn=collate_padded,
        pin_memory=pin_memory,
        drop_last=len(dataset) > config.trainer.batch_size,
        persistent_workers=config.data.num_workers > 0,
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
