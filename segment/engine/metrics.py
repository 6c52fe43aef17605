"""Scores of a mask against a reference, per label: one Dice for training, evaluation and the
viewer, and HD95, NSD and volume. MONAI computes each; this module fixes the conventions."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

from segment.io import Scan, ScanError

# In the scan's spatial unit, which for clinical scans is the millimetre.
NSD_TOLERANCE = 1.0


@contextmanager
def _quiet_surface_distances() -> Iterator[None]:
    """MONAI's surface distances without two warnings a caller cannot act on, and only
    around them: its own code passes an argument it has deprecated, and a label missing from
    the prediction or the truth is scored on purpose here (no HD95, an NSD of 0 or 1), which
    its empty-surface warning would repeat per case and label."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message="the (prediction|ground truth) of class .* is all 0", category=UserWarning
        )
        yield


def label_one_hot(labels: np.ndarray | torch.Tensor, classes: int) -> torch.Tensor:
    """Integer labels (*spatial) -> (1, classes, *spatial) one-hot floats, on the labels' device."""
    if isinstance(labels, torch.Tensor):
        tensor = labels.long()
    else:
        tensor = torch.as_tensor(np.asarray(labels).astype(np.int64))
    return one_hot(tensor[None, None], classes)


def _dice(predicted: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """One-hot (1, classes, ...) pair -> Dice of each foreground label; a label absent from
    both counts as a perfect 1.0, as in the Decathlon's scoring."""
    return compute_dice(predicted, expected, include_background=False, ignore_empty=False)[0]


def dice_per_label(
    prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, classes: int
) -> torch.Tensor:
    """Dice of each foreground label 1..classes-1 (a tensor of classes-1 values) between two
    integer label arrays of one shape."""
    return _dice(label_one_hot(prediction, classes), label_one_hot(truth, classes))


def default_nsd_tolerance(scan: Scan) -> float:
    """1 mm for clinical scans; two of the finest voxels for a scan in another unit (EM, in
    micrometres), where a millimetre would cover the whole image."""
    return NSD_TOLERANCE if scan.unit == "mm" else 2 * min(scan.spacing)


@dataclass
class CaseScores:
    """Per-label scores of one case, keyed by label name; distances in the scan's ``unit``."""

    case: str
    unit: str = "mm"
    nsd_tolerance: float = NSD_TOLERANCE
    volume_unit: str = "mL"
    dice: dict[str, float] = field(default_factory=dict)
    hd95: dict[str, float] = field(default_factory=dict)  # NaN when either mask is empty
    nsd: dict[str, float] = field(default_factory=dict)
    volume: dict[str, float] = field(default_factory=dict)  # of the prediction, in volume_unit

    METRICS = ("dice", "hd95", "nsd", "volume")


def score_case(
    case: str,
    prediction: np.ndarray,
    truth: np.ndarray,
    scan: Scan,
    label_names: dict[int, str],
    nsd_tolerance: float | None = None,
) -> CaseScores:
    """prediction, truth: integer label arrays in ``scan``'s voxel grid, whose spacing and unit
    the distances and volumes take; the NSD tolerance defaults to :func:`default_nsd_tolerance`."""
    if prediction.shape != truth.shape:
        raise ScanError(
            f"{case}: the prediction {prediction.shape} and the label {truth.shape} differ in shape."
        )
    classes = max(label_names) + 1
    if truth.min() < 0 or truth.max() >= classes:
        raise ScanError(
            f"{case}: the ground truth holds label values {int(truth.min())}..{int(truth.max())} but the "
            f"model knows 0..{classes - 1} ({', '.join(label_names.values())}); check that it labels this task."
        )
    predicted, expected = label_one_hot(prediction, classes), label_one_hot(truth, classes)
    dice = _dice(predicted, expected)
    spacing = list(scan.spacing)
    tolerance = default_nsd_tolerance(scan) if nsd_tolerance is None else nsd_tolerance
    with _quiet_surface_distances():
        hd95 = compute_hausdorff_distance(predicted, expected, percentile=95, spacing=spacing)[0]
    nsd = surface_dice_per_label(prediction, truth, classes, tolerance, spacing, (predicted, expected))
    scores = CaseScores(case, scan.unit, tolerance, scan.volume_unit)
    for index, value in enumerate(range(1, classes)):
        name = label_names.get(value, str(value))
        predicted_voxels = int((prediction == value).sum())
        scores.dice[name] = float(dice[index])
        scores.hd95[name] = float(hd95[index]) if predicted_voxels and (truth == value).any() else math.nan
        scores.nsd[name] = nsd[index]
        scores.volume[name] = predicted_voxels * scan.voxel_volume
    return scores


def surface_dice_per_label(
    prediction: np.ndarray,
    truth: np.ndarray,
    classes: int,
    tolerance: float,
    spacing: list[float],
    one_hot: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """NSD of each foreground label within ``tolerance`` (in the unit of ``spacing``); a label
    absent from both masks scores 1 (nothing to find, nothing found), from one of them 0.
    ``one_hot``: the pair already encoded, when the caller has it."""
    predicted, expected = one_hot or (label_one_hot(prediction, classes), label_one_hot(truth, classes))
    with _quiet_surface_distances():
        values = compute_surface_dice(predicted, expected, [tolerance] * (classes - 1), spacing=spacing)[0]
    scores = []
    for index, value in enumerate(range(1, classes)):
        present = (prediction == value).any(), (truth == value).any()
        scores.append(1.0 if not any(present) else float(values[index]) if all(present) else 0.0)
    return scores


def mean_scores(cases: list[CaseScores], metric: str) -> dict[str, float]:
    """Mean of one metric over cases per label, ignoring NaN (undefined HD95)."""
    names = getattr(cases[0], metric).keys()
    means = {}
    for name in names:
        values = [getattr(case, metric)[name] for case in cases]
        finite = [v for v in values if not math.isnan(v)]
        means[name] = float(np.mean(finite)) if finite else math.nan
    return means
