"""The MLflow store: where it is, what a training run records, the model registry, and the
evaluations logged back onto the runs that trained the models."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from segment.config import DataConfig, ExperimentConfig, config_to_yaml
from segment.errors import SegmentError
from segment.models.sources import MLFLOW_SCHEMES

if TYPE_CHECKING:
    from segment.data.tasks import TaskSplit
    from segment.workflows.evaluation import EvaluationReport

MODEL_TYPE = "segment-unet"
DEFAULT_STORE = "mlflow.db"
SQLITE = "sqlite:///"
# Opens the experiment in MLflow's model-training view, not its GenAI view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# What MLflow logs at INFO while it creates a store's tables ("Creating initial MLflow database
# tables...", each migration).
STORE_CREATION_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")
# MLflow caps a run name at 250 characters.
MAX_RUN_NAME = 250
# What the store raises when it cannot do something: MLflow's own errors, and those of the
# database or server under it (a file that is no database, a database another writer holds
# locked, a server that does not answer, a full disk under a local artifact store).
STORE_FAILURES = (MlflowException, SQLAlchemyError, OSError)
# Loggers that repeat a store failure which the caller reports in one sentence: MLflow's
# database layer logs every locked or broken database with its traceback before raising, and
# the system-metrics monitor logs the store it lost, with the SQL.
STORE_FAILURE_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics")
# MLflow tries a request to a server that does not answer for about four minutes (7 retries,
# doubling pauses, 120 s each). A training keeps what a server gone away did not take for a
# later epoch (``MetricsLogger``), so seconds are enough; the user's own settings win.
HTTP_RETRY_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingError(SegmentError):
    """A run or model could not be found or written in the MLflow store."""


def failure_reason(error: BaseException) -> str:
    """A store failure in a few words: the system's error under it when the message reports one
    ("Connection refused", not the URL, retries and connection pool around it), else the first
    line of the message, without the SQL that follows a database's error or the driver's class
    before it ("(sqlite3.OperationalError) database is locked")."""
    message = error.message if isinstance(error, MlflowException) else f"{type(error).__name__}: {error}"
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    # Only an OSError the message itself reports: one MLflow handled on its way to another
    # failure is no reason for it.
    system = next((cause for cause in reversed(chain) if isinstance(cause, OSError) and cause.strerror), None)
    if system is not None and system.strerror in str(message):
        return system.strerror + (f": {system.filename}" if system.filename else "")
    first_line = next(iter(str(message).strip().splitlines()), "")
    return " ".join(re.sub(r"^\([\w.]+\) ", "", first_line).split())[:300]


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Turn the store's failures while doing ``what`` into one-sentence :class:`TrackingError`s."""
    try:
        yield
    except STORE_FAILURES as error:
        raise TrackingError(
            f"Could not {what} in the MLflow store {mlflow.get_tracking_uri()}: {failure_reason(error)}"
        ) from None


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///./mlflow.db``.

    Always explicit: MLflow's own default silently switches to a file store when a
    ``./mlruns`` folder exists. A SQLite file named relative to the working folder is pinned
    to it, so that a process started elsewhere (the viewer) reads the same store."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{DEFAULT_STORE}"
    database = uri.removeprefix(SQLITE)
    if uri.startswith(SQLITE) and database != ":memory:" and not Path(database).is_absolute():
        return f"{SQLITE}{Path.cwd() / database}"
    return uri


def use_store(tracking_uri: str | None = None) -> str:
    for name, value in HTTP_RETRY_BOUNDS.items():
        os.environ.setdefault(name, value)
    for name in STORE_FAILURE_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _create_sqlite_store(uri)
    return uri


def _create_sqlite_store(uri: str) -> None:
    """Create (or migrate) a SQLite store's tables under a lock file beside it. MLflow creates
    them on first use, and two processes doing that at once (two trainings started together on
    a new store) both fail inside its schema migration; the second now waits and finds them made.
    The lock file stays, so a process that finds it waits for whoever holds it."""
    database = Path(uri.removeprefix(SQLITE))
    if not uri.startswith(SQLITE) or str(database) == ":memory:":
        return
    lock_path = database.with_name(f"{database.name}.lock")
    if database.is_file() and database.stat().st_size and not lock_path.exists():
        return  # a store made before this lock existed, or by MLflow itself
    try:
        lock = lock_path.open("a")
    except OSError:
        return  # a folder nobody here can write: no store to create in it
    import fcntl

    with lock, store_errors("create its tables"), _quiet(STORE_CREATION_LOGGERS):
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(uri, uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


@contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Loggers ``names`` at WARNING while the block runs: a command's output stays its own."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
    root = Path(__file__).resolve().parents[2]
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


def run_name(config: ExperimentConfig, overrides: list[str] | None = None) -> str:
    """What tells a run apart in MLflow's runs table: the config's name and what the command
    changed, e.g. ``hippocampus_3d_10min trainer.max_minutes=1``."""
    return " ".join([config.name, *(overrides or [])])[:MAX_RUN_NAME]


def _experiment_id(client: MlflowClient, task: str) -> str:
    experiment = client.get_experiment_by_name(task)
    if experiment is None:
        try:
            return client.create_experiment(task, artifact_location=_artifact_root(task), tags=EXPERIMENT_KIND)
        except MlflowException:
            # Another process created it between the lookup and the creation.
            experiment = client.get_experiment_by_name(task)
            if experiment is None:
                raise
    if experiment.tags.get("mlflow.experimentKind") is None:
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def start_run(config: ExperimentConfig, name: str, resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """Open a new run named ``name`` in the task's experiment, or reopen ``resume_run_id``."""
    client = MlflowClient()
    with store_errors("open a run"):
        if resume_run_id is not None:
            try:
                client.get_run(resume_run_id)
            except MlflowException:
                raise TrackingError(
                    f"There is no MLflow run {resume_run_id} in {mlflow.get_tracking_uri()}; "
                    f"list runs with `segment runs`."
                ) from None
            return mlflow.start_run(run_id=resume_run_id, log_system_metrics=True)
        experiment_id = _experiment_id(client, config.data.task)
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, log_system_metrics=True)


def end_run(status: str) -> None:
    """End the active run as ``status`` (FINISHED, FAILED, KILLED). MLflow forgets the run in
    this process before it tells the store, so a store that cannot record the end raises a
    :class:`TrackingError` and leaves no active run behind."""
    with store_errors(f"mark the run {status}"):
        mlflow.end_run(status=status)


def _artifact_root(experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database file, not in whatever folder the
    command ran from; a server decides for itself (None)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(SQLITE):
        return None
    database = Path(uri.removeprefix(SQLITE)).resolve()
    return (database.parent / "mlruns" / experiment).as_uri()


def log_run_setup(config: ExperimentConfig, split: TaskSplit, device: str) -> None:
    """Parameters, provenance tags, the task as a dataset input, and the resolved config and
    split as artifacts."""
    record = split.as_record()
    tags = {
        "config_name": config.name,
        "git_commit": git_commit(),
        "dataset_fingerprint": record["fingerprint"],
        "device": device,
        "spatial_dims": str(config.model.spatial_dims),
        "skip_dropout": str(max(config.model.skip_dropout_per_level)),
    }
    # The Dataset column of the runs table: the task, its case list's digest, and the split.
    dataset = MetaDataset(
        source=_folder_source(split.folder), name=config.data.task, digest=record["fingerprint"]
    )
    with store_errors("record the run's settings"):
        mlflow.log_params({key: str(value) for key, value in flatten(config.model_dump(mode="json")).items()})
        mlflow.set_tags(tags)
        mlflow.log_input(dataset, context="training", tags={"split": _split_description(config.data)})
        mlflow.log_text(config_to_yaml(config), "config.yaml")
        mlflow.log_text(json.dumps(record, indent=2), "split.json")


def _folder_source(folder: Path):
    with warnings.catch_warnings():
        # MLflow registers two equal local-folder source kinds and warns that it picks one.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(folder.resolve()))


def _split_description(data: DataConfig) -> str:
    order = "in name order" if data.split_seed is None else f"split seed {data.split_seed}"
    if data.folds is not None:
        return f"validation fold {data.fold} of {data.folds}, {order}"
    return f"{data.val_fraction:.0%} validation, {order}"


def log_model_and_register(model_dir: Path, config: ExperimentConfig, metrics: dict[str, float]) -> int:
    """Log the safetensors model directory as an MLflow model of the active run, register it
    under the config's name, and point the ``best`` alias at the version with the highest
    validation Dice. MLflow reserves the alias ``latest``: ``models:/<name>/latest`` already
    resolves to the newest version. Returns the new version number."""
    client = MlflowClient()
    params = {"spatial_dims": str(config.model.spatial_dims), "task": config.data.task}
    logged = mlflow.initialize_logged_model(name=config.name, model_type=MODEL_TYPE, params=params)
    try:
        client.log_model_artifacts(logged.model_id, str(model_dir))
    except STORE_FAILURES:
        # Its files are incomplete (a full disk) or unknown (a server gone): marked failed, if
        # the store answers, rather than left pending as if they were still coming.
        with contextlib.suppress(*STORE_FAILURES):
            mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
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
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def source_run_id(model_uri: str) -> str | None:
    """The run that produced the model behind an MLflow URI, or None if it cannot be told."""
    if not model_uri.startswith(MLFLOW_SCHEMES):
        return None
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    client = MlflowClient()
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


def log_evaluation(run_id: str, report: EvaluationReport, split: str) -> None:
    """Record an evaluation on the run that trained the model: metrics, the JSON report, a
    Markdown table and, for a skip ablation, a bar chart."""
    from segment import plots

    prefix = f"eval_{split}"
    metrics = {f"{prefix}_mean_dice": report.mean_dice}
    for metric in ("dice", "hd95", "nsd"):
        for label, value in getattr(report, metric).items():
            metrics[metric_key(f"{prefix}_{metric}_{label}")] = value
    for row in report.ablation:
        mask = row.mask_text
        metrics[f"{prefix}_skip_mask_{mask}_mean_dice"] = row.mean_dice
        for label, value in row.nsd.items():
            metrics[metric_key(f"{prefix}_skip_mask_{mask}_nsd_{label}")] = value
    client = MlflowClient()
    with store_errors(f"log the evaluation to run {run_id}"):
        for key, value in metrics.items():
            if value == value:  # MLflow rejects NaN in some stores
                client.log_metric(run_id, key, value)
        client.log_text(run_id, report.to_json(), f"evaluation/{split}.json")
        client.log_text(run_id, report.to_markdown(), f"evaluation/{split}.md")
        if report.ablation:
            with plots.released(plots.ablation_bars(report.ablation)) as figure:
                client.log_figure(run_id, figure, f"evaluation/{split}_ablation.png")
