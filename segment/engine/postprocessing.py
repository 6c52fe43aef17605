"""Cleaning a predicted mask, as the user asks: per label, keep only its largest connected
component, and remove the components smaller than a minimum size. Voxels removed become
background. Components connect through faces, edges and corners (26 neighbours in 3D)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segment.errors import InputError


@dataclass(frozen=True)
class PostProcessing:
    keep_largest: bool = False
    min_size: float | None = None  # in the scan's spatial unit cubed (mm³ for scans in mm)

    def __post_init__(self) -> None:
        if self.min_size is not None and not self.min_size > 0:
            raise InputError(f"--min-size {self.min_size}: give a positive volume (mm³ for scans in mm).")

    @property
    def enabled(self) -> bool:
        return self.keep_largest or self.min_size is not None

    def describe(self, unit: str = "mm") -> str:
        steps = ["keep largest"] if self.keep_largest else []
        if self.min_size is not None:
            steps.append(f"min size {self.min_size:g} {unit}³")
        return ", ".join(steps) or "none"

    def variants(self) -> list[PostProcessing]:
        """Each step alone, then both together when both are asked for: what an evaluation
        compares with the raw mask."""
        alone = [PostProcessing(keep_largest=True)] if self.keep_largest else []
        if self.min_size is not None:
            alone.append(PostProcessing(min_size=self.min_size))
        return alone + ([self] if len(alone) > 1 else [])


def postprocess(labels: np.ndarray, voxel_volume: float, steps: PostProcessing) -> np.ndarray:
    """``labels`` (integer mask) after ``steps``; ``voxel_volume`` in the unit of ``min_size``."""
    if not steps.enabled:
        return labels
    cleaned = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        keep = np.ones(count, dtype=bool)
        if steps.keep_largest:
            keep[:] = False
            keep[int(np.argmax(sizes))] = True  # the first of equal largest ones
        if steps.min_size is not None:
            keep &= sizes * voxel_volume >= steps.min_size
        dropped = np.concatenate(([False], ~keep))[components]
        cleaned[dropped] = 0
    return cleaned
