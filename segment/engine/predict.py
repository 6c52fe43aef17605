"""Scan in, mask out: the one prediction path shared by the CLI and the viewer.

prepared = prepare(scan, config)              # RAS, normalised, as the model was trained
logits = predict_logits(model, prepared.volume, ...)
mask = prepared.restore(logits.argmax(1))     # back on the scan's own voxel grid
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor

from segment.config import ExperimentConfig
from segment.data.transforms import IMAGE, orient_and_normalise
from segment.engine.device import Runtime
from segment.engine.inference import predict_logits
from segment.io import Scan, ScanError
from segment.models import Segmenter, SkipMask

PREDICTION = "prediction"


@dataclass
class PreparedScan:
    """A scan as the model sees it, plus what is needed to map results back onto the scan."""

    volume: torch.Tensor  # (1, 1, X, Y, Z) float32, RAS, normalised
    data: dict
    transform: T.Compose

    def restore(self, labels: torch.Tensor) -> np.ndarray:
        """labels: (1, X, Y, Z) or (1, 1, X, Y, Z) integers in the model's grid -> uint8 array
        in the scan's own voxel order and shape."""
        labels = labels.reshape(1, *self.volume.shape[2:])
        # Crop away the padding a tiny volume was given (see _pad_tiny).
        labels = labels[(slice(None), *(slice(0, size) for size in self.data[IMAGE].shape[1:]))]
        # The prediction lives on the transformed image's grid: same metadata, same history.
        prediction = MetaTensor(labels.to(torch.float32), meta=dict(self.data[IMAGE].meta))
        prediction.applied_operations = list(self.data[IMAGE].applied_operations)
        inverted = T.Invertd(PREDICTION, transform=self.transform, orig_keys=IMAGE, nearest_interp=True)(
            {**self.data, PREDICTION: prediction}
        )
        return np.asarray(inverted[PREDICTION][0]).round().astype(np.uint8)


def prepare(scan: Scan, config: ExperimentConfig) -> PreparedScan:
    """Orient and normalise ``scan`` exactly as the training pipeline did.

    :class:`ScanError` if the scan is a 2D image and the model a 3D one."""
    if scan.spatial_dims == 2 and config.model.spatial_dims == 3:
        raise ScanError(
            f"{scan.path.name} is a 2D image but {config.name} is a 3D model; "
            "give it a 3D volume, or use a 2D model."
        )
    transform = T.Compose(orient_and_normalise(config, (IMAGE,), keep_meta=True))
    image = MetaTensor(torch.from_numpy(scan.array[None].copy()), affine=torch.from_numpy(scan.affine))
    data = transform({IMAGE: image})
    return PreparedScan(_pad_tiny(data[IMAGE].as_tensor()[None], config), data, transform)


def _pad_tiny(volume: torch.Tensor, config: ExperimentConfig) -> torch.Tensor:
    """``volume`` (1, C, X, Y, Z), padded at the far end of each axis if it is too small for
    the network; :meth:`PreparedScan.restore` crops the prediction back.

    Instance norm needs more than one voxel per feature map, and each level halves the size
    (rounding up): a volume with no axis longer than 2**(levels-1) is one voxel at the
    coarsest level. Such a volume is padded to 2**(levels-1) + 1 along every axis, repeating
    its edge values; a 2D model pads only the in-slice axes. Real scans are never touched."""
    coarsest = 2 ** (config.model.levels - 1)
    spatial = volume.shape[2:] if config.model.spatial_dims == 3 else volume.shape[2:4]
    if max(spatial) > coarsest:
        return volume
    padding = [0, 0] * (3 - len(spatial))  # torch.nn.functional.pad lists the last axis first
    for size in reversed(spatial):
        padding += [0, coarsest + 1 - size]
    return torch.nn.functional.pad(volume, padding, mode="replicate")


def segment_scan(
    model: Segmenter,
    config: ExperimentConfig,
    scan: Scan,
    runtime: Runtime,
    skips: SkipMask = None,
    progress: bool = False,
) -> np.ndarray:
    """Integer labels for ``scan``, same shape and voxel order as ``scan.array``."""
    return predict_prepared(model, config, prepare(scan, config), runtime, skips, progress)


def predict_prepared(
    model: Segmenter,
    config: ExperimentConfig,
    prepared: PreparedScan,
    runtime: Runtime,
    skips: SkipMask = None,
    progress: bool = False,
) -> np.ndarray:
    """Integer labels for an already prepared scan, in the scan's own voxel grid."""
    logits = predict_logits(
        model,
        prepared.volume,
        runtime,
        config.trainer.roi_size,
        config.trainer.sw_batch_size,
        skips,
        progress,
    )
    return prepared.restore(logits.argmax(dim=1))
