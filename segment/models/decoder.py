"""The U-Net decoder: upsample, join the long skip of that level (or not), convolve."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UpSample
from torch import nn

from segment.config import ModelConfig
from segment.models.blocks import double_conv


class DecoderLevel(nn.Module):
    """One decoder level: transposed-conv upsampling by ``factors`` (one per axis, those of
    the pooling it reverses), join, two conv-norm-act."""

    def __init__(
        self, config: ModelConfig, deeper_channels: int, skip_channels: int, factors: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.concat = config.skip_mode == "concat"
        # MONAI's deconv takes kernel = stride = the factor per axis: a factor of 1 keeps that axis.
        self.upsample = UpSample(
            config.spatial_dims, deeper_channels, skip_channels, scale_factor=factors, mode="deconv"
        )
        joined = 2 * skip_channels if self.concat else skip_channels
        self.convs = double_conv(config, joined, skip_channels)

    def forward(self, deeper: torch.Tensor, skip: torch.Tensor, skip_on: bool) -> torch.Tensor:
        x = self.upsample(deeper)
        # Encoder levels round odd sizes up, so the upsampled map can be one voxel too big.
        x = x[(slice(None), slice(None), *(slice(0, size) for size in skip.shape[2:]))]
        if self.concat:
            # A disabled concatenative skip is zero-filled so the convolution's input width holds.
            x = torch.cat([skip if skip_on else torch.zeros_like(skip), x], dim=1)
        elif skip_on:
            x = x + skip
        return self.convs(x)


class UNetDecoder(nn.Module):
    """Decoder whose channel wiring is derived from the encoder's ``out_channels``."""

    def __init__(self, config: ModelConfig, encoder_channels: Sequence[int]) -> None:
        super().__init__()
        # levels[k] rebuilds level k from level k+1 and skip k; run deepest first.
        self.levels = nn.ModuleList(
            DecoderLevel(config, encoder_channels[k + 1], encoder_channels[k], config.pool_factors[k])
            for k in range(len(encoder_channels) - 1)
        )
        self.out_channels = encoder_channels[0]

    def forward(
        self, features: Sequence[torch.Tensor], skips_on: Sequence[bool], keep: int = 1
    ) -> list[torch.Tensor]:
        """features: one (B, C_k, *S_k) map per level, finest first; skips_on: one flag per
        long skip, finest first. Returns what the ``keep`` finest decoder levels rebuilt, finest
        first: the full-resolution (B, C_0, *S_0) features, then (B, C_1, *S_1), and so on.
        Coarser maps are let go as soon as the next level is built."""
        x = features[-1]
        rebuilt = []
        for k in reversed(range(len(self.levels))):
            x = self.levels[k](x, features[k], skips_on[k])
            if k < keep:
                rebuilt.append(x)
        return rebuilt[::-1]
