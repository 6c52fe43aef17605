"""Per-voxel probabilities, and how unsure the model is of them.

Probabilities come from several samples of the model where it has them: each member of an
ensemble, or, for a U-Net trained with skip dropout, Monte Carlo over its skip settings (each
long skip on with probability 1 - its dropout, as in training; every skip setting is a decoder
the model was trained to be). Otherwise one forward pass.

- ``entropy``: of the mean softmax, divided by log(classes), so 0 is certain and 1 is uniform.
- ``disagreement``: the mutual information between the prediction and the sample (the entropy
  of the mean minus the mean entropy, divided by log(classes)): 0 where every sample agrees.
  Only with two or more samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from segment.config import ExperimentConfig
from segment.engine.device import Runtime
from segment.engine.inference import FeatureCache, predict_logits
from segment.models import Segmenter, SkipMask, UNet, UNetEnsemble

DEFAULT_SAMPLES = 8


@dataclass
class Estimate:
    probabilities: torch.Tensor  # (1, classes, X, Y, Z): the mean softmax of the samples
    entropy: torch.Tensor  # (1, 1, X, Y, Z) in [0, 1]
    disagreement: torch.Tensor | None  # (1, 1, X, Y, Z) in [0, 1]; None from one sample
    source: str  # how the samples were drawn, for the user


def _entropy(probabilities: torch.Tensor) -> torch.Tensor:
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1, keepdim=True)


def skip_samples(model: UNet, skip_mask: SkipMask, samples: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``samples`` skip settings, each skip kept with probability 1 - its dropout; a skip that
    ``skip_mask`` (or the model's own setting) switches off stays off."""
    allowed = model.resolve_skip_mask(skip_mask)
    keep = 1.0 - torch.tensor(model.config.skip_dropout_per_level)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(samples, len(allowed), generator=generator) < keep
    return [tuple(int(on and bool(drawn)) for on, drawn in zip(allowed, row, strict=True)) for row in draws]


def estimate(
    model: Segmenter,
    volume: torch.Tensor,
    runtime: Runtime,
    config: ExperimentConfig,
    skip_mask: SkipMask = None,
    samples: int = DEFAULT_SAMPLES,
    cache: FeatureCache | None = None,
) -> Estimate:
    """Probabilities, entropy and disagreement for a prepared ``volume`` (1, C, X, Y, Z).
    ``cache``: a U-Net's encoder output for this volume, when the caller already has it."""
    if isinstance(model, UNetEnsemble):
        outputs = [predict_logits(member, volume, runtime, config, skip_mask) for member in model.members]
        source = f"the {len(outputs)} members of the ensemble"
    elif isinstance(model, UNet) and samples > 1 and max(model.config.skip_dropout_per_level) > 0:
        cache = cache or FeatureCache()  # the encoder runs once; each skip setting re-runs the decoder
        masks = skip_samples(model, skip_mask, samples)
        outputs = [predict_logits(model, volume, runtime, config, mask, cache=cache) for mask in masks]
        source = f"{samples} skip settings drawn with the model's skip dropout"
    else:
        outputs = [predict_logits(model, volume, runtime, config, skip_mask)]
        source = "one forward pass (the model has neither members nor skip dropout)"
    softmaxes = torch.stack([output.softmax(dim=1) for output in outputs])
    mean = softmaxes.mean(dim=0)
    scale = math.log(mean.shape[1])
    entropy = _entropy(mean) / scale
    disagreement = None
    if len(outputs) > 1:
        mean_entropy = torch.stack([_entropy(sample) for sample in softmaxes]).mean(dim=0) / scale
        disagreement = (entropy - mean_entropy).clamp_min(0.0)
    return Estimate(mean, entropy, disagreement, source)
