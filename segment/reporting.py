"""Every table and text the project prints or writes as Markdown, from the typed results of
:mod:`segment.workflows`. Nothing here computes a figure; it only lays figures out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segment.tracking.runs import CrossValidation, EvaluatedRun, RunRecord
    from segment.training.run import TrainingResult
    from segment.workflows.evaluation import EvaluationReport
    from segment.workflows.inspection import ModelDescription
    from segment.workflows.prediction import PredictedMask


def mask_text(flags) -> str:
    """``1101`` for a skip mask or a model's long skips, finest level first."""
    return "".join(str(int(flag)) for flag in flags)


def level_name(level: int, levels: int, pooling: Sequence[Sequence[int]] | None = None) -> str:
    """``level 1 (full resolution)``, ``level 2 (1/2)``, ... for long skip ``level`` (from 1);
    with per-axis ``pooling`` (``model.pooling``) each axis's scale, ``level 3 (1/4 x 1/4 x 1/2)``."""
    factors = list(pooling or [])[: level - 1] or [(2,)] * (level - 1)
    scales = [math.prod(axis) for axis in zip(*factors, strict=True)] or [1]
    if level == 1:
        scale = "full resolution"
    elif len(set(scales)) == 1:
        scale = f"1/{scales[0]}"
    else:
        scale = " x ".join(f"1/{s}" if s > 1 else "1" for s in scales)
    return f"level {level} ({scale})" if level < levels else f"level {level}"


def describe_text(description: ModelDescription) -> str:
    config = description.config
    spec = config.model
    return "\n".join(
        [
            f"{config.name}: {spec.spatial_dims}D U-Net, {spec.encoder} encoder, {spec.skip_mode} skips",
            f"  levels: {spec.levels}, channels per level: {description.channels}",
            f"  long skips (finest first): {mask_text(spec.built_skips)}, "
            f"skip dropout: {list(spec.skip_dropout_per_level)}",
            f"  parameters: {description.parameters:,}",
        ]
    )


def training_summary(result: TrainingResult) -> str:
    per_label = ", ".join(f"{name} {value:.4f}" for name, value in result.best_dice.items())
    version = "" if result.model_version is None else f" (registered as version {result.model_version})"
    return "\n".join(
        [
            f"Finished run {result.run_id}: {result.stop_reason}, {result.epochs_done} epochs in "
            f"{result.wall_seconds / 60:.1f} min.",
            f"Best validation Dice {result.best_mean_dice:.4f} at epoch {result.best_epoch} ({per_label}).",
            f"Best model: {result.model_dir}{version}.",
        ]
    )


def runs_text(records: list[RunRecord], validations: list[CrossValidation]) -> str:
    """The runs table, newest first, then each cross-validation's figure."""
    if not records:
        return "No runs yet: start one with `segment train --config configs/hippocampus_3d.yaml`."
    lines = [
        f"{'run id':32}  {'experiment':20}  {'name':40}  {'status':8}  {'epochs':>6}  {'best Dice':>9}  "
        f"{'minutes':>7}  device"
    ]
    for run in records:
        dice = "-" if run.best_mean_dice is None else f"{run.best_mean_dice:.4f}"
        minutes = "-" if run.minutes is None else f"{run.minutes:.1f}"
        lines.append(
            f"{run.run_id:32}  {run.experiment[:20]:20}  {run.run_name[:40]:40}  {run.status:8}  "
            f"{run.epochs:>6}  {dice:>9}  {minutes:>7}  {run.device}"
        )
    if validations:
        lines += ["", "Cross-validations: each fold's best validation Dice, averaged over the finished folds"]
    for cv in validations:
        per_label = " / ".join(f"{label} {value:.4f}" for label, value in cv.dice.items())
        unfinished = f" ({', '.join(map(str, cv.missing))} not finished)" if cv.missing else ""
        lines.append(
            f"{cv.name} ({cv.experiment}), folds {', '.join(map(str, cv.done))} of {cv.folds}{unfinished}: "
            f"{cv.mean_dice:.4f} ({per_label})"
        )
        if cv.settings:
            lines.append(f"  recipe: {cv.settings}")
        lines.append(f"  runs: {' '.join(cv.run_ids)}")
    return "\n".join(lines)


def prediction_line(mask: PredictedMask) -> str:
    counts = ", ".join(f"{name} {count}" for name, count in mask.voxels.items())
    line = f"{mask.mask}: {counts} voxels"
    for what, path in mask.maps.items():
        line += f"\n  {what}: {path}"
    if mask.maps:
        line += f" (from {mask.samples_from})"
    return line


def evaluation_text(report: EvaluationReport) -> str:
    lines = [
        f"{report.model}: {report.cases} cases, mean Dice {report.mean_dice:.4f} "
        f"(HD95 in {report.unit}, NSD within {report.nsd_tolerance:g} {report.unit})"
    ]
    for name in report.dice:
        lines.append(
            f"  {name:>12}: Dice {report.dice[name]:.4f}  HD95 {report.hd95[name]:.2f}  "
            f"NSD {report.nsd[name]:.4f}  volume {report.volume[name]:.4g} {report.volume_unit}"
        )
    for row in report.ablation:
        nsd = "  ".join(f"NSD {label} {value:.4f}" for label, value in row.nsd.items())
        lines.append(f"  skip mask {row.mask_text}: mean Dice {row.mean_dice:.4f}  {nsd}")
    for row in report.postprocessing:
        hd95 = "  ".join(f"HD95 {label} {value:.2f}" for label, value in row.hd95.items())
        lines.append(f"  post-processing {row.steps}: mean Dice {row.mean_dice:.4f}  {hd95}")
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| --- " * len(header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def evaluation_markdown(report: EvaluationReport) -> str:
    labels = list(report.dice)
    lines = [
        f"# {report.model}: {report.cases} cases, mean Dice {report.mean_dice:.4f}",
        "",
        f"| label | Dice | HD95 ({report.unit}) | NSD (within {report.nsd_tolerance:g} {report.unit}) "
        f"| volume ({report.volume_unit}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in labels:
        lines.append(
            f"| {label} | {report.dice[label]:.4f} | {report.hd95[label]:.2f} | "
            f"{report.nsd[label]:.4f} | {report.volume[label]:.4g} |"
        )
    if report.ablation:
        header = ["skip mask (finest first)", "mean Dice", *(f"NSD {label}" for label in labels)]
        cells = [
            [row.mask_text, f"{row.mean_dice:.4f}", *(f"{row.nsd[label]:.4f}" for label in labels)]
            for row in report.ablation
        ]
        lines += ["", *_markdown_table(header, cells)]
    if report.postprocessing:
        header = ["post-processing", "mean Dice", *(f"{m} {label}" for label in labels for m in ("HD95", "NSD"))]
        cells = [
            [
                row.steps,
                f"{row.mean_dice:.4f}",
                *(value for label in labels for value in (f"{row.hd95[label]:.2f}", f"{row.nsd[label]:.4f}")),
            ]
            for row in report.postprocessing
        ]
        lines += ["", *_markdown_table(header, cells)]
    return "\n".join(lines) + "\n"


def _ablation_table(base: EvaluatedRun, trained_without: dict[tuple[int, ...], EvaluatedRun]) -> list[str]:
    report, record = base.report, base.record
    labels = list(report["dice"])
    lines = [
        f"### {record.experiment}: {record.config_name} (skip dropout {record.skip_dropout:g}), "
        f"{report['cases']} validation cases",
        "",
        "| skip mask | switched off at inference: mean Dice | change | "
        + " | ".join(f"NSD {label}" for label in labels)
        + " | trained that way, no skip dropout: mean Dice |",
        "| --- " * (4 + len(labels)) + "|",
    ]
    rows = report["ablation"]
    all_on = rows[0]["mean_dice"]
    for row in rows:
        mask = tuple(row["skip_mask"])
        off = [level for level, flag in enumerate(mask, start=1) if not flag]
        if not off:
            what = "all on"
        elif len(off) == len(mask):
            what = "all off"
        else:
            what = "off: " + ", ".join(level_name(level, record.levels or 0, record.pooling) for level in off)
        reference = trained_without.get(mask)
        trained = (
            f"{reference.report['mean_dice']:.4f} ({reference.record.config_name})"
            if reference
            else "not trained"
        )
        nsd = " | ".join(f"{row['nsd'][label]:.4f}" for label in labels)
        lines.append(
            f"| {mask_text(mask)} {what} | {row['mean_dice']:.4f} | {row['mean_dice'] - all_on:+.4f} | {nsd} | {trained} |"
        )
    return lines


def _comparison_table(runs: list[EvaluatedRun]) -> list[str]:
    lines = [
        "| task | config | dims | encoder | skip dropout | long skips | mean Dice | per label Dice | "
        "mean HD95 (scan units) | mean NSD | minutes |",
        "| --- " * 11 + "|",
    ]
    for run in runs:
        report, record = run.report, run.record
        per_label = ", ".join(f"{label} {value:.4f}" for label, value in report["dice"].items())
        hd95 = [v for v in report["hd95"].values() if v == v]
        nsd = list(report["nsd"].values())
        skips = "-" if record.long_skips is None else mask_text(record.long_skips)
        minutes = "-" if record.minutes is None else f"{record.minutes:.0f}"
        lines.append(
            f"| {record.experiment} | {record.config_name} | {record.spatial_dims}D | {record.encoder} | "
            f"{record.skip_dropout:g} | {skips} | {report['mean_dice']:.4f} | {per_label} | "
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
        "## Models",
        "",
        *_comparison_table(runs),
        "",
    ]
    ablated = [run for run in runs if "ablation" in run.report]
    if ablated:
        lines += ["## Switched off at inference vs trained without", ""]
    for base in ablated:
        # The reference for each mask: a model built with exactly those skips that never saw
        # one dropped (all on included: the same network without skip dropout).
        trained_without = {
            run.record.long_skips: run
            for run in runs
            if run.record.experiment == base.record.experiment
            and run.record.levels == base.record.levels
            and run.record.spatial_dims == base.record.spatial_dims
            and run.record.encoder == base.record.encoder
            and run.record.skip_dropout == 0
        }
        lines += [*_ablation_table(base, trained_without), ""]
    return "\n".join(lines)
