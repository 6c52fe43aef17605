"""A training run from a config, one process or several (torchrun), tracked in MLflow and
resumable: the data, the setup, the callbacks, and the loop that runs them (``loop.fit``). Under
torchrun a lost process stops the others with one sentence, and a group that torchrun restarts
resumes the run by itself."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch.distributed as dist
import yaml

from segment.atomic import discard_unfinished
from segment.config import ExperimentConfig, TrainerConfig, apply_overrides, build_config, config_to_yaml
from segment.data.loaders import samples_on_device, training_loader, validation_dataset
from segment.data.tasks import resolve_data_root
from segment.errors import SegmentError
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
from segment.training.checkpoint import CHECKPOINT_FILE, CheckpointError, TrainingState, load_checkpoint
from segment.training.distributed import (
    Distributed,
    TorchrunJob,
    is_collective_failure,
    runtime_for,
    split_on_every_rank,
    start_distributed,
)
from segment.training.loop import fit
from segment.training.seeding import configure_cudnn, resolve_deterministic, seed_epoch
from segment.training.setup import build_setup
from segment.training.stop_signals import ignore_stop_signals
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


# How long a process whose collective failed waits to see which rank's process ended: one
# killed outright has ended by then, one that crashed has printed its traceback and is exiting.
LOST_RANK_WAIT_SECONDS = 5.0


class TrainingInterrupted(Exception):
    """Training was stopped (Ctrl-C or SIGTERM) after its last checkpoint was saved. Of the
    processes of a torchrun job, one says so: the one with ``is_reporting_process``."""

    def __init__(self, message: str, is_reporting_process: bool = True) -> None:
        super().__init__(message)
        self.is_reporting_process = is_reporting_process

    @classmethod
    def after_epoch(
        cls, run_id: str, epochs_done: int, is_reporting_process: bool = True
    ) -> TrainingInterrupted:
        return cls(
            f"Training stopped after epoch {epochs_done}; the checkpoint is saved. "
            f"Continue with: segment train --resume {run_id}",
            is_reporting_process,
        )


class RankLost(TrainingInterrupted):
    """Another process of the torchrun job was killed, crashed or stopped answering, so this one
    stopped too; the last complete checkpoint is intact."""


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

    Under ``torchrun`` every process calls this; rank 0 alone writes to MLflow and disk. A group
    that torchrun restarts (``--max-restarts``) resumes the run it was training, from its last
    checkpoint, in the same MLflow run."""
    output_root = Path(output_root)
    checkpoint = None
    if resume is not None:
        checkpoint, config = _resume_point(output_root, resume, overrides_on_resume)
    assert config is not None, "train() needs a config or a run to resume"
    distributed = start_distributed(device, config.trainer.collective_timeout_seconds)
    try:
        store.use_store(tracking_uri)
        if resume is None and distributed.job is not None:
            resume = _run_before_restart(distributed.job, output_root, distributed)
            if resume is not None:
                checkpoint, config = _resume_point(output_root, resume, None)
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


def _resume_point(
    output_root: Path, run_id: str, overrides: list[str] | None
) -> tuple[dict, ExperimentConfig]:
    """Run ``run_id``'s last checkpoint, and its config with ``overrides`` applied."""
    # A run killed while saving left its temporary file; the rename never happened.
    discard_unfinished(output_root / run_id / CHECKPOINT_FILE)
    checkpoint = load_checkpoint(output_root / run_id)
    tree = yaml.safe_load(checkpoint["state"].config_yaml)
    return checkpoint, build_config(apply_overrides(tree, overrides or []), source=f"run {run_id}")


def _run_before_restart(job: TorchrunJob, output_root: Path, distributed: Distributed) -> str | None:
    """The run that a group torchrun restarted goes on with: the one rank 0 recorded before the
    restart, once it has a checkpoint. On the group's first start rank 0 forgets what an earlier
    job of the same name recorded."""
    recorded = None
    if distributed.is_main:
        if job.restart == 0:
            job.forget_run(output_root)
        elif (run_id := job.recorded_run(output_root)) and (output_root / run_id / CHECKPOINT_FILE).is_file():
            recorded = run_id
    return distributed.share(recorded)


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
    job = distributed.job
    try:
        run_id = distributed.share(run.info.run_id if run else None)
        state = checkpoint["state"] if checkpoint is not None else None
        if state is None:
            state = TrainingState(run_id=run_id, config_yaml=config_to_yaml(config))
        run_dir = output_root / run_id
        if run is not None and resume is None:
            store.log_run_setup(config, split, runtime.describe())
        if run is not None and job is not None:
            job.record_run(output_root, run_id)
        best_dir = run_dir / BEST_MODEL_DIR
        metrics = MetricsLogger(state, run_dir)
        final = FinalReport(setup, state, val_data, best_dir, metrics)
        callbacks = _callbacks(setup, state, val_data, run_dir, distributed.is_main, progress) + (
            [metrics, final] if distributed.is_main else []
        )
        try:
            stop_reason = fit(setup, loader, state, callbacks, distributed)
            # Shared, so every process waits for the first one's logging and all tear down together.
            version = distributed.share(final.version)
        except BaseException as error:
            stopped = _stop_of(error, distributed, state, run_dir, config.trainer)
            if stopped is None:
                raise
            if run is not None:
                with contextlib.suppress(store.TrackingError):  # the checkpoint is what matters now
                    store.end_run("FAILED" if isinstance(stopped, RankLost) else "KILLED")
            raise stopped from None
        if run is not None:
            store.end_run("FINISHED")
            if job is not None:
                job.forget_run(output_root)
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
            # The error on its way says more than a store that cannot record the run's end.
            with contextlib.suppress(store.TrackingError):
                store.end_run("FAILED")
        if run is not None and job is not None and not job.restarts_left:
            job.forget_run(output_root)  # no group torchrun restarts is left to read it
        raise


def _stop_of(
    error: BaseException,
    distributed: Distributed,
    state: TrainingState,
    run_dir: Path,
    trainer: TrainerConfig,
) -> TrainingInterrupted | None:
    """What ``error``, raised while training, means: a stop asked for (Ctrl-C or SIGTERM), another
    rank lost (a collective failed), or None: this process failed, and says why itself (in a
    sentence, or a traceback)."""
    asked_to_stop = isinstance(error, KeyboardInterrupt)
    if not distributed.enabled:
        return TrainingInterrupted.after_epoch(state.run_id, state.epochs_done) if asked_to_stop else None
    if isinstance(error, SegmentError):  # its sentence says why: no other rank need report it lost
        distributed.say_stopping()
        return None
    if not (asked_to_stop or is_collective_failure(error)):
        return None
    ignore_stop_signals()
    distributed.say_stopping()
    # torchrun asks the survivors of a lost rank to stop only once it has collected the lost
    # process: a stop asked for need not wait to see it end.
    lost = distributed.lost_ranks(wait_seconds=0.0 if asked_to_stop else LOST_RANK_WAIT_SECONDS)
    is_reporting_process = distributed.rank == min(set(range(distributed.world_size)) - set(lost))
    if not lost and (asked_to_stop or distributed.ranks_stopping()):
        return TrainingInterrupted.after_epoch(state.run_id, state.epochs_done, is_reporting_process)
    return RankLost(_rank_lost_message(lost, distributed, run_dir, trainer), is_reporting_process)


def _rank_lost_message(
    lost: list[int], distributed: Distributed, run_dir: Path, trainer: TrainerConfig
) -> str:
    """One sentence: which rank was lost and when, which checkpoint is kept, and what next."""
    world = distributed.world_size
    if lost:
        ranks = " and ".join(filter(None, [", ".join(map(str, lost[:-1])), str(lost[-1])]))
        who = f"Rank{'s' if len(lost) > 1 else ''} {ranks} of {world} stopped (killed or crashed)"
    else:  # on another host, or hung
        who = (
            f"Another rank of {world} stopped (killed, crashed, or silent for "
            f"trainer.collective_timeout_seconds = {trainer.collective_timeout_seconds:g})"
        )
    try:
        # The checkpoint on disk, not this rank's count of epochs: a lost rank 0 may have died
        # while saving one.
        saved = load_checkpoint(run_dir)["state"].epochs_done
    except CheckpointError:
        saved = 0
    when = f"during epoch {saved + 1}" if saved < trainer.max_epochs else "after the last epoch"
    restarts = distributed.job is not None and distributed.job.restarts_left
    if not saved:
        then = "torchrun starts the group again" if restarts else "start the training again"
        return f"{who} {when}, before the first checkpoint: {then}."
    if restarts:
        return f"{who} {when}; the checkpoint of epoch {saved} is intact and torchrun restarts the group from it."
    return (
        f"{who} {when}; the checkpoint of epoch {saved} is intact: "
        f"continue with `segment train --resume {run_dir.name}`."
    )


def _callbacks(setup, state, val_data, run_dir: Path, is_main: bool, progress: bool) -> list[Callback]:
    """Every rank validates (each its share of the cases) and keeps the time budget; the
    first alone shows progress and saves (and logs: the caller adds ``MetricsLogger`` and
    ``FinalReport``)."""
    trainer = setup.config.trainer
    callbacks: list[Callback] = []
    if progress and is_main:
        callbacks.append(ProgressBar(trainer.max_epochs))
    if trainer.max_minutes is not None:
        callbacks.append(TimeBudget(trainer.max_minutes))
    callbacks.append(Validation(setup, val_data, setup.config.label_names, state))
    if is_main:
        callbacks += [BestModel(setup, run_dir / BEST_MODEL_DIR), Checkpoint(setup, state, run_dir)]
    return callbacks
