"""``evaluate`` and ``ablate``: a model scored on the labelled cases of an MSD-layout folder,
as every skip mask of an ablation if asked; logged to the run that trained it when it came
from MLflow."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from segment import reporting
from segment.atomic import write_atomically
from segment.config import ConfigError
from segment.data.tasks import split_task
from segment.engine.metrics import CaseScores, mean_scores
from segment.engine.postprocessing import PostProcessing
from segment.engine.scoring import ScoredCases, ablation_masks, score_cases
from segment.errors import InputError
from segment.models import split_mismatch
from segment.models.sources import MLFLOW_SCHEMES
from segment.tracking.store import TrackingError, log_evaluation, source_run_id, use_store
from segment.workflows.models import load

SPLITS = ("all", "val")


@dataclass(frozen=True)
class AblationRow:
    """Mean scores over the cases with one skip mask."""

    skip_mask: tuple[int, ...]
    mean_dice: float
    dice: dict[str, float]
    hd95: dict[str, float]
    nsd: dict[str, float]

    @property
    def mask_text(self) -> str:
        """``1101``: the mask as the CLI takes it, finest level first."""
        return "".join(str(flag) for flag in self.skip_mask)

    @property
    def levels_off(self) -> list[int]:
        """The levels (counted from 1, finest first) whose long skip is off."""
        return [level for level, on in enumerate(self.skip_mask, start=1) if not on]


@dataclass(frozen=True)
class PostProcessingRow:
    """Mean scores over the cases of the model's own mask after one post-processing."""

    steps: str  # "none", "keep largest", "min size 50 mm³", ...
    mean_dice: float
    dice: dict[str, float]
    hd95: dict[str, float]
    nsd: dict[str, float]


@dataclass(frozen=True)
class EvaluationReport:
    """Dice, HD95, NSD and volume per label, with the model's own skips, on ``cases`` cases.

    Distances are in the scans' ``unit`` and volumes in ``volume_unit``. HD95 is NaN for a case
    where a label is missing from the prediction or the truth, and left out of its mean."""

    model: str
    cases: int
    unit: str
    mean_dice: float
    dice: dict[str, float]
    hd95: dict[str, float]
    nsd: dict[str, float]
    nsd_tolerance: float
    volume: dict[str, float]
    volume_unit: str
    split: str
    per_case: list[dict] = field(repr=False)
    ablation: list[AblationRow] = field(default_factory=list)  # empty unless ablated
    # The raw mask ("none") first, then each post-processing asked for; empty unless asked.
    postprocessing: list[PostProcessingRow] = field(default_factory=list)
    logged_to_run: str | None = None  # the MLflow run the results were logged to
    logging_error: str | None = None  # why logging to that run failed, if it did

    def to_dict(self) -> dict:
        """The documented JSON shape (docs/cli.md, ``segment evaluate --json``)."""
        optional = ("ablation", "postprocessing", "logged_to_run", "logging_error")
        shape = {key: value for key, value in asdict(self).items() if key not in optional}
        if self.ablation:
            shape["ablation"] = [{**asdict(row), "skip_mask": list(row.skip_mask)} for row in self.ablation]
        if self.postprocessing:
            shape["postprocessing"] = [asdict(row) for row in self.postprocessing]
        return shape

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        return reporting.evaluation_markdown(self)

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        path = Path(path)
        write_atomically(path, lambda temporary: temporary.write_text(self.to_json()))
        return path


def _means(cases: list[CaseScores]) -> tuple[float, dict, dict, dict]:
    """Mean Dice over labels, then the mean Dice, HD95 and NSD of each label over ``cases``."""
    dice = mean_scores(cases, "dice")
    return float(np.mean(list(dice.values()))), dice, mean_scores(cases, "hd95"), mean_scores(cases, "nsd")


def _report(model: str, split: str, scored: ScoredCases, ablated: bool) -> EvaluationReport:
    results = scored.by_skip_mask
    masks = list(results)
    baseline = results[masks[0]]
    rows = [AblationRow(mask, *_means(results[mask])) for mask in masks]  # one mask unless ablated
    first = rows[0]
    unit = baseline[0].unit
    cleaned = [
        PostProcessingRow(steps.describe(unit), *_means(cases)) for steps, cases in scored.by_postprocessing.items()
    ]
    return EvaluationReport(
        model=model,
        split=split,
        cases=len(baseline),
        unit=unit,
        mean_dice=first.mean_dice,
        dice=first.dice,
        hd95=first.hd95,
        nsd=first.nsd,
        nsd_tolerance=baseline[0].nsd_tolerance,
        volume=mean_scores(baseline, "volume"),
        volume_unit=baseline[0].volume_unit,
        per_case=[{metric: getattr(case, metric) for metric in ("case", *CaseScores.METRICS)} for case in baseline],
        ablation=rows if ablated else [],
        postprocessing=[PostProcessingRow("none", *_means(baseline)), *cleaned] if cleaned else [],
    )


def _score(
    model: str,
    data: str | Path,
    split: str,
    full_sweep: bool | None,
    max_cases: int | None = None,
    nsd_tolerance: float | None = None,
    postprocessing: PostProcessing | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    data = Path(data)
    if split not in SPLITS:
        raise InputError(f"split {split!r}: use all or val.")
    if nsd_tolerance is not None and not nsd_tolerance > 0:
        raise InputError(f"NSD tolerance {nsd_tolerance}: give a positive distance.")
    loaded = load(model, tracking_uri=tracking_uri, device=device)
    if split == "val" and (setting := split_mismatch([config for _, config in loaded.members])):
        raise InputError(
            f"split val: the members of {model} were validated on different cases ({setting} "
            "differs), so each trained on cases another validates on; use split all on held-out data."
        )
    config = loaded.config
    # The model's own data settings, so that split val is exactly the split it trained on.
    try:
        task = split_task(config.data.model_copy(update={"task": data.name}), data.parent, download=False)
    except ConfigError as error:
        raise InputError(str(error)) from None
    if sorted(task.label_names) != sorted(config.label_names):
        raise InputError(
            f"{model} predicts labels {sorted(config.label_names)} but {data} has labels "
            f"{sorted(task.label_names)}; evaluate a model on the task it was trained for."
        )
    cases = task.val if split == "val" else sorted(task.train + task.val, key=lambda case: case["image"])
    cases = cases[:max_cases] if max_cases else cases
    if not cases:
        raise InputError(f"{data} has no labelled cases to score.")
    built = loaded.network.resolve_skip_mask(None)
    masks = ablation_masks(built, full_sweep) if full_sweep is not None else [tuple(int(on) for on in built)]
    variants = postprocessing.variants() if postprocessing is not None else []
    scored = score_cases(
        loaded.network, config, cases, loaded.runtime, task.label_names, masks, progress, nsd_tolerance, variants
    )
    report = _report(model, split, scored, ablated=full_sweep is not None)
    return _log(report, tracking_uri)


def _log(report: EvaluationReport, tracking_uri: str | None) -> EvaluationReport:
    """Log ``report`` to the run that trained its model, when that came from MLflow; a store
    that fails leaves the results intact and says why in ``logging_error``."""
    if not report.model.startswith(MLFLOW_SCHEMES):
        return report
    use_store(tracking_uri)
    run_id = source_run_id(report.model)
    if run_id is None:
        return report
    try:
        log_evaluation(run_id, report, report.split)
    except TrackingError as error:
        return replace(report, logging_error=str(error))
    return replace(report, logged_to_run=run_id)


def evaluate(model: str, data: str | Path, split: str = "all", **options) -> EvaluationReport:
    """Score ``model`` (a bundled name, MLflow URI or model folder) on the labelled cases of
    the MSD-layout folder ``data``: every case (``split="all"``) or the model's own validation
    split (``"val"``). ``nsd_tolerance`` is in the scans' unit; by default 1 mm, or two of the
    finest voxels for scans in another unit.

    ``options``: ``max_cases`` (score the first N), ``nsd_tolerance``, ``postprocessing`` (a
    :class:`~segment.engine.postprocessing.PostProcessing`: each of its steps is also scored,
    alone and together, beside the raw mask), ``device`` (auto, cpu or cuda), ``tracking_uri``
    (the MLflow store for models:/ and runs:/ URIs), ``progress``."""
    return _score(model, data, split, None, **options)


def ablate(model: str, data: str | Path, split: str = "all", *, full_sweep: bool = False, **options) -> EvaluationReport:
    """:func:`evaluate` (``options`` as there), then the same with each long skip switched off
    alone and all off (``full_sweep``: every combination). A skip the model was built without
    stays off in every mask, so the first row, the headline, is always the model as trained."""
    return _score(model, data, split, full_sweep, **options)

