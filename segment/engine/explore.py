"""Switching skips on one scan interactively: encode once, re-run only the decoder per setting.

This is the library side of the viewer: it holds no per-user state beyond one scan, and the
model it is given is never modified (the skip mask is an argument), so one loaded model can
serve many explorers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.engine.evaluate import CaseScores, score_case
from segment.engine.inference import SLICES_PER_BATCH, predict_logits
from segment.engine.predict import PreparedScan, prepare
from segment.io import Scan
from segment.models import Segmenter, SkipMask


@dataclass(frozen=True)
class MaskChange:
    """How a mask differs from a reference mask of the same scan."""

    lost: np.ndarray  # bool, labelled in the reference, not (or otherwise) in the mask
    gained: np.ndarray  # bool, labelled in the mask, not (or otherwise) in the reference
    volume_change: dict[str, float]  # per label: mask volume minus reference volume, in the scan's volume unit
    dice_to_reference: dict[str, float]  # per label: agreement of the two masks


class SkipExplorer:
    """One scan under one model: masks for any skip setting, computed from cached features.

    Whole-volume models cache the encoder output once; a sliding-window model (one whose
    config sets ``trainer.roi_size``) re-runs the whole network per setting."""

    def __init__(self, model: Segmenter, config: ExperimentConfig, scan: Scan, runtime: Runtime) -> None:
        self.model, self.config, self.scan, self.runtime = model, config, scan, runtime
        self.prepared: PreparedScan = prepare(scan, config)
        self._features: list[list[torch.Tensor]] | None = None
        self._masks: dict[tuple[bool, ...], np.ndarray] = {}

    @property
    def caches_features(self) -> bool:
        return self.config.trainer.roi_size is None

    def _encode(self) -> list[list[torch.Tensor]]:
        """Encoder features per chunk: the whole volume (3D) or batches of axial slices (2D)."""
        if self._features is None:
            with torch.no_grad(), self.runtime.autocast():
                self._features = [
                    self.model.encode(self.runtime.to_device(chunk)) for chunk in self._chunks()
                ]
        return self._features

    def _chunks(self) -> list[torch.Tensor]:
        volume = self.prepared.volume
        if self.model.config.spatial_dims == 3:
            return [volume]
        slices = volume[0].permute(3, 0, 1, 2)
        return [slices[start : start + SLICES_PER_BATCH] for start in range(0, len(slices), SLICES_PER_BATCH)]

    def _labels(self, skips: tuple[bool, ...]) -> torch.Tensor:
        """Argmax labels (1, X, Y, Z) in the model's grid for one skip setting."""
        if not self.caches_features:
            return predict_logits(
                self.model,
                self.prepared.volume,
                self.runtime,
                self.config.trainer.roi_size,
                self.config.trainer.sw_batch_size,
                skips,
            ).argmax(dim=1)
        with torch.no_grad(), self.runtime.autocast():
            outputs = [self.model.decode(features, skips).argmax(dim=1).cpu() for features in self._encode()]
        if self.model.config.spatial_dims == 3:
            return outputs[0]
        return torch.cat(outputs).permute(1, 2, 0).unsqueeze(0)

    def mask(self, skips: SkipMask = None) -> np.ndarray:
        """Integer labels in the scan's own voxel grid for this skip setting (cached)."""
        key = self.model.resolve_skips(skips)
        if key not in self._masks:
            self.model.eval()
            self._masks[key] = self.prepared.restore(self._labels(key))
        return self._masks[key]

    def compare(self, mask: np.ndarray, reference: np.ndarray) -> MaskChange:
        """What changed between ``reference`` (e.g. all skips on) and ``mask``."""
        volume_change, dice = {}, {}
        for value, name in self.config.label_names.items():
            if value == 0:
                continue
            in_mask, in_reference = mask == value, reference == value
            volume_change[name] = (int(in_mask.sum()) - int(in_reference.sum())) * self.scan.voxel_volume
            total = int(in_mask.sum()) + int(in_reference.sum())
            dice[name] = 1.0 if total == 0 else 2.0 * int((in_mask & in_reference).sum()) / total
        differs = mask != reference
        return MaskChange(differs & (reference > 0), differs & (mask > 0), volume_change, dice)

    def score(self, mask: np.ndarray, truth: np.ndarray) -> CaseScores:
        """Dice, HD95 and NSD of ``mask`` against a ground-truth label array of the same grid."""
        return score_case(
            self.scan.path.name,
            mask,
            truth.round().astype(np.int64),
            self.scan,
            self.config.label_names,
        )
