"""``describe``, ``runs`` and ``study``: what a config builds, what the MLflow store holds,
and the skip study assembled from the evaluations logged there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segment import reporting
from segment.config import ExperimentConfig, load_config
from segment.models import build_model
from segment.tracking.runs import (
    CrossValidation,
    EvaluatedRun,
    RunRecord,
    cross_validations,
    evaluated_runs,
    find_runs,
)
from segment.tracking.store import store_errors, use_store


@dataclass(frozen=True)
class ModelDescription:
    """The network a config builds."""

    config: ExperimentConfig
    channels: list[int]
    parameters: int

    def to_text(self) -> str:
        return reporting.describe_text(self)


def describe(config: str | Path, overrides: list[str] | None = None) -> ModelDescription:
    """Build the model of the YAML experiment ``config`` (with ``overrides``) and describe it."""
    experiment = load_config(config, overrides)
    model = build_model(experiment.model)
    return ModelDescription(
        experiment, list(model.encoder.out_channels), sum(p.numel() for p in model.parameters())
    )


@dataclass(frozen=True)
class RunsOverview:
    """The store's runs, newest first, and its cross-validations' figures."""

    runs: list[RunRecord]
    cross_validations: list[CrossValidation]

    def to_text(self) -> str:
        return reporting.runs_text(self.runs, self.cross_validations)


def runs(experiment: str | None = None, *, tracking_uri: str | None = None) -> RunsOverview:
    """Every run of ``experiment`` (a task, e.g. ``Task04_Hippocampus``), or of all."""
    use_store(tracking_uri)
    records = find_runs(experiment)
    with store_errors("read the cross-validations' metrics"):
        return RunsOverview(records, cross_validations(records))


@dataclass(frozen=True)
class StudyReport:
    """The skip study: the evaluated models side by side, and each skip switched off at
    inference against the model trained without it."""

    runs: list[EvaluatedRun]

    def to_markdown(self) -> str:
        return reporting.study_markdown(self.runs)


def study(experiment: str | None = None, *, tracking_uri: str | None = None) -> StudyReport:
    """The study from what ``evaluate``/``ablate`` with ``split="val"`` logged to MLflow; it
    never retrains or re-evaluates anything. Empty when nothing is evaluated yet."""
    use_store(tracking_uri)
    records = find_runs(experiment)
    with store_errors("read the logged evaluations"):
        return StudyReport(evaluated_runs(records))
