"""The U-Net family: plain or residual encoder, one decoder, switchable long skips; and
ensembles of U-Nets that predict as one."""

from segment.models.ensemble import Segmenter, UNetEnsemble, split_mismatch
from segment.models.serialization import (
    ModelLoadError,
    as_segmenter,
    export_model,
    load_members,
    load_model,
    save_ensemble,
    save_model,
)
from segment.models.unet import SkipMask, UNet, build_model

__all__ = [
    "ModelLoadError",
    "Segmenter",
    "SkipMask",
    "UNet",
    "UNetEnsemble",
    "as_segmenter",
    "build_model",
    "export_model",
    "load_members",
    "load_model",
    "save_ensemble",
    "save_model",
    "split_mismatch",
]
