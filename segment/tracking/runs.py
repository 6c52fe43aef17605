"""Queries over the runs and models in the MLflow store: every run read once into a
:class:`RunRecord`, whose parameters are parsed once, and what is built from those records
(cross-validations, the study's evaluated runs, the viewer's models trained without a skip)."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, RunInfo
from mlflow.exceptions import MlflowException

from segment.tracking.store import TrackingError, metric_histories, store_errors

EVALUATION_ARTIFACT = "evaluation/val.json"


def _literal(text: str | None, default: Any = None) -> Any:
    return default if text is None else ast.literal_eval(text)


@dataclass(frozen=True)
class RunRecord:
    """One training run as the store holds it, its config parameters parsed."""

    info: RunInfo  # MLflow's: run id, name, status, times
    experiment: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    config_name: str
    levels: int | None
    spatial_dims: int | None
    encoder: str | None
    long_skips: tuple[int, ...] | None  # the long skips the model was built with; None: no model config
    skip_dropout: float
    folds: int | None
    fold: int | None

    @classmethod
    def from_run(cls, run: Run, experiment: str) -> RunRecord:
        params = run.data.params
        levels = _literal(params.get("model.levels"))
        # Runs logged before the key was renamed call it model.skips.
        built = _literal(params.get("model.long_skips", params.get("model.skips")))
        if built is None and levels is not None:
            built = (1,) * (levels - 1)
        dropout = _literal(params.get("model.skip_dropout"), 0.0)
        return cls(
            info=run.info,
            experiment=experiment,
            params=dict(params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
            config_name=params.get("name", run.info.run_name or ""),
            levels=levels,
            spatial_dims=_literal(params.get("model.spatial_dims")),
            encoder=params.get("model.encoder"),
            long_skips=None if built is None else tuple(int(flag) for flag in built),
            skip_dropout=max(dropout) if isinstance(dropout, list | tuple) else float(dropout),
            folds=_literal(params.get("data.folds")),
            fold=_literal(params.get("data.fold")),
        )

    @property
    def pooling(self) -> tuple[tuple[int, ...], ...] | None:
        """The model's pooling factors per level and axis, when it set them (model.pooling)."""
        pooling = _literal(self.params.get("model.pooling"))
        return None if pooling is None else tuple(tuple(level) for level in pooling)

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def run_name(self) -> str:
        return self.info.run_name or ""

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("epoch", 0))

    @property
    def best_mean_dice(self) -> float | None:
        return self.metrics.get("best_val_mean_dice")

    @property
    def minutes(self) -> float | None:
        return self.metrics.get("train_minutes")

    @property
    def device(self) -> str:
        return self.tags.get("device", "")

    @property
    def label_metrics(self) -> list[str]:
        """``val_dice_<label>`` keys in label order (params hold ``labels.<index> = <name>``)."""
        index = {
            f"val_dice_{name}": int(key.removeprefix("labels."))
            for key, name in self.params.items()
            if key.startswith("labels.")
        }
        return sorted((key for key in self.metrics if key in index), key=index.get)


def find_runs(experiment: str | None = None) -> list[RunRecord]:
    """Runs of one experiment (task), or of all, newest first: one search that the runs table,
    the cross-validations and the study all read."""
    with store_errors("search the runs"):
        client = MlflowClient()
        experiments = client.search_experiments()
        if experiment is not None:
            chosen = [e for e in experiments if e.name == experiment]
            if not chosen:
                names = ", ".join(e.name for e in experiments) or "none yet"
                raise TrackingError(f"There is no experiment named {experiment!r}; experiments: {names}.")
            experiments = chosen
        if not experiments:
            return []
        names = {e.experiment_id: e.name for e in experiments}
        runs = client.search_runs(list(names), order_by=["attributes.start_time DESC"])
    return [RunRecord.from_run(run, names[run.info.experiment_id]) for run in runs]


@dataclass(frozen=True)
class CrossValidation:
    """The finished folds of one recipe's cross-validation: each fold's best validation Dice
    (at its best epoch), averaged over the folds, overall and per label."""

    name: str
    experiment: str
    folds: int
    done: list[int]
    run_ids: list[str]
    mean_dice: float
    dice: dict[str, float]
    settings: str  # what tells this recipe apart from other recipes of the same config

    @property
    def missing(self) -> list[int]:
        return sorted(set(range(self.folds)) - set(self.done))


def cross_validations(records: list[RunRecord]) -> list[CrossValidation]:
    """The finished runs of ``data.folds`` cross-validations among ``records`` (newest first),
    grouped by recipe (every parameter but ``data.fold``), newest group first, as nnU-Net
    summarises its folds; a fold run more than once counts with its newest run."""
    groups: dict[tuple, dict[int, RunRecord]] = {}
    for record in records:
        if not record.finished or record.best_mean_dice is None or record.folds is None:
            continue
        recipe = tuple(sorted((key, value) for key, value in record.params.items() if key != "data.fold"))
        groups.setdefault((record.experiment, recipe), {}).setdefault(record.fold or 0, record)
    summaries = []
    for (task, recipe), folds in groups.items():
        params = dict(recipe)
        varying = {
            key
            for _, other_recipe in groups
            if other_recipe != recipe and (other := dict(other_recipe))["name"] == params["name"]
            for key in params.keys() | other.keys()
            if params.get(key) != other.get(key)
        }
        summaries.append(
            _fold_summary(task, folds, " ".join(f"{key}={params.get(key)}" for key in sorted(varying)))
        )
    return summaries


def _fold_summary(task: str, folds: dict[int, RunRecord], settings: str) -> CrossValidation:
    first = next(iter(folds.values()))
    labels = first.label_metrics
    best_scores = []  # per fold: {"val_mean_dice": ..., "val_dice_<label>": ...} at its best epoch
    for record in folds.values():
        history = metric_histories(record.run_id, ["val_mean_dice", *labels])
        # The earliest epoch with the highest Dice: the one whose weights training kept.
        best_step, _ = max(history["val_mean_dice"], key=lambda point: (point[1], -point[0]))
        best_scores.append({key: dict(points).get(best_step, math.nan) for key, points in history.items()})

    def mean(key: str) -> float:
        return sum(scores[key] for scores in best_scores) / len(best_scores)

    return CrossValidation(
        name=first.config_name,
        experiment=task,
        folds=first.folds or 0,
        done=sorted(folds),
        run_ids=[folds[fold].run_id for fold in sorted(folds)],
        mean_dice=mean("val_mean_dice"),
        dice={label.removeprefix("val_dice_"): mean(label) for label in labels},
        settings=settings,
    )


@dataclass(frozen=True)
class EvaluatedRun:
    """A run with the validation evaluation ``segment evaluate --split val`` logged onto it."""

    record: RunRecord
    report: dict = field(repr=False)


def evaluated_runs(records: list[RunRecord]) -> list[EvaluatedRun]:
    """The newest finished run of each config name (per task) among ``records`` that has a
    logged validation evaluation, ordered by task and name."""
    client = MlflowClient()
    chosen: dict[tuple[str, str], EvaluatedRun] = {}
    for record in records:
        key = (record.experiment, record.config_name)
        if not record.finished or key in chosen:
            continue
        try:
            path = client.download_artifacts(record.run_id, EVALUATION_ARTIFACT)
        except (MlflowException, OSError):
            continue
        with open(path) as handle:
            chosen[key] = EvaluatedRun(record, json.load(handle))
    return sorted(chosen.values(), key=lambda run: (run.record.experiment, run.record.config_name))


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model's ``best`` version (else its newest), as the viewer offers it."""

    name: str
    uri: str
    version: int
    task: str
    val_mean_dice: float | None
    spatial_dims: int | None
    long_skips: tuple[int, ...] | None

    @property
    def title(self) -> str:
        dice = "" if self.val_mean_dice is None else f", val Dice {self.val_mean_dice:.3f}"
        return f"{self.name} v{self.version} ({self.task}{dice})"


def registered_models() -> list[RegisteredModel]:
    """Every registered model's ``best`` version, else its newest, by name."""
    models = []
    with store_errors("list the registered models"):
        client = MlflowClient()
        for registered in client.search_registered_models():
            versions = client.search_model_versions(f"name='{registered.name}'")
            if not versions:
                continue
            best = registered.aliases.get("best")
            version = next(
                (v for v in versions if v.version == str(best)), max(versions, key=lambda v: int(v.version))
            )
            record = RunRecord.from_run(client.get_run(version.run_id), "") if version.run_id else None
            dice = version.tags.get("val_mean_dice")
            models.append(
                RegisteredModel(
                    name=registered.name,
                    uri=f"models:/{registered.name}@best"
                    if best is not None
                    else f"models:/{registered.name}/{version.version}",
                    version=int(version.version),
                    task=version.tags.get("task", ""),
                    val_mean_dice=None if dice is None else float(dice),
                    spatial_dims=record.spatial_dims if record else None,
                    long_skips=record.long_skips if record else None,
                )
            )
    return sorted(models, key=lambda model: model.name)


def trained_without(
    models: list[RegisteredModel], task: str, spatial_dims: int, skip_mask: tuple[int, ...]
) -> list[RegisteredModel]:
    """Of ``models``, those of the same task and dimensions built with exactly the long skips
    that ``skip_mask`` leaves on: the fair comparison for a switched-off skip."""
    return [
        model
        for model in models
        if model.task == task and model.spatial_dims == spatial_dims and model.long_skips == tuple(skip_mask)
    ]
