"""Saving and loading models as safetensors weights plus the experiment's YAML config.

Nothing is pickled: a model directory can come from anywhere and loading it runs no code.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segment.atomic import write_atomically
from segment.config import ConfigError, ExperimentConfig, config_to_yaml, load_config
from segment.models.unet import UNet

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class ModelLoadError(ValueError):
    """A model directory is missing, incomplete or does not match its config."""


def save_model(model: UNet, config: ExperimentConfig, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` into ``directory``; returns it."""
    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(
        directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"name": config.name})
    )
    write_atomically(directory / CONFIG_FILE, lambda p: p.write_text(config_to_yaml(config)))
    return directory


def load_model(directory: str | Path) -> tuple[UNet, ExperimentConfig]:
    """Build the model its config describes and load its weights; returned in eval mode."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() or not (directory / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{directory} is not a model directory: it needs {WEIGHTS_FILE} and {CONFIG_FILE}."
        )
    try:
        config = load_config(directory / CONFIG_FILE)
    except ConfigError as error:
        raise ModelLoadError(f"{directory} has an unusable config: {error}") from None
    model = UNet(config.model)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{weights} is not a readable safetensors file ({error}).") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelLoadError(
            f"{weights} does not match the architecture in {CONFIG_FILE}; "
            f"the weights were saved from a different model."
        ) from None
    return model.eval(), config
