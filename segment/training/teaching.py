"""What a run takes from trained models: its starting weights (``trainer.init_from``), a
teacher to distil (``trainer.teacher``); and the moving average of its own weights it keeps."""

from __future__ import annotations

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
    import mlflow  # a model named by its MLflow URI is found in the run's store

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


class MovingAverage(AveragedModel):
    """An exponential moving average of a model's weights (and buffers). Its decay ramps up as
    (1 + n) / (10 + n) towards ``decay``, so the random initialisation does not linger in the
    average through the first epochs.

    Each update is one fused ``torch._foreach_lerp_`` per device and dtype, and the count of
    updates is read from AveragedModel's own counter, which stays on the host: reading the
    copy it hands to ``multi_avg_fn`` from a CUDA device would wait for the GPU."""

    def __init__(self, model: UNet, decay: float) -> None:
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.decay = decay

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _) -> None:
        if not averaged[0].is_floating_point():  # counters such as num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        updates = int(self.n_averaged)
        rate = min(self.decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(averaged, current, 1.0 - rate)
