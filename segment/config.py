"""Typed experiment configuration, loaded from YAML with ``--set key=value`` overrides.

Every section forbids unknown keys, so a typo fails loudly instead of silently training the
default. Errors are raised as :class:`ConfigError` carrying one sentence that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration the user wrote cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_DERIVED_CHANNELS = 320  # nnU-Net's cap: wider bottlenecks cost memory for little gain


class ModelConfig(_Section):
    """The U-Net: levels, encoder kind, how long skips join, and skip dropout."""

    spatial_dims: Literal[2, 3] = 3
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(2, ge=1)
    # Resolution levels; level 1 is full resolution, the last is the bottleneck.
    levels: int = Field(5, ge=2, le=8)
    # Feature channels per level: given explicitly, or base_channels doubled per level.
    channels: tuple[int, ...] | None = None
    base_channels: int = Field(16, ge=1)
    encoder: Literal["plain", "resnet"] = "plain"
    # Residual blocks per level (resnet encoder only). None means ResNet-18-like:
    # one block at full resolution, two per deeper level. ResNet-34-like is 1,3,4,6,3.
    blocks_per_level: tuple[int, ...] | None = None
    block: Literal["basic", "bottleneck"] = "basic"
    skip_mode: Literal["concat", "add"] = "concat"
    # Probability that a long skip is zeroed for a training batch: one value for every
    # level, or one per level.
    skip_dropout: float | tuple[float, ...] = 0.0
    # Which long skips the model has (1) or lacks (0), finest first; None: all of them. A
    # model trained without a skip is the honest reference for switching that skip off.
    skips: tuple[Literal[0, 1], ...] | None = None
    norm: Literal["instance", "batch"] = "instance"
    act: Literal["leakyrelu", "relu", "prelu", "gelu"] = "leakyrelu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Deep supervision: this many next-coarser decoder levels get their own output head during
    # training, scored against the label shrunk to their size with weights 1/2, 1/4, ... of
    # the full-resolution loss (MONAI's DeepSupervisionLoss). nnU-Net supervises all but the
    # two coarsest levels. Prediction uses the full-resolution output alone.
    deep_supervision: int = Field(0, ge=0)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels per level, finest first."""
        if self.channels is not None:
            return self.channels
        return tuple(min(self.base_channels * 2**level, MAX_DERIVED_CHANNELS) for level in range(self.levels))

    @property
    def num_skips(self) -> int:
        return self.levels - 1

    @property
    def built_skips(self) -> tuple[bool, ...]:
        """One flag per long skip the model has, finest first."""
        return tuple(bool(flag) for flag in self.skips or (1,) * self.num_skips)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.channels is not None:
            if len(self.channels) != self.levels:
                raise ValueError(
                    f"channels lists {len(self.channels)} widths but levels is {self.levels}; "
                    f"give one width per level"
                )
            if any(c < 1 for c in self.channels):
                raise ValueError(f"channels must all be positive, got {list(self.channels)}")
        if self.blocks_per_level is not None:
            if self.encoder != "resnet":
                raise ValueError("blocks_per_level applies only to the resnet encoder")
            if len(self.blocks_per_level) != self.levels:
                raise ValueError(
                    f"blocks_per_level has {len(self.blocks_per_level)} entries but levels is "
                    f"{self.levels}; give one block count per level"
                )
            if any(b < 1 for b in self.blocks_per_level):
                raise ValueError("blocks_per_level must all be at least 1")
        if self.deep_supervision > self.levels - 2:
            raise ValueError(
                f"deep_supervision can supervise at most {self.levels - 2} coarser levels of a "
                f"{self.levels}-level model, got {self.deep_supervision}"
            )
        if self.skips is not None and len(self.skips) != self.num_skips:
            raise ValueError(
                f"skips has {len(self.skips)} entries but the model has {self.num_skips} long skips"
            )
        probabilities = self.skip_dropout_per_level
        if len(probabilities) != self.num_skips:
            raise ValueError(
                f"skip_dropout has {len(probabilities)} entries but the model has "
                f"{self.num_skips} long skips (one fewer than the {self.levels} levels)"
            )
        if any(not 0.0 <= p < 1.0 for p in probabilities):
            raise ValueError(f"skip_dropout values must be in [0, 1), got {list(probabilities)}")
        return self

    @property
    def skip_dropout_per_level(self) -> tuple[float, ...]:
        if isinstance(self.skip_dropout, tuple):
            return self.skip_dropout
        return (float(self.skip_dropout),) * self.num_skips

    @property
    def resnet_blocks(self) -> tuple[int, ...]:
        return self.blocks_per_level or (1,) + (2,) * (self.levels - 1)


class DataConfig(_Section):
    """Which MSD-layout task to read, how to normalise it, and how to split it."""

    task: str = "Task04_Hippocampus"
    # Intensity normalisation: z-score inside the body for MRI and EM after clipping to
    # percentiles; a fixed Hounsfield window for CT.
    modality: Literal["mri", "ct", "em"] = "mri"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # Resample to this voxel spacing (mm); None keeps each scan's own spacing.
    spacing: tuple[float, ...] | None = None
    # Train on random patches of this size; None trains on whole volumes (or slices in 2D).
    patch_size: tuple[int, ...] | None = None
    patches_per_volume: int = Field(2, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    # Cross-validation (nnU-Net's five folds): the shuffled cases are cut into this many folds
    # and fold `fold` (0-based) is the validation split, so runs of folds 0..folds-1 together
    # validate on every case once. None draws val_fraction of the cases instead.
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    # Use only the first N cases of the task (after sorting): quick experiments and tests.
    max_cases: int | None = Field(None, ge=2)
    cache_rate: float = Field(1.0, ge=0.0, le=1.0)
    num_workers: int = Field(0, ge=0)
    augment: bool = True
    # Probability of a random rotation (up to rotate_degrees about each axis) and scaling (by a
    # factor drawn from scale_range per axis) per training sample: it costs CPU time, so tasks
    # opt in. nnU-Net's ranges are 30 degrees and 0.7-1.4.
    affine_augment_prob: float = Field(0.0, ge=0.0, le=1.0)
    rotate_degrees: float = Field(15.0, ge=0.0, le=180.0)
    scale_range: tuple[float, float] = (0.9, 1.1)
    # "basic" scales and shifts intensities a little; "nnunet" draws nnU-Net's intensity set
    # (noise, blur, brightness, contrast, low resolution, gamma), each with nnU-Net's
    # probability. Both cost about a millisecond per hippocampus volume.
    intensity_augment: Literal["basic", "nnunet"] = "basic"
    # Spatial axes (of the RAS volume) along which training samples are mirrored at random.
    # Mirroring along an axis that carries label meaning (anterior vs posterior) teaches the
    # model to confuse those labels, so tasks choose their own.
    flip_axes: tuple[int, ...] = (0,)

    @model_validator(mode="after")
    def _check_ranges(self) -> DataConfig:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be two factors with 0 < low <= high, got {[low, high]}")
        if self.fold and self.folds is None:
            raise ValueError("fold is set but folds is not; give data.folds too, e.g. data.folds=5")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(
                f"fold must be one of 0..{self.folds - 1} with {self.folds} folds, got {self.fold}"
            )
        return self


class TrainerConfig(_Section):
    """The optimisation recipe and its budget."""

    max_epochs: int = Field(100, ge=1)
    # Stop after this many minutes of training, whatever the epoch (None: no limit).
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float | None = Field(12.0, gt=0)
    # The Dice half of the DiceCE loss. MONAI's default scores every label, background too,
    # per sample; nnU-Net's scores the foreground labels only, pooled over the batch, so a
    # sample with a small structure does not swing the loss.
    dice_background: bool = True
    batch_dice: bool = False
    # Validate and keep an exponential moving average of the weights with this decay per step
    # (e.g. 0.999): it smooths the noise of the last steps out of the model that is kept.
    # None validates the weights as trained.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    val_every: int = Field(1, ge=1)
    # Sliding-window size for validation and prediction; None runs whole volumes.
    roi_size: tuple[int, ...] | None = None
    sw_batch_size: int = Field(4, ge=1)
    # Mixed precision: fp16 on CUDA, bf16 on a CPU that supports it; "off" for fp32.
    amp: Literal["auto", "off"] = "auto"
    channels_last: bool = True
    seed: int = 0
    # Start from a trained model's weights (a bundled name, MLflow URI or model folder of the
    # same architecture) instead of a random initialisation.
    init_from: str | None = None
    # Knowledge distillation: a trained model of the same task (an ensemble too) whose softmax
    # output, softened by distill_temperature, the network also learns to match; the loss adds
    # distill_weight x temperature^2 x their KL divergence per voxel to DiceCE on the labels.
    teacher: str | None = None
    distill_weight: float = Field(1.0, ge=0)
    distill_temperature: float = Field(1.0, gt=0)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value):
        # YAML reads a bare `off` (in a file or in --set trainer.amp=off) as the boolean false.
        return "off" if value is False else value


class ExperimentConfig(_Section):
    """One experiment: a named model on a task with a training recipe."""

    name: str = Field(..., min_length=1)
    # Label value -> name, recorded when training reads the task's dataset.json.
    labels: dict[int, str] | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()

    @property
    def label_names(self) -> dict[int, str]:
        if self.labels is not None:
            return dict(self.labels)
        return {0: "background"} | {value: f"label {value}" for value in range(1, self.model.out_channels)}

    @model_validator(mode="after")
    def _check_dimensions(self) -> ExperimentConfig:
        dims = self.model.spatial_dims
        for key, value in (
            ("data.patch_size", self.data.patch_size),
            ("trainer.roi_size", self.trainer.roi_size),
        ):
            if value is not None and len(value) != dims:
                raise ValueError(f"{key} has {len(value)} sizes but the model is {dims}D")
        if any(not 0 <= axis < dims for axis in self.data.flip_axes):
            raise ValueError(f"data.flip_axes must name spatial axes 0..{dims - 1} of the {dims}D samples")
        if self.data.spacing is not None and len(self.data.spacing) != 3:
            raise ValueError("data.spacing needs three values (mm), scans are read as 3D volumes")
        return self


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'; check its spelling against the documented keys."
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{source}: {where}: {message}{shown}."


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted_key}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``0.3``, ``[8,16]``)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key=value, e.g. trainer.max_epochs=2.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dictionary into an :class:`ExperimentConfig`."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it: sections merge key by key, values replace."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a dictionary, laid over the file it ``extends`` (a path relative to it)."""
    if not path.is_file():
        named = f"{chain[-1]} extends {path}, which" if chain else f"Config file {path}"
        raise ConfigError(f"{named} does not exist; pick one from configs/.")
    if path.resolve() in {link.resolve() for link in chain}:
        raise ConfigError(f"Configs extend each other in a loop: {' -> '.join(map(str, (*chain, path)))}.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error.__class__.__name__}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is YAML.") from None
    except OSError as error:
        raise ConfigError(f"Cannot read {path}: {error.strerror or error}.") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(tree).__name__}.")
    # A recipe is a variant of another: its name is its own, everything else is inherited.
    tree.setdefault("name", path.stem)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must name one config file, e.g. extends: hippocampus_3d.yaml.")
    inherited = _read_tree(path.parent / parent, (*chain, path))
    inherited.pop("name")
    return _merge(inherited, tree)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (and the files it extends), apply overrides and validate it."""
    path = Path(path)
    return build_config(apply_overrides(_read_tree(path), overrides or []), source=str(path))


def config_to_yaml(config: ExperimentConfig) -> str:
    """The resolved configuration as YAML, readable by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
