"""A model as a standalone graph, ONNX or TorchScript, for runtimes without this package.

The skip mask is an input of the graph, not baked in: ``skip_mask`` is a float tensor with one
0/1 per long skip, finest first, and each long skip's features are multiplied by it before the
decoder joins them, which is what switching that skip off does in :class:`UNet` (a
concatenated skip becomes zeros, an added one adds nothing). A skip the model was built without
stays off whatever the input says. The spatial size (and the batch) are dynamic.

The graph takes the volume as the model sees it: (B, in_channels, X, Y, Z), RAS, normalised as
the model's config says (``config.yaml``, stored in the file: the ONNX metadata key
``segment_config``, or TorchScript's extra file ``config.yaml``). It returns logits; an
ensemble returns the log of its members' mean softmax, as :class:`UNetEnsemble` does."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segment.atomic import write_atomically
from segment.config import ExperimentConfig, config_to_yaml
from segment.models.ensemble import UNetEnsemble
from segment.models.unet import UNet

FORMATS = ("onnx", "torchscript")
CONFIG_KEY = "segment_config"


class _GatedUNet(nn.Module):
    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("built", torch.tensor([float(on) for on in unet.config.built_skips]))

    def forward(self, image: torch.Tensor, skip_mask: torch.Tensor) -> torch.Tensor:
        gates = skip_mask.to(image.dtype) * self.built
        features = self.unet.encode(image)
        levels = self.unet.decoder.levels
        x = features[-1]
        for k in reversed(range(len(levels))):
            level, skip = levels[k], features[k] * gates[k]
            upsampled = level.upsample(x)
            # Encoder levels round odd sizes up: crop the upsampled map to the skip's size.
            upsampled = upsampled[(slice(None), slice(None), *(slice(0, size) for size in skip.shape[2:]))]
            x = torch.cat([skip, upsampled], dim=1) if level.concat else upsampled + skip
            x = level.convs(x)
        return self.unet.head(x)


class SkipMaskInput(nn.Module):
    """``model`` (a U-Net or an ensemble) with the skip mask as a tensor input."""

    def __init__(self, model: UNet | UNetEnsemble) -> None:
        super().__init__()
        members = model.members if isinstance(model, UNetEnsemble) else [model]
        self.members = nn.ModuleList(_GatedUNet(member) for member in members)

    def forward(self, image: torch.Tensor, skip_mask: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](image, skip_mask)
        softmax = torch.stack([member(image, skip_mask).softmax(dim=1) for member in self.members])
        return softmax.mean(dim=0).clamp_min(1e-12).log()


def export_graph(model: UNet | UNetEnsemble, config: ExperimentConfig, format: str, output: Path) -> Path:
    """Write ``model`` as an ONNX or TorchScript file at ``output``, whole or not at all."""
    graph = SkipMaskInput(model.float().cpu()).eval()
    # Along each axis, 3 voxels more than one voxel of the coarsest level spans: every level
    # keeps at least two voxels, as instance norm needs.
    spatial = [scale + 3 for scale in config.model.level_scales[-1]]
    example = (torch.randn(1, config.model.in_channels, *spatial), torch.ones(model.num_skips))
    recipe = config_to_yaml(config)
    if format == "onnx":
        write_atomically(output, lambda temporary: _write_onnx(graph, example, recipe, temporary))
    else:
        with torch.no_grad():
            traced = torch.jit.trace(graph, example)
        write_atomically(output, lambda temporary: traced.save(str(temporary), _extra_files={"config.yaml": recipe}))
    return output


def _write_onnx(graph: nn.Module, example: tuple, recipe: str, path: Path) -> None:
    import onnx

    dynamic = torch.export.Dim.AUTO
    image_axes = {axis: dynamic for axis in range(example[0].dim()) if axis != 1}
    program = torch.onnx.export(
        graph,
        example,
        input_names=["image", "skip_mask"],
        output_names=["logits"],
        dynamic_shapes={"image": image_axes, "skip_mask": None},
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {CONFIG_KEY: recipe})
    onnx.save(proto, str(path))
