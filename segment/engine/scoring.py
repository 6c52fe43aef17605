"""Scoring a model on labelled cases: Dice on the cached validation volumes while it trains,
and every metric on scans read from disk, under each skip mask of an ablation and after each
post-processing asked for."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import CumulativeAverage
from tqdm.auto import tqdm

from segment.config import ExperimentConfig
from segment.data.tasks import case_id
from segment.engine.device import Runtime
from segment.engine.inference import FeatureCache, predict_labels, predict_logits
from segment.engine.metrics import CaseScores, default_nsd_tolerance, dice_per_label, score_case
from segment.engine.postprocessing import PostProcessing, postprocess
from segment.engine.preparation import prepare
from segment.io import Scan, ScanError, check_label_matches, read_scan
from segment.models import Segmenter, SkipMask


def validation_dice(
    model: Segmenter,
    dataset,
    runtime: Runtime,
    config: ExperimentConfig,
    label_names: dict[int, str],
    skip_mask: SkipMask = None,
) -> dict[str, float]:
    """Mean Dice over the cases of ``dataset`` (prepared volumes and labels) for each
    foreground label, keyed by label name, computed on the runtime's device. Under torchrun
    each process scores its share and MONAI's average gathers them."""
    classes = config.model.out_channels
    average = CumulativeAverage()
    for case in dataset:
        logits = predict_logits(model, case["image"][None], runtime, config, skip_mask, on_device=True)
        truth = torch.as_tensor(case["label"][0]).to(logits.device)
        average.append(dice_per_label(logits.argmax(dim=1)[0], truth, classes))
    scores = np.atleast_1d(average.aggregate(to_numpy=True)).tolist()
    return {
        label_names.get(value, str(value)): score
        for value, score in zip(range(1, classes), scores, strict=True)
    }


def mean_dice(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def ablation_masks(built: Sequence[bool], full_sweep: bool = False) -> list[tuple[int, ...]]:
    """The skip masks of an ablation: the model's own long skips (``built``, finest first),
    each of them off alone, all off; or every combination with ``full_sweep``. The first mask
    is the model as trained.

    A skip the model was built without stays off in every mask: switching it on would feed
    features to weights that never saw any."""
    if full_sweep:
        combinations = itertools.product((1, 0), repeat=len(built))
        ordered = sorted(combinations, key=lambda s: (-sum(s), [-v for v in s]))
    else:
        one_off = [tuple(int(level != off) for level in range(len(built))) for off in range(len(built))]
        ordered = [(1,) * len(built), *one_off, (0,) * len(built)]
    masks = (tuple(int(on and has) for on, has in zip(mask, built, strict=True)) for mask in ordered)
    return list(dict.fromkeys(masks))


@dataclass
class ScoredCases:
    """Per-case scores under each skip mask, and of the model's own mask (the first skip mask)
    after each post-processing."""

    by_skip_mask: dict[tuple[int, ...], list[CaseScores]]
    by_postprocessing: dict[PostProcessing, list[CaseScores]] = field(default_factory=dict)


def score_cases(
    model: Segmenter,
    config: ExperimentConfig,
    cases: list[dict[str, str]],
    runtime: Runtime,
    label_names: dict[int, str],
    skip_masks: list[tuple[int, ...]],
    progress: bool = False,
    nsd_tolerance: float | None = None,
    postprocessing: Sequence[PostProcessing] = (),
) -> ScoredCases:
    """Score ``model`` on labelled ``cases`` (dicts with image and label paths) under each skip
    mask, and its first mask's prediction after each of ``postprocessing``. Each scan is read
    and prepared once; only the network re-runs per mask, and a whole-volume model only its
    decoder.

    Without ``nsd_tolerance``, the first scan sets it (:func:`default_nsd_tolerance`) for every
    case, so that all NSDs in a mean count the same distance; the scans must share one unit."""
    scored = ScoredCases({mask: [] for mask in skip_masks}, {steps: [] for steps in postprocessing})
    first: Scan | None = None
    for case in tqdm(cases, desc="cases", disable=not progress):
        scan, label = read_scan(case["image"], config.model.in_channels), read_scan(case["label"])
        check_label_matches(label, scan)
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
        cache = FeatureCache()
        for index, mask in enumerate(skip_masks):
            prediction = predict_labels(model, prepared, runtime, config, mask, cache=cache)
            scored.by_skip_mask[mask].append(
                score_case(case_id(case), prediction, truth, scan, label_names, nsd_tolerance)
            )
            if index > 0:
                continue
            voxel_volume = float(np.prod(scan.spacing))
            for steps in postprocessing:
                cleaned = postprocess(prediction, voxel_volume, steps)
                scored.by_postprocessing[steps].append(
                    score_case(case_id(case), cleaned, truth, scan, label_names, nsd_tolerance)
                )
    return scored
