"""Several U-Nets of one task as one segmenter: the mean of their softmax outputs (nnU-Net's
way of ensembling). A skip mask switches the same long skips off in every member, so
prediction, evaluation, the skip ablation and the viewer treat an ensemble like one U-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segment.config import ExperimentConfig
from segment.models.unet import SkipMask, UNet

# What members must agree on to be averaged: one way of preparing a scan, one label set, one
# grid of outputs, one set of long skips. Width, encoder and training recipe may differ.
SHARED_SETTINGS = {
    "data": ("task", "modality", "ct_window", "ct_foreground", "clip_percentiles", "spacing"),
    "model": ("spatial_dims", "in_channels", "out_channels", "levels"),
    "trainer": ("roi_size", "sw_batch_size"),
}


# What picks a model's validation cases. Members that disagree on it (the folds of a
# cross-validation) have each trained on cases another member validates on, so their ensemble
# has no held-out split of its own.
SPLIT_SETTINGS = {"data": ("val_fraction", "split_seed", "folds", "fold", "max_cases")}


def first_difference(
    first: ExperimentConfig, other: ExperimentConfig, settings: dict[str, tuple[str, ...]]
) -> str | None:
    """The first of ``settings`` (section -> keys) two configs disagree on, as ``section.key``."""
    for section, keys in settings.items():
        for key in keys:
            if getattr(getattr(first, section), key) != getattr(getattr(other, section), key):
                return f"{section}.{key}"
    return None


def mismatch(first: ExperimentConfig, other: ExperimentConfig) -> str | None:
    """The first setting two members' configs disagree on, as ``section.key``; None if none."""
    if (setting := first_difference(first, other, SHARED_SETTINGS)) is not None:
        return setting
    if first.label_names != other.label_names:
        return "labels"
    if first.model.built_skips != other.model.built_skips:
        return "model.long_skips"
    # Long skip k must carry the same resolution in every member for a skip mask to mean one thing.
    if first.model.pool_factors != other.model.pool_factors:
        return "model.pooling"
    return None


def split_mismatch(configs: Sequence[ExperimentConfig]) -> str | None:
    """The first setting that gives members different validation cases, as ``section.key``."""
    for other in configs[1:]:
        if (setting := first_difference(configs[0], other, SPLIT_SETTINGS)) is not None:
            return setting
    return None


class UNetEnsemble(nn.Module):
    """Inference only: ``forward`` returns the log of the members' mean softmax, so its softmax
    is that mean and its argmax is the ensemble's labels."""

    def __init__(self, members: Sequence[UNet]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("An ensemble needs at least two members.")
        self.members = nn.ModuleList(members)
        # Depth, dimensions and skips are shared (see SHARED_SETTINGS), so the first member's
        # config answers for all of them.
        self.config = members[0].config

    @property
    def num_skips(self) -> int:
        return self.members[0].num_skips

    def resolve_skip_mask(self, skip_mask: SkipMask) -> tuple[bool, ...]:
        return self.members[0].resolve_skip_mask(skip_mask)

    def encode(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each member's encoder features, in member order."""
        return [member.encode(x) for member in self.members]

    def decode(self, features: Sequence[Sequence[torch.Tensor]], skip_mask: SkipMask = None) -> torch.Tensor:
        probabilities = [
            member.decode(member_features, skip_mask).float().softmax(dim=1)
            for member, member_features in zip(self.members, features, strict=True)
        ]
        return torch.stack(probabilities).mean(dim=0).log()

    def forward(self, x: torch.Tensor, skip_mask: SkipMask = None) -> torch.Tensor:
        return self.decode(self.encode(x), skip_mask)


Segmenter = UNet | UNetEnsemble
"""What prediction, evaluation and the viewer run: one U-Net or an ensemble of them."""
