"""MONAI transform pipelines: the same reading and normalisation for training, validation
and prediction, plus sampling and augmentation for training only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor
from monai.transforms import Randomizable

from segment.config import DataConfig, ExperimentConfig
from segment.io import Scan, read_scan

IMAGE, LABEL = "image", "label"
# Keys FgBgToIndicesd adds for the label, by its default postfixes.
FOREGROUND_INDICES, BACKGROUND_INDICES = f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"


def orient_and_normalise(config: ExperimentConfig, keys: tuple[str, ...], keep_meta: bool = False) -> list:
    """RAS orientation, optional resampling, intensity normalisation of a channel-first volume
    (each channel on its own: a multi-modal scan's sequences have unrelated intensities).

    With ``keep_meta`` the output remembers what was done, so a prediction can be mapped back
    onto the original voxel grid with MONAI's ``Invertd``."""
    data = config.data
    steps: list = [T.Orientationd(keys, axcodes="RAS", labels=None)]
    if data.spacing is not None:
        modes = ["bilinear" if key == IMAGE else "nearest" for key in keys]
        steps.append(T.Spacingd(keys, pixdim=data.spacing, mode=modes))
    if data.modality == "ct":
        low, high = ct_clip(data)
        # Linear, so one range scaling is both the clip and the z-score (or the 0-1 window).
        steps.append(
            T.ScaleIntensityRanged(
                IMAGE, a_min=low, a_max=high, b_min=ct_floor(data), b_max=_ct_ceiling(data), clip=True
            )
        )
    else:
        low, high = data.clip_percentiles
        steps += [
            T.ClipIntensityPercentilesd(IMAGE, lower=low, upper=high, channel_wise=True),
            T.NormalizeIntensityd(IMAGE, channel_wise=True),
        ]
    steps.append(T.EnsureTyped(IMAGE, dtype="float32", track_meta=keep_meta))
    if LABEL in keys:
        steps.append(T.EnsureTyped(LABEL, dtype="uint8", track_meta=keep_meta))
    return steps


def ct_clip(data: DataConfig) -> tuple[float, float]:
    """The Hounsfield range a CT scan is clipped to: the foreground's (low, high) when the
    planner measured it, else the fixed window."""
    return tuple(data.ct_foreground[:2]) if data.ct_foreground is not None else tuple(data.ct_window)


def _ct_normalised(data: DataConfig, value: float) -> float:
    if data.ct_foreground is None:
        low, high = data.ct_window
        return (value - low) / (high - low)
    _, _, mean, std = data.ct_foreground
    return (value - mean) / std


def ct_floor(data: DataConfig) -> float:
    """What the lowest clipped intensity (air) becomes after normalisation: 0 with the window,
    a negative z-score with the foreground statistics."""
    return _ct_normalised(data, ct_clip(data)[0])


def _ct_ceiling(data: DataConfig) -> float:
    return _ct_normalised(data, ct_clip(data)[1])


@dataclass(frozen=True)
class Above:
    """``CropForegroundd``'s test for foreground: intensities above ``floor`` (a class, not a
    lambda, so that the transform pickles into loader worker processes)."""

    floor: float

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image > self.floor


def scan_as_tensor(scan: Scan) -> MetaTensor:
    """``scan`` as a channel-first (C, X, Y, Z) MetaTensor carrying its voxel -> RAS affine."""
    array = scan.array[None] if scan.array.ndim == 3 else np.moveaxis(scan.array, -1, 0)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.from_numpy(scan.affine))


class ReadScand(T.MapTransform):
    """Reads the files named under ``keys`` with :func:`segment.io.read_scan`, the reader
    prediction uses, so training sees scans exactly as prediction will (same checks, same
    repair of NaN voxels, NRRD and MHA too). ``channels``: how many each key's files hold
    (the image the model's ``in_channels``); 1 for keys not named."""

    def __init__(self, keys, channels: dict[str, int] | None = None) -> None:
        super().__init__(keys)
        self.channels = channels or {}

    def __call__(self, data: dict) -> dict:
        read = dict(data)
        for key in self.key_iterator(read):
            read[key] = scan_as_tensor(read_scan(read[key], self.channels.get(key, 1)))
        return read


def read_and_normalise(config: ExperimentConfig) -> list:
    """Read an image and its label from disk, channel-first, then :func:`orient_and_normalise`.
    Deterministic, so a CacheDataset keeps its output in memory. Every scan is read as a 3D
    volume of ``model.in_channels`` channels; 2D models see its axial slices later."""
    reader = ReadScand((IMAGE, LABEL), channels={IMAGE: config.model.in_channels})
    return [reader, *orient_and_normalise(config, (IMAGE, LABEL))]


def _sample(config: ExperimentConfig) -> list:
    """Choose what one training sample is: a whole volume, a patch, or an axial slice (2D).
    The deterministic steps come first, so a CacheDataset keeps their output."""
    data, dims = config.data, config.model.spatial_dims
    keys = (IMAGE, LABEL)
    steps: list = []
    if data.modality == "ct":
        # The air around the body holds no label: cropped once, in the cache, as in MONAI's
        # spleen recipe. Validation keeps whole scans. Air was clipped to the lowest intensity,
        # which normalisation maps to ct_floor (0 with the window, a negative z-score with
        # ct_foreground, where tissue below the mean is negative too): foreground is above it.
        steps.append(
            T.CropForegroundd(keys, source_key=IMAGE, select_fn=Above(ct_floor(data)), allow_smaller=True)
        )
    if dims == 2:
        # Axial slices of the RAS volume: its last axis is inferior -> superior.
        steps += [
            T.RandSpatialCropSamplesd(
                keys, roi_size=(-1, -1, 1), num_samples=data.patches_per_volume, random_size=False
            ),
            T.SqueezeDimd(keys, dim=3),
        ]
    if data.patch_size is not None:
        steps.append(T.SpatialPadd(keys, spatial_size=data.patch_size))
        if dims == 2:
            # Each slice above is already one sample: a single crop keeps it one dict, where a
            # multi-sample crop would nest lists inside the list of slices.
            steps.append(T.RandSpatialCropd(keys, roi_size=data.patch_size, random_size=False))
        else:
            steps += [
                # Where the labels are, found once per case (and cached), not at every crop.
                T.FgBgToIndicesd(LABEL),
                T.RandCropByPosNegLabeld(
                    keys,
                    label_key=LABEL,
                    spatial_size=data.patch_size,
                    pos=1,
                    neg=1,
                    num_samples=data.patches_per_volume,
                    fg_indices_key=FOREGROUND_INDICES,
                    bg_indices_key=BACKGROUND_INDICES,
                ),
            ]
    return steps


def _augment(config: ExperimentConfig) -> list:
    """Cheap augmentations: the CPU that feeds the model is also the CPU that trains it."""
    keys = (IMAGE, LABEL)
    data, dims = config.data, config.model.spatial_dims
    steps: list = []
    if data.affine_augment_prob > 0:
        low, high = data.scale_range
        steps.append(
            T.RandAffined(
                keys,
                prob=data.affine_augment_prob,
                rotate_range=(math.radians(data.rotate_degrees),) * (3 if dims == 3 else 1),
                # MONAI adds 1 to the drawn value, so 0 means unscaled.
                scale_range=((low - 1.0, high - 1.0),) * dims,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    steps += _intensity_augment(config)
    steps += [T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in data.flip_axes]
    return steps


def _intensity_augment(config: ExperimentConfig) -> list:
    if config.data.intensity_augment == "basic":
        return [
            T.RandScaleIntensityd(IMAGE, factors=0.1, prob=0.5),
            T.RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.5),
        ]
    # nnU-Net's defaults, in its order. Intensities are z-scores here, as there.
    blur_sigma = (0.5, 1.0)
    return [
        T.RandGaussianNoised(IMAGE, prob=0.1, std=0.1**0.5),
        T.RandGaussianSmoothd(IMAGE, prob=0.2, sigma_x=blur_sigma, sigma_y=blur_sigma, sigma_z=blur_sigma),
        T.RandScaleIntensityd(IMAGE, factors=0.25, prob=0.15),
        T.RandScaleIntensityFixedMeand(IMAGE, factors=0.25, preserve_range=True, prob=0.15),
        T.RandSimulateLowResolutiond(
            IMAGE,
            prob=0.25,
            zoom_range=(0.5, 1.0),
            upsample_mode="trilinear" if config.model.spatial_dims == 3 else "bilinear",
        ),
        T.RandAdjustContrastd(IMAGE, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        T.RandAdjustContrastd(IMAGE, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ]


def training_transforms(config: ExperimentConfig, device: torch.device | None = None) -> T.Compose:
    """Reading, sampling and augmentation. With ``device`` the cached cases move there before
    the first random step, so crops and augmentation run on that device."""
    steps = read_and_normalise(config) + _sample(config)
    if config.data.augment:
        steps += _augment(config)
    # Plain tensors of one dtype per key, whichever augmentations ran, so samples stack.
    steps.append(T.EnsureTyped((IMAGE, LABEL), dtype=("float32", "uint8"), track_meta=False))
    if device is not None:
        first_random = next((i for i, step in enumerate(steps) if isinstance(step, Randomizable)), len(steps))
        keys = (IMAGE, LABEL, FOREGROUND_INDICES, BACKGROUND_INDICES)
        steps.insert(first_random, T.ToDeviced(keys, device=device, allow_missing_keys=True))
    return T.Compose(steps)


def validation_transforms(config: ExperimentConfig) -> T.Compose:
    """Whole volumes, read exactly as prediction reads them."""
    return T.Compose(read_and_normalise(config))
