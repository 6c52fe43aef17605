"""Encoders: each returns the feature map of every level, finest first.

An encoder exposes ``out_channels`` (one width per level) so the decoder derives its wiring
from the encoder instead of repeating it. ``plain`` and ``resnet`` differ only here.
"""

from __future__ import annotations

import torch
from monai.networks.layers import Pool
from torch import nn

from segment.config import ModelConfig
from segment.models.blocks import double_conv, residual_stage, residual_width, stem_conv


class LevelEncoder(nn.Module):
    """Runs its stages in order and keeps every stage's output: one feature map per level."""

    stages: nn.ModuleList
    out_channels: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class PlainEncoder(LevelEncoder):
    """Classic U-Net encoder: two conv-norm-act per level, max pooling between levels by the
    level's factor per axis (``config.pool_factors``, 2 by default), rounding odd sizes up, so
    no input padding is needed."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        pool = Pool[Pool.MAX, config.spatial_dims]
        stages = [double_conv(config, config.in_channels, config.widths[0])]
        for previous, current, factors in zip(
            config.widths[:-1], config.widths[1:], config.pool_factors, strict=True
        ):
            downsample = pool(kernel_size=factors, stride=factors, ceil_mode=True)
            stages.append(nn.Sequential(downsample, double_conv(config, previous, current)))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(config.widths)


class ResNetEncoder(LevelEncoder):
    """Residual encoder: a full-resolution stem, then stages of residual blocks whose first
    block lowers the resolution with a strided convolution, stride 2 along every axis unless
    ``config.pool_factors`` says otherwise (ResNet-18/34 layout)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        blocks = config.resnet_blocks
        widths = tuple(residual_width(config, c) for c in config.widths)
        stem = stem_conv(config, config.in_channels, config.widths[0])
        first = residual_stage(config, config.widths[0], widths[0], blocks[0], (1,) * config.spatial_dims)
        stages = [nn.Sequential(stem, first)]
        for level, factors in enumerate(config.pool_factors, start=1):
            stages.append(residual_stage(config, widths[level - 1], widths[level], blocks[level], factors))
        self.stages = nn.ModuleList(stages)
        self.out_channels = widths


ENCODERS = {"plain": PlainEncoder, "resnet": ResNetEncoder}


def build_encoder(config: ModelConfig) -> LevelEncoder:
    return ENCODERS[config.encoder](config)
