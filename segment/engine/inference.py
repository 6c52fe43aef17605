"""The one inference path: a prepared volume and a skip mask in, logits out; and a prepared
scan in, labels on its own voxels out. Validation, prediction, evaluation and the viewer's explorer all run through
:func:`predict_logits`.

A model runs on the whole volume, by sliding window (``trainer.roi_size``), or, in 2D, on
batches of axial slices restacked into a volume.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.engine.preparation import PreparedScan
from segment.models import Segmenter, SkipMask

SLICES_PER_BATCH = 16


class FeatureCache:
    """The encoder's output for one volume, kept so that another skip mask re-runs only the
    decoder. It belongs to one volume and one model: make a new one for either."""

    def __init__(self) -> None:
        self.features: list | None = None


def _network_inputs(volume: torch.Tensor, spatial_dims: int) -> list[torch.Tensor]:
    """What the network runs on: the volume (1, C, X, Y, Z) itself (3D), or batches of its
    axial slices, each (N, C, X, Y) (2D)."""
    if spatial_dims == 3:
        return [volume]
    slices = volume[0].permute(3, 0, 1, 2)
    return [slices[start : start + SLICES_PER_BATCH] for start in range(0, len(slices), SLICES_PER_BATCH)]


def _as_volume(outputs: list[torch.Tensor], spatial_dims: int) -> torch.Tensor:
    """The network's outputs for :func:`_network_inputs` as one (1, C, X, Y, Z) tensor."""
    if spatial_dims == 3:
        return outputs[0]
    return torch.cat(outputs).permute(1, 2, 3, 0).unsqueeze(0)


@torch.no_grad()
def predict_logits(
    model: Segmenter,
    volume: torch.Tensor,
    runtime: Runtime,
    config: ExperimentConfig,
    skip_mask: SkipMask = None,
    *,
    cache: FeatureCache | None = None,
    progress: bool = False,
    on_device: bool = False,
) -> torch.Tensor:
    """volume: (1, C, X, Y, Z), prepared as in training -> float32 logits (1, out_channels,
    X, Y, Z) on the CPU, or left on the runtime's device with ``on_device``.

    ``config.trainer.roi_size`` set: MONAI's sliding window (gaussian-weighted, 25 % overlap).
    ``cache`` (whole-volume models only): the encoder runs once per volume and each further
    skip mask re-runs only the decoder."""
    model.eval()
    roi_size = config.trainer.roi_size
    inputs = _network_inputs(volume, model.config.spatial_dims)

    def run(batch: torch.Tensor) -> torch.Tensor:
        if roi_size is None:
            return model(batch, skip_mask)
        return sliding_window_inference(
            batch,
            roi_size,
            config.trainer.sw_batch_size,
            lambda x: model(x, skip_mask),
            overlap=0.25,
            mode="gaussian",
            progress=progress,
        )

    with runtime.autocast():
        if cache is not None and roi_size is None and cache.features is None:
            cache.features = [model.encode(runtime.to_device(batch)) for batch in inputs]
        features = cache.features if cache is not None and roi_size is None else None
        outputs = [
            (model.decode(features[index], skip_mask) if features else run(runtime.to_device(batch))).float()
            for index, batch in enumerate(inputs)
        ]
    if not on_device:
        outputs = [output.cpu() for output in outputs]
    return _as_volume(outputs, model.config.spatial_dims)


def predict_labels(
    model: Segmenter,
    prepared: PreparedScan,
    runtime: Runtime,
    config: ExperimentConfig,
    skip_mask: SkipMask = None,
    **options,
) -> np.ndarray:
    """Integer labels for a prepared scan, in the scan's own voxel grid; ``options`` (``cache``,
    ``progress``) as for :func:`predict_logits`."""
    return prepared.restore(
        predict_logits(model, prepared.volume, runtime, config, skip_mask, **options).argmax(dim=1)
    )
