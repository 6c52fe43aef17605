"""The training loop, one process or several (torchrun), tracked in MLflow, resumable; one
module over 350 lines until it is rebuilt from parts (setup, train_step, callbacks)."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.distributed as dist
import yaml
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.utils import convert_to_tensor, set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from segment import plots
from segment.atomic import discard_unfinished
from segment.config import ExperimentConfig, apply_overrides, build_config, config_to_yaml
from segment.data.loaders import training_loader, validation_dataset
from segment.data.tasks import TaskSplit, resolve_data_root, split_task
from segment.engine.checkpoint import CHECKPOINT_FILE, TrainingState, load_checkpoint, save_checkpoint
from segment.engine.distributed import Distributed, runtime_for, start_distributed
from segment.engine.inference import predict_logits
from segment.engine.scoring import mean_dice, validation_dice
from segment.engine.stop_signals import StopSignals
from segment.engine.teaching import copy_initial_weights, distillation_loss, load_teacher, moving_average
from segment.models import Segmenter, UNet, build_model, load_model, save_model
from segment.tracking import store

BEST_MODEL_DIR = "best"


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


def learning_rate(config: ExperimentConfig, progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine or poly decay over ``progress`` in [0, 1]."""
    peak = config.trainer.lr
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if config.trainer.schedule == "poly":
        return peak * (1.0 - progress) ** 0.9
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


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
            config, run_name or config.name, distributed, data_root, resume, checkpoint, output_root, device, progress
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
    trainer = config.trainer
    set_determinism(trainer.seed + distributed.rank)
    runtime = runtime_for(config, device, distributed)
    split = split_task(config.data, resolve_data_root(data_root), download=distributed.is_main)
    # The saved model carries the task's label names, so predictions can name their labels.
    config = config.model_copy(update={"labels": split.label_names})
    loader = training_loader(config, split, runtime.pin_memory, distributed.enabled)
    val_data = validation_dataset(config, split, distributed.rank, distributed.world_size)

    model = build_model(config.model)
    if trainer.init_from is not None and checkpoint is None:
        copy_initial_weights(model, trainer.init_from)
    model = runtime.prepare_model(model)
    teacher = load_teacher(config, runtime) if trainer.teacher is not None else None
    optimiser = torch.optim.AdamW(model.parameters(), lr=trainer.lr, weight_decay=trainer.weight_decay)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None
    averaged = moving_average(model, trainer.ema_decay) if trainer.ema_decay is not None else None
    state = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        # A run given ema_decay only on resume starts its average from the resumed weights.
        if averaged is not None and checkpoint.get("averaged"):
            averaged.load_state_dict(checkpoint["averaged"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        if scaler is not None and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        state = checkpoint["state"]
    network = DistributedDataParallel(model) if distributed.enabled else model
    # Takes the single logits tensor of a model, or the list of one with deep supervision.
    loss_function = DeepSupervisionLoss(
        DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=trainer.dice_background,
            batch=trainer.batch_dice,
        )
    )

    run = store.start_run(config, run_name, resume) if distributed.is_main else None
    try:
        run_id = distributed.share(run.info.run_id if run else None)
        if state is None:
            state = TrainingState(run_id=run_id, config_yaml=config_to_yaml(config))
        run_dir = output_root / run_id
        if run is not None and resume is None:
            store.log_run_setup(config, split, runtime.describe())
        loop = _Loop(
            config,
            distributed,
            runtime,
            split,
            loader,
            val_data,
            model,
            averaged,
            network,
            teacher,
            optimiser,
            scaler,
            loss_function,
            state,
            run_dir,
            progress,
        )
        try:
            stop_reason = loop.run()
        except KeyboardInterrupt:
            if run is not None:
                mlflow.end_run(status="KILLED")
            raise TrainingInterrupted(run_id, state.epochs_done) from None
        # Shared, so every process waits for the first one's logging and all tear down together.
        version = distributed.share(loop.finish() if distributed.is_main else None)
        if run is not None:
            mlflow.end_run(status="FINISHED")
        return TrainingResult(
            run_id=run_id,
            epochs_done=state.epochs_done,
            best_epoch=state.best_epoch,
            best_dice=dict(state.best_dice),
            best_mean_dice=state.best_mean_dice,
            wall_seconds=state.elapsed_seconds,
            model_dir=run_dir / BEST_MODEL_DIR,
            model_version=version,
            stop_reason=stop_reason,
            is_main_process=distributed.is_main,
        )
    except BaseException:
        if run is not None and mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise


class _Loop:
    """The epoch loop and its bookkeeping, split from ``_train`` to keep each part readable."""

    def __init__(
        self,
        config,
        distributed,
        runtime,
        split: TaskSplit,
        loader,
        val_data,
        model: UNet,
        averaged: AveragedModel | None,
        network,
        teacher: Segmenter | None,
        optimiser,
        scaler,
        loss_function,
        state: TrainingState,
        run_dir: Path,
        progress: bool,
    ):
        self.config, self.distributed, self.runtime, self.split = config, distributed, runtime, split
        self.loader, self.val_data = loader, val_data
        self.model, self.network, self.optimiser, self.scaler = model, network, optimiser, scaler
        self.averaged, self.teacher = averaged, teacher
        # The weights that are validated and kept as the best model.
        self.kept_model: UNet = averaged.module if averaged is not None else model
        self.loss_function, self.state, self.run_dir, self.progress = loss_function, state, run_dir, progress
        self.last_dice = float("nan")

    @property
    def budget_seconds(self) -> float | None:
        minutes = self.config.trainer.max_minutes
        return None if minutes is None else 60.0 * minutes

    def _progress(self, elapsed: float) -> float:
        """Fraction of the schedule done: by steps, or by time when a time budget binds first."""
        total_steps = self.config.trainer.max_epochs * len(self.loader)
        fraction = self.state.global_step / max(1, total_steps)
        if self.budget_seconds is not None:
            fraction = max(fraction, elapsed / self.budget_seconds)
        return fraction

    def run(self) -> str:
        with StopSignals() as stop_signals:
            return self._run_epochs(stop_signals)

    def _run_epochs(self, stop_signals: StopSignals) -> str:
        trainer = self.config.trainer
        warmup_steps = trainer.warmup_epochs * len(self.loader)
        session_start = time.perf_counter() - self.state.elapsed_seconds
        sampler = self.loader.sampler
        for epoch in range(self.state.epochs_done, trainer.max_epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            epoch_start = time.perf_counter()
            losses, samples, skipped_steps = self._train_epoch(epoch, session_start, warmup_steps)
            epoch_seconds = time.perf_counter() - epoch_start
            elapsed = time.perf_counter() - session_start
            out_of_time = self.budget_seconds is not None and elapsed >= self.budget_seconds
            out_of_time = self.distributed.share(out_of_time)
            last = epoch + 1 == trainer.max_epochs or out_of_time
            metrics = {
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "skipped_steps": skipped_steps,
                "lr": self.optimiser.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds,
                "samples_per_second": samples * self.distributed.world_size / epoch_seconds,
            }
            with stop_signals.saving():
                # Every process scores its share of the validation cases; MONAI's metric gathers them.
                if (epoch + 1) % trainer.val_every == 0 or last:
                    metrics |= self._validate(epoch + 1)
                self.state.epochs_done = epoch + 1
                self.state.elapsed_seconds = time.perf_counter() - session_start
                if self.distributed.is_main:
                    # Checkpoint before logging: a run killed outright (SIGKILL, power cut) in
                    # between resumes after this epoch, so no epoch is ever logged twice.
                    save_checkpoint(
                        self.run_dir, self.state, self.model, self.optimiser, self.scaler, self.averaged
                    )
                    metrics |= {"epoch": epoch + 1, "train_minutes": self.state.elapsed_seconds / 60}
                    if self.state.best_mean_dice >= 0:  # -1 until the first validation
                        metrics["best_val_mean_dice"] = self.state.best_mean_dice
                    mlflow.log_metrics(metrics, step=epoch + 1)
            if out_of_time:
                return f"time budget of {trainer.max_minutes} min reached"
        return f"{trainer.max_epochs} epochs done"

    def _train_epoch(
        self, epoch: int, session_start: float, warmup_steps: int
    ) -> tuple[list[float], int, int]:
        """One pass over the training data: the finite step losses, the samples seen, and how
        many steps were skipped because their gradient was not finite."""
        trainer = self.config.trainer
        self.network.train()
        losses, samples, skipped = [], 0, 0
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{trainer.max_epochs}",
            leave=False,
            disable=not (self.progress and self.distributed.is_main),
        )
        for batch in bar:
            lr = learning_rate(
                self.config,
                self._progress(time.perf_counter() - session_start),
                self.state.global_step,
                warmup_steps,
            )
            for group in self.optimiser.param_groups:
                group["lr"] = lr
            image = self.runtime.to_device(convert_to_tensor(batch["image"], track_meta=False))
            label = self.runtime.to_device(convert_to_tensor(batch["label"], track_meta=False))
            with self.runtime.autocast():
                logits = self.network(image)
            loss = self.loss_function(logits, label)
            if self.teacher is not None and trainer.distill_weight > 0:
                with torch.no_grad(), self.runtime.autocast():
                    teacher_logits = self.teacher(image)
                # With deep supervision the full-resolution logits come first.
                student_logits = logits[0] if isinstance(logits, list) else logits
                loss = loss + trainer.distill_weight * distillation_loss(
                    student_logits, teacher_logits, trainer.distill_temperature
                )
            self.optimiser.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimiser)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), trainer.grad_clip or math.inf)
            # One non-finite gradient would turn every weight into NaN for good. CPU bf16
            # convolutions produce one now and then (seen on small unpadded volumes), so such
            # a step is skipped, as the CUDA grad scaler skips its overflowing steps. Gradients
            # are all-reduced, so every process sees the same norm and skips together.
            finite = bool(torch.isfinite(grad_norm))
            if self.scaler is not None:
                self.scaler.step(self.optimiser)
                self.scaler.update()
            elif finite:
                self.optimiser.step()
            step_loss = loss.item()
            if finite:
                losses.append(step_loss)
                if self.averaged is not None:
                    self.averaged.update_parameters(self.model)
            else:
                skipped += 1
            self.state.global_step += 1
            samples += image.shape[0]
            bar.set_postfix(loss=f"{step_loss:.3f}", val_dice=f"{self.last_dice:.3f}")
        return losses, samples, skipped

    def _validate(self, epoch: int) -> dict[str, float]:
        scores = validation_dice(
            self.kept_model, self.val_data, self.runtime, self.config, self.split.label_names
        )
        mean = mean_dice(scores)
        self.last_dice = mean
        if mean > self.state.best_mean_dice:
            self.state.best_mean_dice, self.state.best_epoch, self.state.best_dice = mean, epoch, scores
            if self.distributed.is_main:
                save_model(self.kept_model, self.config, self.run_dir / BEST_MODEL_DIR)
        return {f"val_dice_{name}": value for name, value in scores.items()} | {"val_mean_dice": mean}

    def finish(self) -> int | None:
        """Figures and the registered model, once, at the end of a completed run."""
        keys = ["train_loss", "val_mean_dice", *(f"val_dice_{name}" for name in self.state.best_dice)]
        history = store.metric_histories(self.state.run_id, keys)
        with plots.released(plots.learning_curves(history)) as figure:
            mlflow.log_figure(figure, "learning_curves.png")
        best_dir = self.run_dir / BEST_MODEL_DIR
        if not best_dir.is_dir():
            return None
        self._log_overlay(best_dir)
        metrics = {"val_mean_dice": self.state.best_mean_dice}
        return store.log_model_and_register(best_dir, self.config, metrics)

    def _log_overlay(self, best_dir: Path) -> None:
        model, config = load_model(best_dir)
        model = self.runtime.prepare_model(model)
        case = self.val_data[0]
        image, label = case["image"], np.asarray(case["label"][0])
        masks = {"ground truth": label}
        for title, skip_mask in (("prediction", None), ("prediction, all skips off", [0] * model.num_skips)):
            logits = predict_logits(model, image[None], self.runtime, config, skip_mask)
            masks[title] = logits.argmax(dim=1)[0].numpy()
        index = plots.busiest_slice(label)
        figure = plots.overlay_panels(
            np.asarray(image[0])[..., index],
            {k: v[..., index] for k, v in masks.items()},
            self.split.label_names,
        )
        with plots.released(figure):
            mlflow.log_figure(figure, "validation_overlay.png")
