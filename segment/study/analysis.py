"""Each trained study model scored case by case on its validation split: Dice, surface Dice at
tight tolerances, where its errors lie relative to the true boundary, their energy per
frequency band, and skeleton scores on 2D masks. A skip-dropout model is scored under every
skip mask of the ablation, a reference only as it was trained. The result is logged to the run
as ``study/cases.json``, so the report reads everything from MLflow and a finished analysis is
not repeated."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from segment.data.tasks import case_id, split_task
from segment.engine.inference import FeatureCache, predict_labels
from segment.engine.metrics import dice_per_label, label_one_hot, surface_dice_per_label
from segment.engine.preparation import prepare
from segment.engine.scoring import ablation_masks
from segment.io import read_scan
from segment.reporting import mask_text
from segment.study import detail
from segment.study.runner import task_root
from segment.study.settings import WITH_SKIP_DROPOUT
from segment.tracking.store import store_errors, use_store

ARTIFACT = "study/cases.json"


def _spatial(array: np.ndarray, spacing: Sequence[float], dims: int) -> tuple[np.ndarray, list[float]]:
    """A 2D slice stored as a 3D file carries a trailing singleton axis that the model never saw."""
    spacing = list(spacing)
    while array.ndim > dims and array.shape[-1] == 1:
        array, spacing = array[..., 0], spacing[:-1]
    return array, spacing


def _surface_dice(
    prediction: np.ndarray, truth: np.ndarray, classes: int, spacing: list[float]
) -> dict[str, float]:
    """Mean surface Dice over the foreground labels at each tolerance of ``NSD_TOLERANCES`` (in
    finest voxels)."""
    one_hot = label_one_hot(prediction, classes), label_one_hot(truth, classes)
    return {
        f"{tolerance:g}": float(
            np.mean(
                surface_dice_per_label(prediction, truth, classes, tolerance * min(spacing), spacing, one_hot)
            )
        )
        for tolerance in detail.NSD_TOLERANCES
    }


def case_measures(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: list[float],
    classes: int,
    bands: list[np.ndarray],
    distance: np.ndarray,
) -> dict:
    dice = dice_per_label(torch.as_tensor(prediction), torch.as_tensor(truth), classes).tolist()
    measures = {
        "dice": dice,
        "mean_dice": float(np.mean(dice)),
        "nsd": _surface_dice(prediction, truth, classes, spacing),
        "error_distance": detail.error_distance_counts(prediction, truth, distance),
        "band_energy": detail.band_energies(prediction, truth, range(1, classes), bands),
    }
    if prediction.ndim == 2:
        measures["cldice"], measures["skeleton_recall"] = detail.skeleton_scores(prediction, truth)
    return measures


def analyse(
    model_uri: str,
    variant: str,
    data_roots: list[Path],
    tracking_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
    max_cases: int | None = None,
) -> dict:
    """Score ``model_uri`` on its validation split (its first ``max_cases`` cases if given):
    every skip mask of the ablation for a skip-dropout model, its own skips otherwise."""
    from segment.workflows.models import load

    loaded = load(model_uri, tracking_uri=tracking_uri, device="cpu")
    config = loaded.config
    spec = config.model
    task = split_task(config.data, task_root(config.data.task, data_roots), download=False)
    built = loaded.network.resolve_skip_mask(None)
    masks = ablation_masks(built) if variant == WITH_SKIP_DROPOUT else [tuple(int(on) for on in built)]
    classes = spec.out_channels
    results: dict[str, list[dict]] = {mask_text(mask): [] for mask in masks}
    cases = task.val[:max_cases] if max_cases else task.val
    for number, case in enumerate(cases, start=1):
        scan, label = read_scan(case["image"], spec.in_channels), read_scan(case["label"])
        truth, spacing = _spatial(label.array.round().astype(np.int64), scan.spacing, spec.spatial_dims)
        distance = detail.boundary_distance(truth, spacing)
        bands = detail.band_masks(truth.shape, spec.level_scales)
        prepared, cache = prepare(scan, config), FeatureCache()
        for mask in masks:
            prediction, _ = _spatial(
                predict_labels(loaded.network, prepared, loaded.runtime, config, mask, cache=cache),
                scan.spacing,
                spec.spatial_dims,
            )
            measures = case_measures(prediction, truth, spacing, classes, bands, distance)
            results[mask_text(mask)].append({"case": case_id(case), **measures})
        if progress and number % 10 == 0:
            progress(f"  {number} of {len(cases)} cases")
    return {
        "model": model_uri,
        "labels": [config.label_names[value] for value in range(1, classes)],
        "levels": spec.levels,
        "level_scales": [list(scales) for scales in spec.level_scales],
        "built_skips": mask_text(built),
        "distance_bands": list(detail.DISTANCE_BANDS),
        "nsd_tolerances": [f"{t:g}" for t in detail.NSD_TOLERANCES],
        "unit": label.unit,
        "masks": results,
    }


def registered_model(run_id: str) -> str | None:
    """``models:/NAME/VERSION`` of the model a run registered, or None."""
    from mlflow import MlflowClient

    with store_errors(f"find the model of run {run_id}"):
        versions = MlflowClient().search_model_versions(f"run_id='{run_id}'")
    return f"models:/{versions[0].name}/{versions[0].version}" if versions else None


def has_analysis(run_id: str) -> bool:
    from mlflow import MlflowClient

    with store_errors(f"list the artifacts of run {run_id}"):
        return any(item.path == ARTIFACT for item in MlflowClient().list_artifacts(run_id, "study"))


def analyse_run(
    run_id: str,
    variant: str,
    data_roots: list[Path],
    tracking_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
    max_cases: int | None = None,
) -> None:
    """Analyse the model of ``run_id`` and log the result to the run."""
    from mlflow import MlflowClient

    use_store(tracking_uri)
    model = registered_model(run_id)
    if model is None:
        return
    result = analyse(model, variant, data_roots, tracking_uri, progress, max_cases)
    with store_errors(f"log the study analysis to run {run_id}"):
        MlflowClient().log_text(run_id, json.dumps(result), ARTIFACT)


def read_analysis(run_id: str) -> dict:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    # A bar per small JSON file would bury the report's own output.
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    with store_errors(f"read the study analysis of run {run_id}"):
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{ARTIFACT}"))
