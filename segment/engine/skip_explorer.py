"""Switching skips on one scan interactively: encode once, re-run only the decoder per skip mask.

This is the library side of the viewer: it holds no per-user state beyond one scan, and the
model it is given is never modified (the skip mask is an argument), so one loaded model can
serve many explorers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.engine.inference import FeatureCache, predict_labels
from segment.engine.metrics import CaseScores, dice_per_label, score_case
from segment.engine.preparation import PreparedScan, prepare
from segment.engine.uncertainty import DEFAULT_SAMPLES, estimate
from segment.io import Scan
from segment.models import Segmenter, SkipMask


@dataclass(frozen=True)
class MaskChange:
    """How a mask differs from a reference mask of the same scan."""

    lost: np.ndarray  # bool, labelled in the reference, not (or otherwise) in the mask
    gained: np.ndarray  # bool, labelled in the mask, not (or otherwise) in the reference
    volume_change: dict[
        str, float
    ]  # per label: mask volume minus reference volume, in the scan's volume unit
    dice_to_reference: dict[str, float]  # per label: agreement of the two masks


@dataclass(frozen=True)
class UncertaintyMap:
    """How unsure the model is of each voxel under one skip mask."""

    entropy: np.ndarray  # float32 in [0, 1] on the scan's voxel grid: 0 certain, 1 uniform
    source: str  # how the samples were drawn, for the user


class SkipExplorer:
    """One scan under one model: masks for any skip mask, computed from cached features.

    Whole-volume models cache the encoder output once; a sliding-window model (one whose
    config sets ``trainer.roi_size``) re-runs the whole network per mask."""

    def __init__(self, model: Segmenter, config: ExperimentConfig, scan: Scan, runtime: Runtime) -> None:
        self.model, self.config, self.scan, self.runtime = model, config, scan, runtime
        self.prepared: PreparedScan = prepare(scan, config)
        self._features = FeatureCache()
        self._masks: dict[tuple[bool, ...], np.ndarray] = {}
        self._uncertainty: dict[tuple[bool, ...], UncertaintyMap] = {}

    def mask(self, skip_mask: SkipMask = None) -> np.ndarray:
        """Integer labels in the scan's own voxel grid for this skip mask (cached)."""
        key = self.model.resolve_skip_mask(skip_mask)
        if key not in self._masks:
            self._masks[key] = predict_labels(
                self.model, self.prepared, self.runtime, self.config, key, cache=self._features
            )
        return self._masks[key]

    def uncertainty(self, skip_mask: SkipMask = None, samples: int = DEFAULT_SAMPLES) -> UncertaintyMap:
        """The entropy of the mean softmax over the model's samples (an ensemble's members, or
        skip settings drawn with its skip dropout, the switched-off skips kept off), cached."""
        key = self.model.resolve_skip_mask(skip_mask)
        if key not in self._uncertainty:
            found = estimate(
                self.model, self.prepared.volume, self.runtime, self.config, key, samples, cache=self._features
            )
            entropy = self.prepared.restore_maps(found.entropy)[..., 0]
            self._uncertainty[key] = UncertaintyMap(np.clip(entropy, 0.0, 1.0), found.source)
        return self._uncertainty[key]

    def compare(self, mask: np.ndarray, reference: np.ndarray) -> MaskChange:
        """What changed between ``reference`` (e.g. all skips on) and ``mask``."""
        labels = {value: name for value, name in self.config.label_names.items() if value > 0}
        dice = dice_per_label(mask, reference, max(self.config.label_names) + 1).tolist()
        volume_change = {
            name: (int((mask == value).sum()) - int((reference == value).sum())) * self.scan.voxel_volume
            for value, name in labels.items()
        }
        differs = mask != reference
        return MaskChange(
            differs & (reference > 0),
            differs & (mask > 0),
            volume_change,
            {name: dice[value - 1] for value, name in labels.items()},
        )

    def score(self, mask: np.ndarray, truth: np.ndarray) -> CaseScores:
        """Dice, HD95 and NSD of ``mask`` against a ground-truth label array of the same grid."""
        return score_case(
            self.scan.path.name,
            mask,
            truth.round().astype(np.int64),
            self.scan,
            self.config.label_names,
        )
