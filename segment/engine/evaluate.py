"""Scoring masks against ground truth (Dice, HD95, NSD, volume) and the skip-ablation sweep."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from segment.config import ExperimentConfig
from segment.data.tasks import case_id
from segment.engine.device import Runtime
from segment.engine.predict import predict_prepared, prepare
from segment.io import Scan, ScanError, read_scan
from segment.models import Segmenter

# In the scan's spatial unit, which for clinical scans is the millimetre.
NSD_TOLERANCE = 1.0
# MONAI's own surface-distance code passes an argument it has itself deprecated; the warning
# says nothing a user of this module can act on.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)


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
        raise ValueError(f"{case}: prediction {prediction.shape} and label {truth.shape} differ in shape")
    classes = max(label_names) + 1
    if truth.min() < 0 or truth.max() >= classes:
        raise ScanError(
            f"{case}: the ground truth holds label values {int(truth.min())}..{int(truth.max())} but the "
            f"model knows 0..{classes - 1} ({', '.join(label_names.values())}); check that it labels this task."
        )
    predicted, expected = (
        one_hot(torch.as_tensor(labels.astype(np.int64))[None, None], classes)
        for labels in (prediction, truth)
    )
    dice = compute_dice(predicted, expected, include_background=False, ignore_empty=False)[0]
    spacing = list(scan.spacing)
    tolerance = default_nsd_tolerance(scan) if nsd_tolerance is None else nsd_tolerance
    hd95 = compute_hausdorff_distance(predicted, expected, percentile=95, spacing=spacing)[0]
    nsd = compute_surface_dice(predicted, expected, [tolerance] * (classes - 1), spacing=spacing)[0]
    scores = CaseScores(case, scan.unit, tolerance, scan.volume_unit)
    for index, value in enumerate(range(1, classes)):
        name = label_names.get(value, str(value))
        present = (prediction == value).any(), (truth == value).any()
        scores.dice[name] = float(dice[index])
        scores.hd95[name] = float(hd95[index]) if all(present) else math.nan
        # Both empty: nothing to find and nothing found, a perfect boundary score.
        scores.nsd[name] = 1.0 if not any(present) else float(nsd[index]) if all(present) else 0.0
        scores.volume[name] = float((prediction == value).sum()) * scan.voxel_volume
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


def skip_settings(built: Sequence[bool], full_sweep: bool = False) -> list[tuple[int, ...]]:
    """The model's own skips (``built``, finest first), each of them off alone, all off; or
    every combination of them with ``full_sweep``. The first setting is the model as trained.

    A skip the model was built without stays off in every setting: switching it on would feed
    features to weights that never saw any."""
    if full_sweep:
        combinations = itertools.product((1, 0), repeat=len(built))
        ordered = sorted(combinations, key=lambda s: (-sum(s), [-v for v in s]))
    else:
        one_off = [tuple(int(level != off) for level in range(len(built))) for off in range(len(built))]
        ordered = [(1,) * len(built), *one_off, (0,) * len(built)]
    settings = (tuple(int(on and has) for on, has in zip(setting, built, strict=True)) for setting in ordered)
    return list(dict.fromkeys(settings))


def evaluate_cases(
    model: Segmenter,
    config: ExperimentConfig,
    cases: list[dict[str, str]],
    runtime: Runtime,
    label_names: dict[int, str],
    settings: list[tuple[int, ...]],
    progress: bool = False,
    nsd_tolerance: float | None = None,
) -> dict[tuple[int, ...], list[CaseScores]]:
    """Score ``model`` on labelled ``cases`` (dicts with image and label paths) under each skip
    setting. Each scan is read and prepared once; only the network re-runs per setting.

    Without ``nsd_tolerance``, the first scan sets it (:func:`default_nsd_tolerance`) for every
    case, so that all NSDs in a mean count the same distance; the scans must share one unit."""
    results: dict[tuple[int, ...], list[CaseScores]] = {setting: [] for setting in settings}
    first: Scan | None = None
    for case in tqdm(cases, desc="cases", disable=not progress):
        scan, label = read_scan(case["image"]), read_scan(case["label"])
        if label.array.shape != scan.array.shape or not np.allclose(label.affine, scan.affine, atol=1e-3):
            raise ScanError(
                f"{case_id(case)}: the label's shape or affine differs from the image's; "
                f"check that {label.path.name} is the labelling of {scan.path.name}."
            )
        if first is None:
            first = scan
            nsd_tolerance = default_nsd_tolerance(scan) if nsd_tolerance is None else nsd_tolerance
        elif scan.unit != first.unit:
            raise ScanError(
                f"{case_id(case)} is in {scan.unit} but {first.path.name} is in {first.unit}; "
                "evaluate scans of one spatial unit together, so that distances and volumes average."
            )
        truth = label.array.round().astype(np.int64)
        prepared = prepare(scan, config)
        for setting in settings:
            prediction = predict_prepared(model, config, prepared, runtime, setting)
            results[setting].append(
                score_case(case_id(case), prediction, truth, scan, label_names, nsd_tolerance)
            )
    return results


def evaluation_report(
    model_name: str,
    results: dict[tuple[int, ...], list[CaseScores]],
    ablation: bool,
) -> dict:
    """The documented JSON shape (README, "Evaluation")."""
    settings = list(results)
    baseline = results[settings[0]]
    dice = mean_scores(baseline, "dice")
    report = {
        "model": model_name,
        "cases": len(baseline),
        "unit": baseline[0].unit,
        "mean_dice": float(np.mean(list(dice.values()))),
        "dice": dice,
        "hd95": mean_scores(baseline, "hd95"),
        "nsd": mean_scores(baseline, "nsd"),
        "nsd_tolerance": baseline[0].nsd_tolerance,
        "volume": mean_scores(baseline, "volume"),
        "volume_unit": baseline[0].volume_unit,
        "per_case": [
            {metric: getattr(case, metric) for metric in ("case", "dice", "hd95", "nsd", "volume")}
            for case in baseline
        ],
    }
    if ablation:
        report["ablation"] = []
        for setting in settings:
            setting_dice = mean_scores(results[setting], "dice")
            report["ablation"].append(
                {
                    "skips": list(setting),
                    "mean_dice": float(np.mean(list(setting_dice.values()))),
                    "dice": setting_dice,
                    "hd95": mean_scores(results[setting], "hd95"),
                    "nsd": mean_scores(results[setting], "nsd"),
                }
            )
    return report
