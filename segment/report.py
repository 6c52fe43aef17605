"""The skip study as a Markdown report, assembled from evaluations logged in MLflow.

Each trained model is scored with ``segment evaluate --model models:/NAME@best --split val
[--ablate-skips]``, which logs ``evaluation/val.json`` to the run that trained it. This module
only reads those results: the report never retrains or re-evaluates anything.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from segment.tracking import trained_skips

EVALUATION_ARTIFACT = "evaluation/val.json"


@dataclass
class EvaluatedRun:
    name: str
    task: str
    run_id: str
    params: dict[str, str]
    report: dict
    minutes: float | None

    @property
    def skips(self) -> tuple[int, ...] | None:
        value = ast.literal_eval(self.params.get("model.skips", "None"))
        return None if value is None else tuple(value)

    @property
    def skip_dropout(self) -> float:
        value = ast.literal_eval(self.params.get("model.skip_dropout", "0.0"))
        return max(value) if isinstance(value, list | tuple) else float(value)

    @property
    def levels(self) -> int:
        return int(self.params.get("model.levels", "0"))

    @property
    def trained_skips(self) -> tuple[int, ...] | None:
        return trained_skips(self.params)


def evaluated_runs(client: MlflowClient, experiment: str | None = None) -> list[EvaluatedRun]:
    """The newest finished run of each config name that has a logged validation evaluation."""
    experiments = [e for e in client.search_experiments() if experiment is None or e.name == experiment]
    if not experiments:
        return []
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(
        list(names), "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    chosen: dict[tuple[str, str], EvaluatedRun] = {}
    for run in runs:
        key = (names[run.info.experiment_id], run.info.run_name)
        if key in chosen:
            continue
        try:
            path = client.download_artifacts(run.info.run_id, EVALUATION_ARTIFACT)
        except (MlflowException, OSError):
            continue
        with open(path) as handle:
            report = json.load(handle)
        chosen[key] = EvaluatedRun(
            run.info.run_name,
            key[0],
            run.info.run_id,
            run.data.params,
            report,
            run.data.metrics.get("train_minutes"),
        )
    return sorted(chosen.values(), key=lambda r: (r.task, r.name))


def level_name(level: int, levels: int) -> str:
    """``level 1 (full resolution)``, ``level 2 (1/2)``, ... for long skip ``level`` (1-based)."""
    scale = "full resolution" if level == 1 else f"1/{2 ** (level - 1)}"
    return f"level {level} ({scale})" if level < levels else f"level {level}"


def _mask(skips: tuple[int, ...]) -> str:
    return "".join(str(flag) for flag in skips)


def _ablation_table(base: EvaluatedRun, trained_without: dict[tuple[int, ...], EvaluatedRun]) -> list[str]:
    labels = list(base.report["dice"])
    lines = [
        f"### {base.task}: {base.name} (skip dropout {base.skip_dropout:g}), {base.report['cases']} validation cases",
        "",
        "| long skips | switched off at inference: mean Dice | change | "
        + " | ".join(f"NSD {label}" for label in labels)
        + " | trained that way, no skip dropout: mean Dice |",
        "| --- " * (4 + len(labels)) + "|",
    ]
    rows = base.report["ablation"]
    all_on = rows[0]["mean_dice"]
    for row in rows:
        skips = tuple(row["skips"])
        off = [level + 1 for level, flag in enumerate(skips) if not flag]
        if not off:
            what = "all on"
        elif len(off) == len(skips):
            what = "all off"
        else:
            what = "off: " + ", ".join(level_name(level, base.levels) for level in off)
        reference = trained_without.get(skips)
        trained = f"{reference.report['mean_dice']:.4f} ({reference.name})" if reference else "not trained"
        nsd = " | ".join(f"{row['nsd'][label]:.4f}" for label in labels)
        lines.append(
            f"| {_mask(skips)} {what} | {row['mean_dice']:.4f} | {row['mean_dice'] - all_on:+.4f} | {nsd} | {trained} |"
        )
    return lines


def _comparison_table(runs: list[EvaluatedRun]) -> list[str]:
    lines = [
        "| task | config | dims | encoder | skip dropout | skips | mean Dice | per label Dice | mean HD95 (scan units) | mean NSD | minutes |",
        "| --- " * 11 + "|",
    ]
    for run in runs:
        report = run.report
        per_label = ", ".join(f"{label} {value:.4f}" for label, value in report["dice"].items())
        hd95 = [v for v in report["hd95"].values() if v == v]
        nsd = list(report["nsd"].values())
        skips = "all" if run.skips is None else _mask(run.skips)
        minutes = "-" if run.minutes is None else f"{run.minutes:.0f}"
        lines.append(
            f"| {run.task} | {run.name} | {run.params.get('model.spatial_dims')}D | {run.params.get('model.encoder')} | "
            f"{run.skip_dropout:g} | {skips} | {report['mean_dice']:.4f} | {per_label} | "
            f"{sum(hd95) / max(1, len(hd95)):.2f} | {sum(nsd) / len(nsd):.4f} | {minutes} |"
        )
    return lines


def study_markdown(runs: list[EvaluatedRun]) -> str:
    """The study report: every evaluated model side by side, then each skip ablation against
    the models trained without those skips."""
    lines = [
        "# Skip connection study",
        "",
        "Validation split of each task; scores from `segment evaluate --split val`.",
        "",
    ]
    lines += ["## Models", "", *_comparison_table(runs), ""]
    ablated = [run for run in runs if "ablation" in run.report]
    if ablated:
        lines += ["## Switched off at inference vs trained without", ""]
    for base in ablated:
        # The reference for each setting: a model that had exactly those skips in training and
        # never saw one dropped (all on included: the same network without skip dropout).
        trained_without = {
            run.trained_skips: run
            for run in runs
            if run.task == base.task
            and run.levels == base.levels
            and all(run.params.get(key) == base.params.get(key) for key in ("model.spatial_dims", "model.encoder"))
            and run.skip_dropout == 0
        }
        lines += [*_ablation_table(base, trained_without), ""]
    return "\n".join(lines)
