"""The skip-aware U-Net: encoder -> decoder (with a per-level skip mask) -> head.

Every long skip is a switch passed as an argument, never stored on the module, so one
loaded model can serve many callers with different skip settings at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from torch import nn

from segment.config import ModelConfig
from segment.errors import InputError
from segment.models.decoder import UNetDecoder
from segment.models.encoders import build_encoder

SkipMask = Sequence[bool | int] | None
"""The skips a caller switches on (1) or off (0) at run time, one flag per long skip, finest
level first; None means the long skips the model was built with (``ModelConfig.long_skips``)."""


class UNet(nn.Module):
    """2D/3D U-Net with concatenative (or additive) long skips that can be switched off."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = UNetDecoder(config, self.encoder.out_channels)
        conv = Conv[Conv.CONV, config.spatial_dims]
        self.head = conv(self.decoder.out_channels, config.out_channels, kernel_size=1)
        # Deep supervision: heads on the next-coarser decoder levels, used in training only.
        self.deep_supervision_heads = nn.ModuleList(
            conv(self.encoder.out_channels[level], config.out_channels, kernel_size=1)
            for level in range(1, config.deep_supervision + 1)
        )
        self._skip_dropout = torch.tensor(config.skip_dropout_per_level)

    @property
    def num_skips(self) -> int:
        return self.config.num_skips

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, in_channels, *spatial), any size -> one feature map per level, finest first.

        Each level is ceil(previous / factor) in size per axis, its factor from
        ``config.pool_factors`` (2 by default), so odd sizes need no padding."""
        return self.encoder(x)

    def decode(
        self, features: Sequence[torch.Tensor], skip_mask: SkipMask = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, out_channels, *spatial) at the input's size, with the skips ``skip_mask`` leaves on.

        In training mode each enabled skip is also dropped with its skip-dropout probability,
        once per batch; a model with deep supervision then returns a list, the full-resolution
        logits first and each coarser level's logits (at that level's size) after them."""
        skips_on = self.resolve_skip_mask(skip_mask)
        if self.training:
            dropped = torch.rand(self.num_skips) < self._skip_dropout
            skips_on = tuple(on and not drop for on, drop in zip(skips_on, dropped.tolist(), strict=True))
        supervised = self.deep_supervision_heads if self.training else nn.ModuleList()
        finest, *coarser = self.decoder(features, skips_on, keep=1 + len(supervised))
        logits = self.head(finest)
        if not supervised:
            return logits
        return [logits, *(head(x) for head, x in zip(supervised, coarser, strict=True))]

    def forward(self, x: torch.Tensor, skip_mask: SkipMask = None) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, in_channels, *spatial) -> logits (B, out_channels, *spatial); in training
        with deep supervision, a list of logits as :meth:`decode` says."""
        return self.decode(self.encode(x), skip_mask)

    def resolve_skip_mask(self, skip_mask: SkipMask) -> tuple[bool, ...]:
        """Validate a skip mask and return one bool per long skip, finest first. None means the
        long skips the model was built with (``config.long_skips``, by default all)."""
        if skip_mask is None:
            return self.config.built_skips
        flags = tuple(bool(flag) for flag in skip_mask)
        if len(flags) != self.num_skips:
            raise InputError(
                f"The skip mask has {len(flags)} entries but this model has {self.num_skips} long "
                f"skips; give one 0/1 per level, finest first."
            )
        return flags


def build_model(config: ModelConfig) -> UNet:
    return UNet(config)
