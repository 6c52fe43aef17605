"""Where a model comes from: a bundled name, an MLflow model URI, or a local folder.

Whatever the source, what is loaded is a folder of ``model.safetensors`` + ``config.yaml``
(or an ensemble of such folders); nothing is unpickled and no code from the source runs.
"""

from __future__ import annotations

from pathlib import Path

from segment.models.serialization import ModelLoadError, is_model_directory

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def bundled_models() -> dict[str, Path]:
    """Models shipped with the package, by name."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {folder.name: folder for folder in sorted(PRETRAINED_DIR.iterdir()) if is_model_directory(folder)}


def bundled_members() -> dict[str, Path]:
    """The members of the bundled ensembles, each a model of its own: ``hippocampus_3d/member_1``."""
    return {
        f"{name}/{member.name}": member
        for name, folder in bundled_models().items()
        for member in sorted(folder.glob("member_*"))
        if is_model_directory(member)
    }


def resolve_model(spec: str, tracking_uri: str | None = None) -> Path:
    """A local model folder for ``spec``: a bundled name (``hippocampus_3d``, or one member of
    a bundled ensemble, ``hippocampus_3d/member_1``), an MLflow URI
    (``models:/hippocampus_3d@best``, ``models:/hippocampus_3d/latest``, ``runs:/<id>/...``)
    or a folder path. MLflow artifacts are downloaded to MLflow's local cache."""
    bundled = bundled_models()
    if spec in bundled:
        return bundled[spec]
    members = bundled_members()
    if spec in members:
        return members[spec]
    if spec.startswith(MLFLOW_SCHEMES):
        return _download_mlflow_model(spec, tracking_uri)
    folder = Path(spec)
    if folder.is_dir():
        return folder
    names = ", ".join(bundled) or "none"
    raise ModelLoadError(
        f"Model {spec!r} is not a bundled model ({names}), an MLflow URI (models:/NAME@best) or a model folder."
    )


def _download_mlflow_model(uri: str, tracking_uri: str | None) -> Path:
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    from segment.tracking.store import use_store

    store = use_store(tracking_uri)
    # A model is a few MB: MLflow's progress bar would only clutter the command's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except (MlflowException, OSError) as error:
        reason = str(error).splitlines()[0][:200]
        raise ModelLoadError(f"Could not fetch {uri} from the MLflow store {store}: {reason}") from None
