"""Running a model over a whole volume: directly, by sliding window, or slice by slice (2D)."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference

from segment.engine.device import Runtime
from segment.models import Segmenter, SkipMask

SLICES_PER_BATCH = 16


@torch.no_grad()
def predict_logits(
    model: Segmenter,
    volume: torch.Tensor,
    runtime: Runtime,
    roi_size: tuple[int, ...] | None = None,
    sw_batch_size: int = 4,
    skips: SkipMask = None,
    progress: bool = False,
) -> torch.Tensor:
    """volume: (1, C, H, W, D) -> float32 logits (1, out_channels, H, W, D) on the CPU.

    A 2D model runs on the axial slices (the last axis) and the results are restacked."""
    model.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        batch = runtime.to_device(batch)
        with runtime.autocast():
            if roi_size is None:
                return model(batch, skips).float()
            return sliding_window_inference(
                batch,
                roi_size,
                sw_batch_size,
                lambda x: model(x, skips),
                overlap=0.25,
                mode="gaussian",
                progress=progress,
            ).float()

    if model.config.spatial_dims == 3:
        return run(volume).cpu()
    slices = volume[0].permute(3, 0, 1, 2)  # (D, C, H, W)
    outputs = [
        run(slices[start : start + SLICES_PER_BATCH]).cpu()
        for start in range(0, len(slices), SLICES_PER_BATCH)
    ]
    return torch.cat(outputs).permute(1, 2, 3, 0).unsqueeze(0)
