"""Building blocks shared by the encoders and the decoder, all dimension-agnostic (2D/3D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv, Norm, get_norm_layer
from monai.networks.nets.basic_unet import TwoConv
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from segment.config import ModelConfig


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation as a group norm with one group per channel: the same function and
    the same parameters (``weight``, ``bias``) as ``nn.InstanceNorm3d(affine=True)``, so weights
    load either way. PyTorch's CPU instance norm returns a channels-first tensor from a
    channels-last one, which the next convolution copies back; its group norm keeps the layout
    and saves those copies (``docs/benchmarks.md`` has the timings)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_features, eps=eps, affine=affine)
        # "group" or "instance": which of PyTorch's two kernels computes it (engine.device
        # picks one per device). Not part of the state dict.
        self.kernel = "group"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.kernel == "instance":
            return F.instance_norm(input, weight=self.weight, bias=self.bias, eps=self.eps)
        return super().forward(input)


Norm.add_factory_class("channelwise_instance", InstanceNorm)
_NORMS = {"instance": ("channelwise_instance", {}), "batch": ("batch", {})}
_ACTS = {
    "leakyrelu": ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
    "relu": ("relu", {"inplace": True}),
    "prelu": ("prelu", {}),
    "gelu": ("gelu", {}),
}


def norm_spec(config: ModelConfig) -> tuple:
    return _NORMS[config.norm]


def act_spec(config: ModelConfig) -> tuple:
    return _ACTS[config.act]


def double_conv(config: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """Two 3x3 conv-norm-act layers, the classic U-Net level. No bias: a norm follows."""
    return TwoConv(
        config.spatial_dims,
        in_channels,
        out_channels,
        act=act_spec(config),
        norm=norm_spec(config),
        bias=False,
        dropout=config.dropout,
    )


def stem_conv(config: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """One 3x3 conv-norm-act at full resolution, the entry of the residual encoder."""
    return Convolution(
        config.spatial_dims,
        in_channels,
        out_channels,
        kernel_size=3,
        act=act_spec(config),
        norm=norm_spec(config),
        bias=False,
    )


def _residual_block_type(config: ModelConfig) -> type[nn.Module]:
    return ResNetBottleneck if config.block == "bottleneck" else ResNetBlock


def residual_width(config: ModelConfig, out_channels: int) -> int:
    """Channels a residual stage really produces: a bottleneck block widens its planes by
    its ``expansion``, so the width is rounded down to a multiple of it."""
    expansion = _residual_block_type(config).expansion
    return max(1, out_channels // expansion) * expansion


def residual_stage(
    config: ModelConfig, in_channels: int, out_channels: int, blocks: int, stride: tuple[int, ...]
) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes resolution (by ``stride``, one factor per
    axis) and width through a projection. MONAI's blocks hand their stride to PyTorch's
    convolutions as it is, so a per-axis tuple strides each axis by its own factor."""
    block_type = _residual_block_type(config)
    width = residual_width(config, out_channels)
    planes = width // block_type.expansion
    layers = []
    for index in range(blocks):
        block_in = in_channels if index == 0 else width
        projection = None
        if index == 0 and (max(stride) > 1 or block_in != width):
            projection = nn.Sequential(
                Conv[Conv.CONV, config.spatial_dims](
                    block_in, width, kernel_size=1, stride=stride, bias=False
                ),
                get_norm_layer(norm_spec(config), config.spatial_dims, width),
            )
        layers.append(
            block_type(
                block_in,
                planes,
                spatial_dims=config.spatial_dims,
                stride=stride if index == 0 else 1,
                downsample=projection,
                act=act_spec(config),
                norm=norm_spec(config),
            )
        )
    return nn.Sequential(*layers)
