"""What the CLI, the viewer and Python users call: plain functions with typed arguments and
typed results. Each raises a :class:`segment.errors.SegmentError` with one sentence when the
user can fix the problem.

>>> from segment import workflows
>>> report = workflows.evaluate("hippocampus_3d", data="data/Task04_Hippocampus", split="val")
>>> print(report.to_markdown())
"""

from segment.workflows.evaluation import AblationRow, EvaluationReport, ablate, evaluate
from segment.workflows.inspection import ModelDescription, RunsOverview, describe, runs, study
from segment.workflows.models import LoadedModel, explore, load
from segment.workflows.packaging import ensemble, export
from segment.workflows.planning import Plan, plan
from segment.workflows.prediction import PredictedMask, PredictionResult, predict
from segment.workflows.training import TrainingResult, resume, train
from segment.workflows.viewer import serve_viewer

__all__ = [
    "AblationRow",
    "EvaluationReport",
    "LoadedModel",
    "ModelDescription",
    "Plan",
    "PredictedMask",
    "PredictionResult",
    "RunsOverview",
    "TrainingResult",
    "ablate",
    "describe",
    "ensemble",
    "evaluate",
    "explore",
    "export",
    "load",
    "plan",
    "predict",
    "resume",
    "runs",
    "serve_viewer",
    "study",
    "train",
]
