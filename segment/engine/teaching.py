"""What a run takes from trained models: its starting weights (``trainer.init_from``), a
teacher to distil (``trainer.teacher``); and the moving average of its own weights it keeps."""

from __future__ import annotations

import mlflow
import torch
from torch.optim.swa_utils import AveragedModel

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.models import ModelLoadError, Segmenter, UNet, load_model
from segment.models.ensemble import first_difference
from segment.models.sources import resolve_model

# What a teacher must share with the network it teaches: one output per voxel of the same labels.
TEACHER_SETTINGS = {"data": ("task",), "model": ("spatial_dims", "out_channels")}


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL divergence of the student's softmax from the teacher's, both softened by
    ``temperature``, summed over classes and averaged over voxels, times temperature^2 so that
    its gradient keeps its scale whatever the temperature (Hinton et al., 2015)."""
    target = (teacher_logits.float() / temperature).softmax(dim=1)
    log_student = (student_logits.float() / temperature).log_softmax(dim=1)
    divergence = (target * (target.clamp_min(1e-12).log() - log_student)).sum(dim=1)
    return temperature**2 * divergence.mean()


def load_trained(spec: str, what: str) -> tuple[Segmenter, ExperimentConfig]:
    try:
        return load_model(resolve_model(spec, mlflow.get_tracking_uri()))
    except ModelLoadError as error:
        raise ModelLoadError(f"{what} {spec}: {error}") from None


def copy_initial_weights(model: UNet, spec: str) -> None:
    """Copy a trained model's weights into ``model``; it must have the same architecture."""
    source, _ = load_trained(spec, "trainer.init_from")
    if isinstance(source, UNet):
        try:
            model.load_state_dict(source.state_dict())
            return
        except RuntimeError:
            pass
    raise ModelLoadError(
        f"trainer.init_from {spec}: its weights do not fit the model this config builds; "
        f"give a model of the same architecture."
    )


def load_teacher(config: ExperimentConfig, runtime: Runtime) -> Segmenter:
    teacher, teacher_config = load_trained(config.trainer.teacher, "trainer.teacher")
    setting = first_difference(config, teacher_config, TEACHER_SETTINGS)
    if setting is not None:
        raise ModelLoadError(
            f"trainer.teacher {config.trainer.teacher} cannot teach this model: its {setting} differs."
        )
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return runtime.prepare_model(teacher).eval()


def moving_average(model: UNet, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights. Its decay ramps up as
    (1 + n) / (10 + n) towards ``decay``, so the random initialisation does not linger in
    the average through the first epochs."""

    def average(averaged: torch.Tensor, current: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        rate = min(decay, float((1 + steps) / (10 + steps)))
        return rate * averaged + (1.0 - rate) * current

    return AveragedModel(model, avg_fn=average, use_buffers=True)
