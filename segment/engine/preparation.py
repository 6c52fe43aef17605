"""A scan as the model sees it, and back: the model's orientation and normalisation on the
way in, the scan's own voxel grid on the way out.

prepared = prepare(scan, config)              # RAS, normalised, as the model was trained
labels = prepared.restore(logits.argmax(1))   # back on the scan's own voxel grid
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor

from segment.config import ExperimentConfig
from segment.data.transforms import IMAGE, orient_and_normalise, scan_as_tensor
from segment.io import Scan, ScanError

PREDICTION = "prediction"


@dataclass
class PreparedScan:
    """A scan as the model sees it, plus what is needed to map results back onto the scan."""

    volume: torch.Tensor  # (1, C, X, Y, Z) float32, RAS, normalised
    data: dict
    transform: T.Compose

    def restore(self, labels: torch.Tensor) -> np.ndarray:
        """labels: (1, X, Y, Z) or (1, 1, X, Y, Z) integers in the model's grid -> uint8 array
        in the scan's own voxel order and shape."""
        labels = labels.reshape(1, *self.volume.shape[2:])
        return self._invert(labels, nearest=True)[0].round().astype(np.uint8)

    def restore_maps(self, maps: torch.Tensor) -> np.ndarray:
        """maps: (1, C, X, Y, Z) values in the model's grid (probabilities, uncertainty) ->
        float32 (X, Y, Z, C) in the scan's own voxel order, interpolated linearly."""
        return np.moveaxis(self._invert(maps[0], nearest=False), 0, -1)

    def _invert(self, channels: torch.Tensor, nearest: bool) -> np.ndarray:
        # Crop away the padding a tiny volume was given (see _pad_tiny).
        channels = channels[(slice(None), *(slice(0, size) for size in self.data[IMAGE].shape[1:]))]
        # The result lives on the transformed image's grid: same metadata, same history.
        prediction = MetaTensor(channels.to(torch.float32), meta=dict(self.data[IMAGE].meta))
        prediction.applied_operations = list(self.data[IMAGE].applied_operations)
        inverted = T.Invertd(PREDICTION, transform=self.transform, orig_keys=IMAGE, nearest_interp=nearest)(
            {**self.data, PREDICTION: prediction}
        )
        return np.asarray(inverted[PREDICTION])


def prepare(scan: Scan, config: ExperimentConfig) -> PreparedScan:
    """Orient and normalise ``scan`` exactly as the training pipeline did.

    :class:`ScanError` if the scan is a 2D image and the model a 3D one, or if its channels
    are not the model's inputs (a scan read for another model)."""
    if scan.spatial_dims == 2 and config.model.spatial_dims == 3:
        raise ScanError(
            f"{scan.path.name} is a 2D image but {config.name} is a 3D model; "
            "give it a 3D volume, or use a 2D model."
        )
    if scan.channels != config.model.in_channels:
        raise ScanError(
            f"{scan.path.name} has {scan.channels} channel{'s' if scan.channels > 1 else ''} but "
            f"{config.name} reads {config.model.in_channels}; give a scan with one channel per model input."
        )
    transform = T.Compose(orient_and_normalise(config, (IMAGE,), keep_meta=True))
    data = transform({IMAGE: scan_as_tensor(scan)})
    return PreparedScan(_pad_tiny(data[IMAGE].as_tensor()[None], config), data, transform)


def _pad_tiny(volume: torch.Tensor, config: ExperimentConfig) -> torch.Tensor:
    """``volume`` (1, C, X, Y, Z), padded at the far end of each axis if it is too small for
    the network; :meth:`PreparedScan.restore` crops the prediction back.

    Instance norm needs more than one voxel per feature map, and each level divides the size
    by its pooling factor per axis (rounding up): one voxel of the coarsest level spans
    ``level_scales[-1]`` voxels (2**(levels-1) along every axis by default), so a volume no
    longer than that along any axis is one voxel there. Such a volume is padded to that span
    + 1 along every axis, repeating its edge values; a 2D model pads only the in-slice axes.
    Real scans are never touched."""
    coarsest = config.model.level_scales[-1]
    spatial = volume.shape[2:] if config.model.spatial_dims == 3 else volume.shape[2:4]
    if any(size > span for size, span in zip(spatial, coarsest, strict=True)):
        return volume
    padding = [0, 0] * (3 - len(spatial))  # torch.nn.functional.pad lists the last axis first
    for size, span in zip(reversed(spatial), reversed(coarsest), strict=True):
        padding += [0, span + 1 - size]
    return torch.nn.functional.pad(volume, padding, mode="replicate")
