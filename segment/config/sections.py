"""The typed sections of an experiment config (data, model, trainer), each key with its
description: the source of docs/configs.md, over 350 lines because every key documents itself.

Every section forbids unknown keys, so a typo fails loudly instead of silently training the
default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_DERIVED_CHANNELS = 320  # nnU-Net's cap: wider bottlenecks cost memory for little gain


class ModelConfig(_Section):
    """The U-Net: levels, encoder kind, how long skips join, and skip dropout."""

    spatial_dims: Literal[2, 3] = Field(
        3, description="2 for a network on axial slices (it predicts volumes slice by slice), 3 for volumes."
    )
    in_channels: int = Field(1, ge=1, description="Image channels the network reads.")
    out_channels: int = Field(2, ge=1, description="Labels the network predicts, background included.")
    levels: int = Field(
        5,
        ge=2,
        le=8,
        description="Resolution levels; level 1 is full resolution, the last is the bottleneck. "
        "A model has one long skip per level above the bottleneck.",
    )
    channels: tuple[int, ...] | None = Field(
        None,
        description="Feature channels per level, finest first, e.g. [8,16,32,64,128]; null: "
        f"base_channels doubled per level (at most {MAX_DERIVED_CHANNELS}).",
    )
    base_channels: int = Field(
        16,
        ge=1,
        description="Channels of level 1 when channels is not given; each deeper level doubles them.",
    )
    encoder: Literal["plain", "resnet"] = Field(
        "plain",
        description="plain: two convolutions per level; resnet: residual blocks (ResNet-18/34-like).",
    )
    blocks_per_level: tuple[int, ...] | None = Field(
        None,
        description="Residual blocks per level (resnet encoder only). null means ResNet-18-like: "
        "one block at full resolution, two per deeper level. ResNet-34-like is [1,3,4,6,3].",
    )
    block: Literal["basic", "bottleneck"] = Field(
        "basic", description="The resnet encoder's residual block: basic or bottleneck."
    )
    skip_mode: Literal["concat", "add"] = Field(
        "concat",
        description="How a long skip joins the decoder: concat (U-Net) or add (LinkNet).",
    )
    skip_dropout: float | tuple[float, ...] = Field(
        0.0,
        description="Probability that a long skip is zeroed for a training batch: one value for "
        "every level, or one per level, finest first. It keeps switching a skip off at inference "
        "in distribution.",
    )
    # Models saved before the key had its name wrote it as `skips`; they load as they are.
    long_skips: tuple[Literal[0, 1], ...] | None = Field(
        None,
        validation_alias=AliasChoices("long_skips", "skips"),
        description="Which long skips the model is built with (1) or without (0), finest first; "
        "null: all of them. A model trained without a skip is the honest reference for "
        "switching that skip off at inference.",
    )
    norm: Literal["instance", "batch"] = Field(
        "instance", description="Normalisation after each convolution."
    )
    act: Literal["leakyrelu", "relu", "prelu", "gelu"] = Field(
        "leakyrelu", description="Activation after each normalisation."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout probability inside the convolution blocks."
    )
    deep_supervision: int = Field(
        0,
        ge=0,
        description="Deep supervision: this many next-coarser decoder levels get their own output "
        "head during training, scored against the label shrunk to their size with weights 1/2, "
        "1/4, ... of the full-resolution loss (MONAI's DeepSupervisionLoss). nnU-Net supervises "
        "all but the two coarsest levels. Prediction uses the full-resolution output alone.",
    )

    pooling: tuple[tuple[int, ...], ...] | None = Field(
        None,
        description="How each level below the first pools the one above it, finest transition "
        "first: levels - 1 entries, each one factor (1 or 2) per spatial axis in the network's "
        "axis order (X, Y, Z of the RAS volume; a 2D model's two in-slice axes). For thick "
        "slices, pool the fine axes first as nnU-Net does, e.g. [[2,2,1],[2,2,1],[2,2,2],[2,2,2]] "
        "for 0.6 x 0.6 x 3.6 mm voxels. null: 2 along every axis at every level.",
    )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels per level, finest first."""
        if self.channels is not None:
            return self.channels
        return tuple(min(self.base_channels * 2**level, MAX_DERIVED_CHANNELS) for level in range(self.levels))

    @property
    def pool_factors(self) -> tuple[tuple[int, ...], ...]:
        """The pooling factor per axis of each level below the first, finest first."""
        if self.pooling is not None:
            return self.pooling
        return ((2,) * self.spatial_dims,) * self.num_skips

    @property
    def level_scales(self) -> tuple[tuple[int, ...], ...]:
        """How many input voxels one voxel of each level spans per axis, level 1 first."""
        scales = [(1,) * self.spatial_dims]
        for factors in self.pool_factors:
            scales.append(tuple(scale * factor for scale, factor in zip(scales[-1], factors, strict=True)))
        return tuple(scales)

    @property
    def num_skips(self) -> int:
        return self.levels - 1

    @property
    def built_skips(self) -> tuple[bool, ...]:
        """One flag per long skip the model has, finest first."""
        return tuple(bool(flag) for flag in self.long_skips or (1,) * self.num_skips)

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
        if self.long_skips is not None and len(self.long_skips) != self.num_skips:
            raise ValueError(
                f"long_skips has {len(self.long_skips)} entries but the model has {self.num_skips} long skips"
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

    @model_validator(mode="after")
    def _check_pooling(self) -> ModelConfig:
        if self.pooling is None:
            return self
        if len(self.pooling) != self.num_skips:
            raise ValueError(
                f"pooling lists {len(self.pooling)} entries but a {self.levels}-level model pools "
                f"{self.num_skips} times; give one entry per level below the first, finest first"
            )
        for level, factors in enumerate(self.pooling, start=2):
            if len(factors) != self.spatial_dims:
                raise ValueError(
                    f"pooling of level {level} is {list(factors)} but the model has "
                    f"{self.spatial_dims} spatial axes; give one factor per axis"
                )
            if any(factor not in (1, 2) for factor in factors):
                raise ValueError(f"pooling factors must be 1 or 2, got {list(factors)} for level {level}")
            if 2 not in factors:
                raise ValueError(
                    f"pooling of level {level} is all ones; every level must pool by 2 along at least one axis"
                )
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

    task: str = Field("Task04_Hippocampus", description="The MSD-layout task folder under the data root.")
    modality: Literal["mri", "ct", "em"] = Field(
        "mri",
        description="Intensity normalisation: a z-score after clipping to clip_percentiles for MRI "
        "and EM; a fixed Hounsfield window (ct_window) for CT.",
    )
    ct_window: tuple[float, float] = Field(
        (-175.0, 250.0), description="CT only: the Hounsfield window scaled to 0-1, outside values clipped."
    )
    ct_foreground: tuple[float, float, float, float] | None = Field(
        None,
        description="CT only: (low, high, mean, std) of the training set's foreground intensities: "
        "clip to [low, high] and z-score with mean and std (nnU-Net's CT normalisation); null scales "
        "the fixed ct_window to 0-1.",
    )
    channel_names: tuple[str, ...] | None = Field(
        None, description="The modality of each input channel, from the task's dataset.json, for display."
    )
    clip_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="MRI and EM: the intensity percentiles clipped to before the z-score."
    )
    spacing: tuple[float, ...] | None = Field(
        None, description="Resample to this voxel spacing (mm); null keeps each scan's own spacing."
    )
    patch_size: tuple[int, ...] | None = Field(
        None,
        description="Train on random patches of this size; null trains on whole volumes (or slices in 2D).",
    )
    patches_per_volume: int = Field(
        2,
        ge=1,
        description="Training samples drawn per volume: patches (with patch_size) or axial slices (2D).",
    )
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Share of the labelled cases held out for validation (without folds).",
    )
    split_seed: int | None = Field(
        0,
        description="Seed of the shuffle that draws the validation split or the folds; null: no "
        "shuffle, so the validation split is the last cases in name order (MONAI's tutorials).",
    )
    folds: int | None = Field(
        None,
        ge=2,
        description="Cross-validation (nnU-Net's five folds): the shuffled cases are cut into this "
        "many folds and fold `fold` is the validation split, so runs of folds 0..folds-1 "
        "together validate on every case once. null draws val_fraction of the cases instead.",
    )
    fold: int = Field(0, ge=0, description="The validation fold, 0-based (with folds).")
    max_cases: int | None = Field(
        None,
        ge=2,
        description="Use only the first N cases of the task (after sorting): quick experiments and tests.",
    )
    cache_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of the read and normalised cases MONAI keeps in memory."
    )
    num_workers: int = Field(
        0, ge=0, description="Data-loader worker processes; 0 loads in the training process."
    )
    loader: Literal["auto", "workers", "device"] = Field(
        "auto",
        description="How training samples are made. workers: read and cached in memory, then "
        "cropped and augmented by num_workers processes. device: cached on the training device "
        "and cropped and augmented there, in a loader thread (MONAI's fast-training recipe). "
        "auto: device on CUDA when the cached cases fit in a quarter of the free GPU memory, "
        "workers otherwise.",
    )
    augment: bool = Field(True, description="Augment the training samples.")
    affine_augment_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability of a random rotation (up to rotate_degrees about each axis) and "
        "scaling (by a factor drawn from scale_range per axis) per training sample: it costs CPU "
        "time, so tasks opt in. nnU-Net's ranges are 30 degrees and 0.7-1.4.",
    )
    rotate_degrees: float = Field(
        15.0, ge=0.0, le=180.0, description="Largest random rotation about each axis, in degrees."
    )
    scale_range: tuple[float, float] = Field(
        (0.9, 1.1), description="Lowest and highest random scaling factor per axis."
    )
    intensity_augment: Literal["basic", "nnunet"] = Field(
        "basic",
        description="basic scales and shifts intensities a little; nnunet draws nnU-Net's intensity "
        "set (noise, blur, brightness, contrast, low resolution, gamma), each with nnU-Net's "
        "probability. Both are cheap next to a training step.",
    )
    flip_axes: tuple[int, ...] = Field(
        (0,),
        description="Spatial axes (of the RAS volume) along which training samples are mirrored at "
        "random. Mirroring along an axis that carries label meaning (anterior vs posterior) "
        "teaches the model to confuse those labels, so tasks choose their own.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> DataConfig:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be two factors with 0 < low <= high, got {[low, high]}")
        if self.fold and self.folds is None:
            raise ValueError("fold is set but folds is not; give data.folds too, e.g. data.folds=5")
        if self.ct_foreground is not None:
            low, high, _, std = self.ct_foreground
            if not (low < high and std > 0):
                raise ValueError(
                    f"ct_foreground must be (low, high, mean, std) with low < high and std > 0, got {list(self.ct_foreground)}"
                )
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(
                f"fold must be one of 0..{self.folds - 1} with {self.folds} folds, got {self.fold}"
            )
        return self


class TrainerConfig(_Section):
    """The optimisation recipe and its budget."""

    max_epochs: int = Field(100, ge=1, description="Stop after this many epochs.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop after this many minutes of training, whatever the epoch (null: no limit). "
        "The learning-rate schedule is stretched over the budget, so a short run is a complete "
        "run, not a truncated one.",
    )
    batch_size: int = Field(4, ge=1, description="Training samples per optimiser step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's weight decay.")
    warmup_epochs: int = Field(2, ge=0, description="Epochs of linear learning-rate warm-up.")
    schedule: Literal["cosine", "poly"] = Field(
        "cosine", description="Learning-rate decay after the warm-up: cosine, or poly (exponent 0.9)."
    )
    grad_clip: float | None = Field(
        12.0, gt=0, description="Clip the gradient norm to this value; null: no clipping."
    )
    dice_background: bool = Field(
        True,
        description="Score the background label too in the Dice half of the DiceCE loss (MONAI's "
        "default); false scores the foreground labels only, as nnU-Net does.",
    )
    batch_dice: bool = Field(
        False,
        description="Pool the Dice half of the loss over the batch (nnU-Net) instead of per sample "
        "(MONAI's default), so a sample with a small structure does not swing the loss.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Validate and keep an exponential moving average of the weights with this decay "
        "per step (e.g. 0.999): it smooths the noise of the last steps out of the model that is "
        "kept. null validates the weights as trained.",
    )
    val_every: int = Field(1, ge=1, description="Validate every this many epochs.")
    roi_size: tuple[int, ...] | None = Field(
        None, description="Sliding-window size for validation and prediction; null runs whole volumes."
    )
    sw_batch_size: int = Field(4, ge=1, description="Sliding windows per forward pass.")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="Mixed precision. auto: bf16 autocast on CUDA (fp16 with a grad scaler on GPUs "
        "without bf16) and on a CPU with native bf16, fp32 on other CPUs. bf16 or fp16 forces one "
        "(fp16 always with a grad scaler); off runs fp32.",
    )
    channels_last: bool | None = Field(
        None,
        description="Run the network in channels-last memory layout; null takes the device's "
        "default (on the CPU, off on CUDA).",
    )
    deterministic: bool | None = Field(
        None,
        description="Deterministic cuDNN kernels (true), or cuDNN autotuning, which is faster when "
        "every batch has one shape (false). null: false on CUDA when training on fixed-size "
        "patches, true otherwise. The value used is recorded with the run.",
    )
    compile: bool = Field(
        False,
        description="Compile the network with torch.compile before training: slower start, "
        "faster steps on some GPUs (benchmarks/gpu.py measures it).",
    )
    collective_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="Under torchrun: how long a process waits in a collective (the gradient "
        "all-reduce, a barrier) for the other processes. A process that was killed or hangs stops "
        "the job within this time, not PyTorch's 30 minutes; the others stop with one sentence "
        "naming it, their last checkpoint intact. Raise it if one process may do slow work the "
        "others wait for: rank 0 registering a large model in a remote MLflow store, or "
        "validation shares of very uneven cost.",
    )
    seed: int = Field(0, description="Seed of the initialisation, the sample order and the augmentation.")
    init_from: str | None = Field(
        None,
        description="Start from a trained model's weights (a bundled name, MLflow URI or model "
        "folder of the same architecture) instead of a random initialisation.",
    )
    teacher: str | None = Field(
        None,
        description="Knowledge distillation: a trained model of the same task (an ensemble too) "
        "whose softmax output, softened by distill_temperature, the network also learns to "
        "match; the loss adds distill_weight x temperature^2 x their KL divergence per voxel to "
        "DiceCE on the labels.",
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation term (with teacher).")
    distill_temperature: float = Field(
        1.0, gt=0, description="Temperature softening the teacher's and the network's softmax (with teacher)."
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value):
        # YAML reads a bare `off` (in a file or in --set trainer.amp=off) as the boolean false.
        return "off" if value is False else value


class ExperimentConfig(_Section):
    """One experiment: a named model on a task with a training recipe."""

    name: str = Field(
        ...,
        min_length=1,
        description="Names the runs and the registered model; a config file's stem unless it sets one.",
    )
    labels: dict[int, str] | None = Field(
        None, description="Label value -> name, recorded when training reads the task's dataset.json."
    )
    data: DataConfig = Field(
        DataConfig(), description="Which task, its normalisation, split and augmentation."
    )
    model: ModelConfig = Field(ModelConfig(), description="The U-Net.")
    trainer: TrainerConfig = Field(TrainerConfig(), description="The optimisation recipe and its budget.")

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
