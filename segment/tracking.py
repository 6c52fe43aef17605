"""Everything MLflow: where runs are stored, what a run records, and the model registry."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from segment.config import ExperimentConfig, config_to_yaml

MODEL_TYPE = "segment-unet"
DEFAULT_STORE = "mlflow.db"


class TrackingError(RuntimeError):
    """A run or model could not be found or written in the MLflow store."""


SQLITE = "sqlite:///"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///./mlflow.db``.

    Always explicit: MLflow's own default silently switches to a file store when a
    ``./mlruns`` folder exists. A SQLite file named relative to the working folder is pinned
    to it, so that a process started elsewhere (the viewer runs from the repository) reads
    the same store."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{DEFAULT_STORE}"
    database = uri.removeprefix(SQLITE)
    if uri.startswith(SQLITE) and database != ":memory:" and not Path(database).is_absolute():
        return f"{SQLITE}{Path.cwd() / database}"
    return uri


def use_store(tracking_uri: str | None = None) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"levels": 5}} -> {"model.levels": 5}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    """The commit of the code that ran, with ``-dirty`` when the work tree had changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def start_run(config: ExperimentConfig, resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """Open a new run in the task's experiment, or reopen ``resume_run_id``."""
    if resume_run_id is not None:
        try:
            MlflowClient().get_run(resume_run_id)
        except MlflowException:
            raise TrackingError(
                f"There is no MLflow run {resume_run_id} in {mlflow.get_tracking_uri()}; "
                f"list runs with `segment runs`."
            ) from None
        return mlflow.start_run(run_id=resume_run_id, log_system_metrics=True)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.data.task)
    if experiment is None:
        experiment_id = client.create_experiment(
            config.data.task, artifact_location=_artifact_root(config.data.task)
        )
    else:
        experiment_id = experiment.experiment_id
    return mlflow.start_run(experiment_id=experiment_id, run_name=config.name, log_system_metrics=True)


def _artifact_root(experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database file, not in whatever folder the
    command ran from; a server decides for itself (None)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlruns" / experiment).as_uri()


def log_run_setup(config: ExperimentConfig, split_record: dict, device: str) -> None:
    """Parameters, provenance tags and the resolved config + split as artifacts."""
    mlflow.log_params({key: str(value) for key, value in flatten(config.model_dump(mode="json")).items()})
    mlflow.set_tags(
        {
            "config_name": config.name,
            "git_commit": git_commit(),
            "dataset_fingerprint": split_record["fingerprint"],
            "device": device,
            "spatial_dims": str(config.model.spatial_dims),
            "skip_dropout": str(max(config.model.skip_dropout_per_level)),
        }
    )
    mlflow.log_text(config_to_yaml(config), "config.yaml")
    mlflow.log_text(json.dumps(split_record, indent=2), "split.json")


def log_model_and_register(model_dir: Path, config: ExperimentConfig, metrics: dict[str, float]) -> int:
    """Log the safetensors model directory as an MLflow model of the active run, register it
    under the config's name, and point the ``best`` alias at the version with the highest
    validation Dice. MLflow reserves the alias ``latest``: ``models:/<name>/latest`` already
    resolves to the newest version. Returns the new version number."""
    client = MlflowClient()
    params = {"spatial_dims": str(config.model.spatial_dims), "task": config.data.task}
    logged = mlflow.initialize_logged_model(name=config.name, model_type=MODEL_TYPE, params=params)
    client.log_model_artifacts(logged.model_id, str(model_dir))
    mlflow.finalize_logged_model(logged.model_id, "READY")
    version = mlflow.register_model(f"models:/{logged.model_id}", config.name)
    dice = metrics.get("val_mean_dice", float("nan"))
    client.set_model_version_tag(config.name, version.version, "val_mean_dice", f"{dice:.6f}")
    client.set_model_version_tag(config.name, version.version, "task", config.data.task)
    try:
        best = client.get_model_version_by_alias(config.name, "best")
        best_dice = float(best.tags.get("val_mean_dice", "nan"))
    except MlflowException:
        best_dice = float("-inf")
    if not dice <= best_dice:  # also true when the old best has no score
        client.set_registered_model_alias(config.name, "best", version.version)
    return int(version.version)


def metric_histories(run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) points as logged, across every session of a resumed run."""
    client = MlflowClient()
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys
    }


def find_runs(experiment: str | None = None) -> tuple[list, dict[str, str]]:
    """Runs of one experiment (task), or of all, newest first, and the experiments' names by id:
    one search that :func:`list_runs` and :func:`cross_validations` both read."""
    client = MlflowClient()
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
        if not experiments:
            names = ", ".join(e.name for e in client.search_experiments()) or "none yet"
            raise TrackingError(f"There is no experiment named {experiment!r}; experiments: {names}.")
    if not experiments:
        return [], {}
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"])
    return runs, {e.experiment_id: e.name for e in experiments}


def list_runs(found: tuple[list, dict[str, str]]) -> list[dict[str, Any]]:
    """The runs :func:`find_runs` found, with their key metrics."""
    runs, names = found
    return [
        {
            "run_id": run.info.run_id,
            "experiment": names[run.info.experiment_id],
            "name": run.info.run_name,
            "status": run.info.status,
            "epochs": int(run.data.metrics.get("epoch", 0)),
            "best_val_mean_dice": run.data.metrics.get("best_val_mean_dice"),
            "minutes": run.data.metrics.get("train_minutes"),
            "device": run.data.tags.get("device", ""),
        }
        for run in runs
    ]


def cross_validations(found: tuple[list, dict[str, str]]) -> list[dict[str, Any]]:
    """The finished runs of ``data.folds`` cross-validations among those :func:`find_runs`
    found, grouped by recipe (every parameter but ``data.fold``), newest group first. Each group gives the mean over its folds of each
    run's best validation Dice, overall and per label at that run's best epoch, as nnU-Net
    summarises its folds; a fold run more than once counts with its newest run. ``settings``
    names what tells a group apart from other groups of the same config."""
    runs, names = found
    groups: dict[tuple, dict[int, Any]] = {}
    for run in runs:
        params = run.data.params
        finished = run.info.status == "FINISHED" and "best_val_mean_dice" in run.data.metrics
        if not finished or params.get("data.folds", "None") == "None":
            continue
        recipe = tuple(sorted((key, value) for key, value in params.items() if key != "data.fold"))
        group = groups.setdefault((names[run.info.experiment_id], recipe), {})
        group.setdefault(int(params["data.fold"]), run)
    summaries = []
    for (task, recipe), folds in groups.items():
        params = dict(recipe)
        rivals = [dict(other) for _, other in groups if other != recipe]
        varying = {
            key
            for other in rivals
            if other["name"] == params["name"]
            for key in params.keys() | other.keys()
            if params.get(key) != other.get(key)
        }
        summary = _fold_summary(folds)
        summary["experiment"] = task
        summary["settings"] = " ".join(f"{key}={params.get(key)}" for key in sorted(varying))
        summaries.append(summary)
    return summaries


def _fold_summary(folds: dict[int, Any]) -> dict[str, Any]:
    """The mean over ``folds`` (fold -> run) of each run's best validation Dice."""
    first = next(iter(folds.values()))
    # The params hold labels.<index> = <name>: list the labels in index order.
    index = {
        f"val_dice_{name}": int(key.removeprefix("labels."))
        for key, name in first.data.params.items()
        if key.startswith("labels.")
    }
    labels = sorted((key for key in first.data.metrics if key in index), key=index.get)
    best_scores = []  # per fold: {"val_mean_dice": ..., "val_dice_<label>": ...} at its best epoch
    for run in folds.values():
        history = metric_histories(run.info.run_id, ["val_mean_dice", *labels])
        # The earliest epoch with the highest Dice: the one whose weights training kept.
        best_step, _ = max(history["val_mean_dice"], key=lambda point: (point[1], -point[0]))
        best_scores.append({key: dict(points).get(best_step, math.nan) for key, points in history.items()})

    def mean(key: str) -> float:
        return sum(scores[key] for scores in best_scores) / len(best_scores)

    return {
        "name": first.data.params["name"],
        "folds": int(first.data.params["data.folds"]),
        "done": sorted(folds),
        "run_ids": [folds[fold].info.run_id for fold in sorted(folds)],
        "mean_dice": mean("val_mean_dice"),
        "dice": {label.removeprefix("val_dice_"): mean(label) for label in labels},
    }


def source_run_id(model_uri: str) -> str | None:
    """The run that produced the model behind an MLflow URI, or None if it cannot be told."""
    client = MlflowClient()
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    reference = model_uri.removeprefix("models:/").rstrip("/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        if "/" in reference:
            name, version = reference.split("/", 1)
            if version.lower() == "latest":
                version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
            return client.get_model_version(name, version).run_id
        return mlflow.get_logged_model(reference).source_run_id
    except (MlflowException, ValueError):
        return None


def metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits and _ - . / and spaces only."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in text)


def log_evaluation(run_id: str, report: dict, split: str) -> None:
    """Record an evaluation on the run that trained the model: metrics, the JSON report, a
    Markdown table and, for a skip ablation, a bar chart."""
    from segment import plots

    prefix = f"eval_{split}"
    metrics = {f"{prefix}_mean_dice": report["mean_dice"]}
    for metric in ("dice", "hd95", "nsd"):
        for label, value in report[metric].items():
            metrics[metric_key(f"{prefix}_{metric}_{label}")] = value
    for row in report.get("ablation", []):
        skips = "".join(str(flag) for flag in row["skips"])
        metrics[f"{prefix}_skips_{skips}_mean_dice"] = row["mean_dice"]
        for label, value in row["nsd"].items():
            metrics[metric_key(f"{prefix}_skips_{skips}_nsd_{label}")] = value
    client = MlflowClient()
    finite = {
        key: value for key, value in metrics.items() if value == value
    }  # MLflow rejects NaN in some stores
    for key, value in finite.items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, json.dumps(report, indent=2), f"evaluation/{split}.json")
    client.log_text(run_id, evaluation_markdown(report), f"evaluation/{split}.md")
    if "ablation" in report:
        with plots.released(plots.ablation_bars(report["ablation"])) as figure:
            client.log_figure(run_id, figure, f"evaluation/{split}_ablation.png")


def evaluation_markdown(report: dict) -> str:
    labels = list(report["dice"])
    lines = [
        f"# {report['model']}: {report['cases']} cases, mean Dice {report['mean_dice']:.4f}",
        "",
        f"| label | Dice | HD95 ({report['unit']}) | NSD (within {report['nsd_tolerance']:g} {report['unit']}) "
        f"| volume ({report['volume_unit']}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in labels:
        lines.append(
            f"| {label} | {report['dice'][label]:.4f} | {report['hd95'][label]:.2f} | "
            f"{report['nsd'][label]:.4f} | {report['volume'][label]:.4g} |"
        )
    if "ablation" in report:
        lines += [
            "",
            "| skips (finest first) | mean Dice | " + " | ".join(f"NSD {label}" for label in labels) + " |",
        ]
        lines.append("| --- " * (2 + len(labels)) + "|")
        for row in report["ablation"]:
            nsd = " | ".join(f"{row['nsd'][label]:.4f}" for label in labels)
            lines.append(f"| {''.join(str(f) for f in row['skips'])} | {row['mean_dice']:.4f} | {nsd} |")
    return "\n".join(lines) + "\n"


def registered_models() -> list[dict[str, Any]]:
    """Every registered segment model's ``best`` version (else its newest), for pickers."""
    client = MlflowClient()
    models = []
    for registered in client.search_registered_models():
        versions = client.search_model_versions(f"name='{registered.name}'")
        if not versions:
            continue
        best = registered.aliases.get("best")
        version = next(
            (v for v in versions if v.version == str(best)), max(versions, key=lambda v: int(v.version))
        )
        alias = "best" if best is not None else None
        models.append(
            {
                "name": registered.name,
                "uri": f"models:/{registered.name}@best"
                if alias
                else f"models:/{registered.name}/{version.version}",
                "version": int(version.version),
                "task": version.tags.get("task", ""),
                "val_mean_dice": float(version.tags["val_mean_dice"])
                if "val_mean_dice" in version.tags
                else None,
                **_architecture(client, version.run_id),
            }
        )
    return sorted(models, key=lambda m: m["name"])


def trained_skips(params: dict[str, str]) -> tuple[int, ...] | None:
    """The long skips a run's model had in training, from its params: all of them unless
    ``model.skips`` says otherwise; None for a run that logged no model config."""
    if "model.levels" not in params:
        return None
    skips = ast.literal_eval(params.get("model.skips", "None"))
    if skips is None:
        return (1,) * (int(params["model.levels"]) - 1)
    return tuple(int(flag) for flag in skips)


def _architecture(client: MlflowClient, run_id: str | None) -> dict[str, Any]:
    """What a registered model is, from its run's params: dimensions and trained long skips."""
    params = client.get_run(run_id).data.params if run_id else {}
    dims = params.get("model.spatial_dims")
    return {"spatial_dims": None if dims is None else int(dims), "trained_skips": trained_skips(params)}


def trained_without(
    models: list[dict[str, Any]], task: str, spatial_dims: int, skips: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Of ``models`` (from :func:`registered_models`), those of the same task and dimensions
    trained with exactly the long skips ``skips``: the fair comparison for a switched-off skip."""
    return [
        model
        for model in models
        if model["task"] == task and model["spatial_dims"] == spatial_dims and model["trained_skips"] == tuple(skips)
    ]
