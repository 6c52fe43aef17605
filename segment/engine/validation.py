"""Validation during training: whole-volume inference and MONAI's Dice per class."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.engine.inference import predict_logits
from segment.models import SkipMask, UNet


def dice_per_class(
    model: UNet,
    dataset,
    runtime: Runtime,
    config: ExperimentConfig,
    label_names: dict[int, str],
    skips: SkipMask = None,
) -> dict[str, float]:
    """Mean Dice over the cases of ``dataset`` for each foreground label, keyed by label name.

    A case where a label is absent from both prediction and truth counts as a perfect 1.0 for
    that label, as in the Decathlon's scoring."""
    classes = config.model.out_channels
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    for case in dataset:
        image, label = case["image"], case["label"]
        logits = predict_logits(
            model, image[None], runtime, config.trainer.roi_size, config.trainer.sw_batch_size, skips
        )
        prediction = logits.argmax(dim=1, keepdim=True)
        metric(one_hot(prediction, classes), one_hot(torch.as_tensor(label)[None].long(), classes))
    scores = metric.aggregate().tolist()
    metric.reset()
    return {
        label_names.get(value, str(value)): score
        for value, score in zip(range(1, classes), scores, strict=True)
    }


def mean_dice(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)
