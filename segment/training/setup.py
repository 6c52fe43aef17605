"""What a training run is made of, built once from its config: the network and its optimiser,
the loss, the grad scaler for fp16, the moving average and the teacher; restored from a
checkpoint when a run resumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segment.config import ExperimentConfig, TrainerConfig
from segment.engine.device import Runtime
from segment.models import Segmenter, UNet, build_model
from segment.training.teaching import MovingAverage, copy_initial_weights, load_teacher


@dataclass
class TrainingSetup:
    config: ExperimentConfig
    runtime: Runtime
    model: UNet  # the weights being trained
    network: nn.Module  # what a step calls: the model, wrapped for DDP or compiled
    optimiser: torch.optim.Optimizer
    loss_function: nn.Module
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    averaged: MovingAverage | None = None
    teacher: Segmenter | None = None

    @property
    def kept_model(self) -> UNet:
        """The weights that are validated and kept as the best model."""
        return self.averaged.module if self.averaged is not None else self.model


def training_loss(trainer: TrainerConfig) -> nn.Module:
    """DiceCE on one logits tensor, or on the list of them that deep supervision returns."""
    return DeepSupervisionLoss(
        DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=trainer.dice_background,
            batch=trainer.batch_dice,
        )
    )


def build_setup(
    config: ExperimentConfig,
    runtime: Runtime,
    *,
    distributed: bool = False,
    checkpoint: dict | None = None,
) -> TrainingSetup:
    """Everything a step needs, on ``runtime``'s device; from ``checkpoint`` when resuming."""
    trainer = config.trainer
    model = build_model(config.model)
    if trainer.init_from is not None and checkpoint is None:
        copy_initial_weights(model, trainer.init_from)
    model = runtime.prepare_model(model)
    # The fused kernel updates every parameter in one launch; it exists for CUDA tensors.
    optimiser = torch.optim.AdamW(
        model.parameters(),
        lr=trainer.lr,
        weight_decay=trainer.weight_decay,
        fused=runtime.device.type == "cuda",
    )
    setup = TrainingSetup(
        config=config,
        runtime=runtime,
        model=model,
        network=model,
        optimiser=optimiser,
        loss_function=training_loss(trainer),
        scaler=torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None,
        averaged=MovingAverage(model, trainer.ema_decay) if trainer.ema_decay is not None else None,
        teacher=load_teacher(config, runtime) if trainer.teacher is not None else None,
    )
    if checkpoint is not None:
        restore(setup, checkpoint)
    if distributed:
        setup.network = DistributedDataParallel(setup.network)
    if trainer.compile:
        setup.network = torch.compile(setup.network)
    return setup


def restore(setup: TrainingSetup, checkpoint: dict) -> None:
    setup.model.load_state_dict(checkpoint["model"])
    # A run given ema_decay only on resume starts its average from the resumed weights.
    if setup.averaged is not None and checkpoint.get("averaged"):
        setup.averaged.load_state_dict(checkpoint["averaged"])
    setup.optimiser.load_state_dict(checkpoint["optimiser"])
    if setup.scaler is not None and checkpoint["scaler"]:
        setup.scaler.load_state_dict(checkpoint["scaler"])
