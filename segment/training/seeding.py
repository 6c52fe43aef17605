"""Random streams per rank and per epoch, and cuDNN's choice between determinism and speed.

Every rank seeds Python's, NumPy's and torch's generators (CPU and every CUDA device) from the
run's seed, its rank and the epochs done, at the start of every epoch. Ranks therefore draw
different augmentations and skip-dropout masks, and a resumed run draws what the uninterrupted
run would have drawn from the resumed epoch on, on every rank, without any generator state in
the checkpoint. Loader worker processes take their seeds from the seeded main generator when
the loader starts; with ``data.num_workers`` 0 the transforms are reseeded every epoch too."""

from __future__ import annotations

import random

import numpy as np
import torch
from monai.data.utils import set_rnd

from segment.config import ExperimentConfig


def rank_seed(seed: int, rank: int, epochs_done: int) -> int:
    """A 32-bit seed that differs for every (seed, rank, epochs done)."""
    return int(np.random.SeedSequence([seed, rank, epochs_done]).generate_state(1)[0])


def seed_epoch(seed: int, rank: int, epochs_done: int, transforms=None) -> None:
    """Seed this process for the epoch after ``epochs_done``; ``transforms`` (a MONAI dataset or
    Compose run in this process) get their own random states from the same seed."""
    value = rank_seed(seed, rank, epochs_done)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # every CUDA device too
    if transforms is not None:
        set_rnd(transforms, value)


def resolve_deterministic(config: ExperimentConfig, on_cuda: bool) -> bool:
    """``trainer.deterministic``, or its default: autotuning pays on CUDA only when every batch
    has one shape, which fixed-size patches (or slices cropped to one size) guarantee."""
    chosen = config.trainer.deterministic
    if chosen is not None:
        return chosen
    return not (on_cuda and config.data.patch_size is not None)


def configure_cudnn(deterministic: bool) -> None:
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
