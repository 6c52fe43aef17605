"""``train`` and ``resume``: a U-Net trained from a config, tracked in MLflow, resumable in
the same run. Under torchrun every process calls these; the first alone writes."""

from __future__ import annotations

from pathlib import Path

from segment.atomic import require_writable
from segment.config import ExperimentConfig, apply_overrides, build_config, load_config
from segment.tracking.store import run_name
from segment.training.run import TrainingInterrupted, TrainingResult
from segment.training.run import train as run_training

__all__ = ["TrainingInterrupted", "TrainingResult", "resume", "train"]


def train(
    config: ExperimentConfig | str | Path, overrides: list[str] | None = None, **options
) -> TrainingResult:
    """Train the experiment ``config`` (a YAML path or a loaded config) with ``overrides``
    (``["trainer.max_minutes=10"]``) applied. The MLflow run is named by the config and the
    overrides, so runs of one config tell apart in the UI.

    Ctrl-C or SIGTERM raises :class:`TrainingInterrupted` after the last complete epoch is
    saved; :func:`resume` carries on from there.

    ``options``: ``data_root`` (the folder of MSD tasks; default ``$SEGMENT_DATA_ROOT``, else
    ``./data``), ``tracking_uri`` (the MLflow store), ``output_dir`` (checkpoints and best
    models, default ``runs``), ``device`` (auto, cpu or cuda), ``progress`` (bars)."""
    if isinstance(config, ExperimentConfig):
        experiment = build_config(
            apply_overrides(config.model_dump(mode="json"), overrides or []), config.name
        )
    else:
        experiment = load_config(config, overrides)
    return _run(experiment, run_name(experiment, overrides), None, None, **options)


def resume(run_id: str, overrides: list[str] | None = None, **options) -> TrainingResult:
    """Continue run ``run_id`` from its last checkpoint in ``output_dir``, in the same MLflow
    run; ``overrides`` change its config from here on (``["trainer.max_epochs=400"]``).
    ``options`` as for :func:`train`."""
    return _run(None, None, run_id, overrides, **options)


def _run(
    experiment: ExperimentConfig | None,
    name: str | None,
    run_id: str | None,
    overrides: list[str] | None,
    data_root: str | Path | None = None,
    tracking_uri: str | None = None,
    output_dir: str | Path = "runs",
    device: str = "auto",
    progress: bool = True,
) -> TrainingResult:
    output_dir = Path(output_dir)
    require_writable(output_dir, "checkpoints")
    return run_training(
        experiment,
        run_name=name,
        data_root=data_root,
        tracking_uri=tracking_uri,
        resume=run_id,
        overrides_on_resume=overrides if run_id else None,
        output_root=output_dir,
        device=device,
        progress=progress,
    )
