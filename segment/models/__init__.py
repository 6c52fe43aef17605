"""The U-Net family: plain or residual encoder, one decoder, switchable long skips."""

from segment.models.serialization import ModelLoadError, load_model, save_model
from segment.models.unet import SkipMask, UNet, build_model

__all__ = ["ModelLoadError", "SkipMask", "UNet", "build_model", "load_model", "save_model"]
