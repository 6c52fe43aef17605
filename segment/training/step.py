"""One optimiser step on one batch: forward in the run's precision, the loss in fp32, backward
(scaled for fp16), clipping, the update, and the moving average."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.utils import convert_to_tensor

from segment.training.setup import TrainingSetup
from segment.training.teaching import distillation_loss


@dataclass(frozen=True)
class StepResult:
    loss: float
    finite: bool  # False: the gradient was not finite, and the weights were left unchanged
    samples: int
    # The norm of the gradient reaching each encoder level's weights, finest level first: how
    # much of the loss's signal gets back to the early layers (the skip study's gradient flow).
    level_gradient_norms: tuple[float, ...] = ()


def _fp32(logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Logits from autocast are bf16 or fp16; softmax, log and their sums lose digits there."""
    if isinstance(logits, list):  # deep supervision: one tensor per output level
        return [tensor.float() for tensor in logits]
    return logits.float()


def level_gradient_norms(model: torch.nn.Module) -> tuple[float, ...]:
    """The L2 norm of the gradients of each encoder level's parameters, finest first; one
    device sync for all levels. Empty for a network without our level encoder (the GPU
    benchmark's reference networks)."""
    stages = getattr(getattr(model, "encoder", None), "stages", None)
    if stages is None:
        return ()
    norms = []
    for stage in stages:
        grads = [p.grad.detach().float() for p in stage.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return tuple(torch.stack(norms).tolist())


def train_step(setup: TrainingSetup, batch: dict, lr: float) -> StepResult:
    """Train ``setup``'s network on ``batch`` (``image`` and ``label`` tensors, channel first)
    at learning rate ``lr``."""
    trainer, runtime = setup.config.trainer, setup.runtime
    for group in setup.optimiser.param_groups:
        group["lr"] = lr
    image = runtime.to_device(convert_to_tensor(batch["image"], track_meta=False))
    label = runtime.to_device(convert_to_tensor(batch["label"], track_meta=False))
    with runtime.autocast():
        logits = setup.network(image)
    logits = _fp32(logits)
    loss = setup.loss_function(logits, label)
    if setup.teacher is not None and trainer.distill_weight > 0:
        with torch.no_grad(), runtime.autocast():
            teacher_logits = setup.teacher(image)
        # With deep supervision the full-resolution logits come first.
        student_logits = logits[0] if isinstance(logits, list) else logits
        loss = loss + trainer.distill_weight * distillation_loss(
            student_logits, teacher_logits, trainer.distill_temperature
        )
    setup.optimiser.zero_grad(set_to_none=True)
    scaler = setup.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        # Clipping compares true gradients with grad_clip, so the scale comes off first.
        scaler.unscale_(setup.optimiser)
    else:
        loss.backward()
    level_norms = level_gradient_norms(setup.model)  # before clipping: the gradient the loss gave
    grad_norm = torch.nn.utils.clip_grad_norm_(setup.model.parameters(), trainer.grad_clip or math.inf)
    # One non-finite gradient would turn every weight into NaN for good. CPU bf16 convolutions
    # produce one now and then (seen on small unpadded volumes), so such a step is skipped, as
    # the grad scaler skips fp16's overflowing steps. Gradients are all-reduced, so every
    # process sees the same norm and skips together.
    finite = bool(torch.isfinite(grad_norm))
    if scaler is not None:
        scaler.step(setup.optimiser)  # skips the update itself when the gradient overflowed
        scaler.update()
    elif finite:
        setup.optimiser.step()
    if finite and setup.averaged is not None:
        setup.averaged.update_parameters(setup.model)
    return StepResult(
        loss=loss.item(), finite=finite, samples=image.shape[0], level_gradient_norms=level_norms if finite else ()
    )
