"""Saving and loading models as safetensors weights plus the experiment's YAML config.

Nothing is pickled: a model directory can come from anywhere and loading it runs no code.
An ensemble directory holds one such directory per member and an ``ensemble.yaml`` naming them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from segment.atomic import current_umask, reported_when_full, write_atomically
from segment.config import ConfigError, ExperimentConfig, config_to_yaml, load_config
from segment.errors import SegmentError
from segment.models.ensemble import Segmenter, UNetEnsemble, mismatch
from segment.models.unet import UNet

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
ENSEMBLE_FILE = "ensemble.yaml"


class ModelLoadError(SegmentError):
    """A model directory is missing, incomplete or does not match its config."""


def save_model(
    model: UNet, config: ExperimentConfig, directory: str | Path, weights_dtype: torch.dtype | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.yaml`` into ``directory``; returns it.

    ``weights_dtype`` (e.g. float16) stores floating-point weights in that precision; loading
    casts them back to the model's float32."""
    directory = Path(directory)
    state = {
        name: (tensor.to(weights_dtype) if weights_dtype and tensor.is_floating_point() else tensor)
        .detach()
        .cpu()
        .contiguous()
        for name, tensor in model.state_dict().items()
    }
    # Serialised here and written by Python, not by safetensors' save_file: that reports a full
    # disk as a SafetensorError, and only the OSError says it is one.
    weights = safetensors_bytes(state, metadata={"name": config.name})
    write_atomically(directory / WEIGHTS_FILE, lambda p: p.write_bytes(weights))
    write_atomically(directory / CONFIG_FILE, lambda p: p.write_text(config_to_yaml(config)))
    return directory


def is_model_directory(directory: Path) -> bool:
    return (directory / ENSEMBLE_FILE).is_file() or (
        (directory / WEIGHTS_FILE).is_file() and (directory / CONFIG_FILE).is_file()
    )


def save_ensemble(
    members: list[tuple[UNet, ExperimentConfig]],
    directory: str | Path,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write each member as a model directory (``member_1``, ...) and ``ensemble.yaml`` into
    ``directory``, which must not exist yet: it appears whole or not at all."""
    directory = Path(directory)
    if len(members) < 2:
        raise ValueError("An ensemble needs at least two members.")
    _check_members([config for _, config in members], directory)
    with _staged(directory) as staging:
        names = [f"member_{index}" for index in range(1, len(members) + 1)]
        for name, (model, config) in zip(names, members, strict=True):
            save_model(model, config, staging / name, weights_dtype)
        (staging / ENSEMBLE_FILE).write_text(yaml.safe_dump({"members": names}))
    return directory


def export_model(source: str | Path, directory: str | Path, weights_dtype: torch.dtype | None = None) -> Path:
    """Copy the model (or ensemble) in ``source`` into ``directory``, which must not exist yet,
    re-saving its weights in ``weights_dtype`` when given; only the model's files go across."""
    members = load_members(source)
    if len(members) > 1:
        return save_ensemble(members, directory, weights_dtype)
    directory = Path(directory)
    with _staged(directory) as staging:
        save_model(*members[0], staging, weights_dtype)
    return directory


@contextmanager
def _staged(directory: Path) -> Iterator[Path]:
    """An empty folder beside ``directory`` that is renamed to it once filled, so that the new
    folder appears whole or not at all."""
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new folder.")
    # A full disk is told of the folder asked for, not of the hidden one it was being filled in.
    with reported_when_full(directory, f"the model to {directory}", "folder"):
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            yield staging
            # mkdtemp makes an owner-only folder; give it the permissions a plain mkdir would.
            staging.chmod(0o777 & ~current_umask())
            staging.rename(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def load_model(directory: str | Path) -> tuple[Segmenter, ExperimentConfig]:
    """Build the model its config describes and load its weights; returned in eval mode.

    An ensemble directory gives a :class:`UNetEnsemble` and its first member's config."""
    return as_segmenter(load_members(directory))


def as_segmenter(members: list[tuple[UNet, ExperimentConfig]]) -> tuple[Segmenter, ExperimentConfig]:
    """The one member, or the ensemble of several with its first member's config."""
    if len(members) == 1:
        return members[0]
    return UNetEnsemble([model for model, _ in members]).eval(), members[0][1]


def load_members(directory: str | Path) -> list[tuple[UNet, ExperimentConfig]]:
    """Each member of an ensemble directory with its own config (its training recipe); a plain
    model directory is its own single member."""
    directory = Path(directory)
    if not (directory / ENSEMBLE_FILE).is_file():
        return [_load_single(directory)]
    listing = directory / ENSEMBLE_FILE
    try:
        names = yaml.safe_load(listing.read_text())["members"]
    except (yaml.YAMLError, UnicodeDecodeError, OSError, TypeError, KeyError):
        names = None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{listing} must list at least two member folders under 'members'.")
    root = directory.resolve()
    folders = [(directory / name).resolve() for name in names]
    if any(folder.parent != root for folder in folders):
        raise ModelLoadError(f"{listing} may only name folders directly inside {directory}.")
    if any((folder / ENSEMBLE_FILE).exists() for folder in folders):
        raise ModelLoadError(f"{listing} names an ensemble as a member; ensembles do not nest.")
    members = [_load_single(folder) for folder in folders]
    _check_members([config for _, config in members], directory)
    return members


def _load_single(directory: Path) -> tuple[UNet, ExperimentConfig]:
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


def _check_members(configs: list[ExperimentConfig], directory: Path) -> None:
    for index, config in enumerate(configs[1:], start=2):
        if (setting := mismatch(configs[0], config)) is not None:
            raise ModelLoadError(
                f"The members of {directory} cannot be averaged: member {index} differs from "
                f"member 1 in {setting}."
            )
