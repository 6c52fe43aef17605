"""A training run from a config, one process or several (torchrun), tracked in MLflow and
resumable: the data, the setup, the callbacks, and the loop that runs them (``loop.fit``)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch.distributed as dist
import yaml

from segment.atomic import discard_unfinished
from segment.config import ExperimentConfig, apply_overrides, build_config, config_to_yaml
from segment.data.loaders import samples_on_device, training_loader, validation_dataset
from segment.data.tasks import resolve_data_root
from segment.tracking import store
from segment.training.callbacks import (
    BEST_MODEL_DIR,
    BestModel,
    Callback,
    Checkpoint,
    ProgressBar,
    TimeBudget,
    Validation,
)
from segment.training.checkpoint import CHECKPOINT_FILE, TrainingState, load_checkpoint
from segment.training.distributed import Distributed, runtime_for, split_on_every_rank, start_distributed
from segment.training.loop import fit
from segment.training.seeding import configure_cudnn, resolve_deterministic, seed_epoch
from segment.training.setup import build_setup
from segment.training.tracking_callbacks import FinalReport, MetricsLogger


@dataclass(frozen=True)
class TrainingResult:
    run_id: str
    epochs_done: int
    best_epoch: int
    best_dice: dict[str, float]
    best_mean_dice: float
    wall_seconds: float
    model_dir: Path
    model_version: int | None
    stop_reason: str
    is_main_process: bool = True  # False in the other processes of a torchrun job


class TrainingInterrupted(Exception):
    """Training was stopped (Ctrl-C or SIGTERM) after its last checkpoint was saved."""

    def __init__(self, run_id: str, epochs_done: int) -> None:
        super().__init__(
            f"Training stopped after epoch {epochs_done}; the checkpoint is saved. "
            f"Continue with: segment train --resume {run_id}"
        )


def train(
    config: ExperimentConfig | None = None,
    *,
    run_name: str | None = None,
    data_root: str | Path | None = None,
    tracking_uri: str | None = None,
    resume: str | None = None,
    overrides_on_resume: list[str] | None = None,
    output_root: str | Path = "runs",
    device: str = "auto",
    progress: bool = True,
) -> TrainingResult:
    """Train ``config`` (or resume run ``resume``) and return the summary of the best model.

    Under ``torchrun`` every process calls this; rank 0 alone writes to MLflow and disk."""
    output_root = Path(output_root)
    distributed = start_distributed(device)
    try:
        store.use_store(tracking_uri)
        checkpoint = None
        if resume is not None:
            # A run killed while saving left its temporary file; the rename never happened.
            discard_unfinished(output_root / resume / CHECKPOINT_FILE)
            checkpoint = load_checkpoint(output_root / resume)
            tree = yaml.safe_load(checkpoint["state"].config_yaml)
            config = build_config(apply_overrides(tree, overrides_on_resume or []), source=f"run {resume}")
        assert config is not None, "train() needs a config or a run to resume"
        return _train(
            config,
            run_name or config.name,
            distributed,
            data_root,
            resume,
            checkpoint,
            output_root,
            device,
            progress,
        )
    finally:
        if distributed.enabled:
            # The finished run's DDP wrapper lives on in reference cycles, holding the process
            # group; left to a later collection or to interpreter exit, its teardown aborts
            # gloo ("terminate called without an active exception"). Free it while the group
            # is still up.
            gc.collect()
            dist.destroy_process_group()


def _train(
    config: ExperimentConfig,
    run_name: str,
    distributed: Distributed,
    data_root: str | Path | None,
    resume: str | None,
    checkpoint: dict | None,
    output_root: Path,
    device: str,
    progress: bool,
) -> TrainingResult:
    runtime = runtime_for(config, device, distributed)
    deterministic = resolve_deterministic(config, runtime.device.type == "cuda")
    configure_cudnn(deterministic)
    epochs_done = checkpoint["state"].epochs_done if checkpoint is not None else 0
    # Before the model is built: its initial weights (rank 0's, which DDP hands to every rank).
    seed_epoch(config.trainer.seed, distributed.rank, epochs_done)
    split = split_on_every_rank(config.data, resolve_data_root(data_root), distributed)
    # The saved model carries the task's label names, so predictions can name their labels; the
    # run records the loader and the determinism it trained with.
    loader_choice = "device" if samples_on_device(config, split, runtime) else "workers"
    config = config.model_copy(
        update={
            "labels": split.label_names,
            "data": config.data.model_copy(update={"loader": loader_choice}),
            "trainer": config.trainer.model_copy(update={"deterministic": deterministic}),
        }
    )
    loader = training_loader(config, split, runtime, distributed.enabled)
    val_data = validation_dataset(config, split, distributed.rank, distributed.world_size)
    setup = build_setup(config, runtime, distributed=distributed.enabled, checkpoint=checkpoint)

    run = store.start_run(config, run_name, resume) if distributed.is_main else None
    try:
        run_id = distributed.share(run.info.run_id if run else None)
        state = checkpoint["state"] if checkpoint is not None else None
        if state is None:
            state = TrainingState(run_id=run_id, config_yaml=config_to_yaml(config))
        run_dir = output_root / run_id
        if run is not None and resume is None:
            store.log_run_setup(config, split, runtime.describe())
        best_dir = run_dir / BEST_MODEL_DIR
        final = FinalReport(setup, state, val_data, best_dir)
        callbacks = _callbacks(setup, state, val_data, run_dir, distributed.is_main, progress) + (
            [final] if distributed.is_main else []
        )
        try:
            stop_reason = fit(setup, loader, state, callbacks, distributed)
        except KeyboardInterrupt:
            if run is not None:
                mlflow.end_run(status="KILLED")
            raise TrainingInterrupted(run_id, state.epochs_done) from None
        # Shared, so every process waits for the first one's logging and all tear down together.
        version = distributed.share(final.version)
        if run is not None:
            mlflow.end_run(status="FINISHED")
        return TrainingResult(
            run_id=run_id,
            epochs_done=state.epochs_done,
            best_epoch=state.best_epoch,
            best_dice=dict(state.best_dice),
            best_mean_dice=state.best_mean_dice,
            wall_seconds=state.elapsed_seconds,
            model_dir=best_dir,
            model_version=version,
            stop_reason=stop_reason,
            is_main_process=distributed.is_main,
        )
    except BaseException:
        if run is not None and mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise


def _callbacks(setup, state, val_data, run_dir: Path, is_main: bool, progress: bool) -> list[Callback]:
    """Every rank validates (each its share of the cases) and keeps the time budget; the
    first alone shows progress, saves and logs."""
    trainer = setup.config.trainer
    callbacks: list[Callback] = []
    if progress and is_main:
        callbacks.append(ProgressBar(trainer.max_epochs))
    if trainer.max_minutes is not None:
        callbacks.append(TimeBudget(trainer.max_minutes))
    callbacks.append(Validation(setup, val_data, setup.config.label_names, state))
    if is_main:
        callbacks += [
            BestModel(setup, run_dir / BEST_MODEL_DIR),
            Checkpoint(setup, state, run_dir),
            MetricsLogger(state),
        ]
    return callbacks
