"""From a task's fingerprint to an experiment config, each value with the reason it was chosen.

The rules follow nnU-Net's, scaled to this project's machines:

- target spacing: the median of the cases' spacings; on anisotropic data (one axis over
  :data:`ANISOTROPY` times coarser than the finest) the coarse axis takes the 10th percentile
  instead, so that the thin slices of the best cases are not thrown away;
- 2D for single-slice data, and for data whose slices stay more than :data:`VERY_ANISOTROPIC`
  times thicker than their pixels: a 3D patch would then hold little context across slices for
  its cost;
- the patch: the median (resampled) case, shrunk along its longest physical axis until a training
  step fits the device's budget (:data:`BUDGETS`); whole volumes when the median case fits;
- levels and pooling: each level pools by 2 the axes that stay at least :data:`MIN_COARSEST`
  voxels long and whose spacing is within twice the finest (fine axes first, so an anisotropic
  volume becomes isotropic before its thick axis is pooled);
- normalisation: CT is clipped to the foreground's 0.5-99.5 percentiles and z-scored with its
  mean and std; MRI and other modalities are z-scored per scan;
- mirroring: left-right only (the body is near-symmetric that way), and not even that when a
  label names a side; microscopy (a unit of µm) along every in-plane axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import yaml

from segment.config import ExperimentConfig, build_config
from segment.planning.fingerprint import Fingerprint

ANISOTROPY = 3.0
VERY_ANISOTROPIC = 6.0
MIN_COARSEST = 4


@dataclass(frozen=True)
class Budget:
    """What one training step may cost on a device, and the network that goes with it."""

    voxels_3d: int  # batch x patch voxels of a 3D step
    pixels_2d: int  # batch x patch pixels of a 2D step
    batch_3d: int
    batch_2d: int
    base_channels_3d: int
    base_channels_2d: int
    max_levels: int


# cpu: what the project's CPU recipes train in their 10-minute budgets on 2 cores (a batch of two
# hippocampus volumes, two 256 x 256 EM patches, five levels: a sixth adds the widest
# convolutions for context that patches this small do not need). cuda: nnU-Net's defaults for a
# GPU of 10 GB or more (128^3 patches in 3D, 512^2 in 2D, 32 channels at full resolution, six
# levels); not measured here.
BUDGETS = {
    "cpu": Budget(2 * 64**3, 2 * 256**2, 2, 2, 8, 16, 5),
    "cuda": Budget(2 * 128**3, 12 * 512**2, 2, 12, 32, 32, 6),
}
SIDE_WORDS = {0: ("left", "right"), 1: ("anterior", "posterior"), 2: ("superior", "inferior")}


@dataclass
class Plan:
    """The planned config and, for each planned key (``data.spacing``), why."""

    config: ExperimentConfig
    reasons: dict[str, str] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)  # what the fingerprint said, for the header

    def to_yaml(self) -> str:
        """The config as YAML that ``segment train --config`` takes, a comment above each planned key."""
        tree = self.config.model_dump(mode="json")
        lines = [f"# {line}" for line in self.summary]
        lines.append(f"name: {tree['name']}")
        for section in ("data", "model", "trainer"):
            lines.append(f"{section}:")
            for key, value in tree[section].items():
                dotted = f"{section}.{key}"
                if dotted not in self.reasons:
                    continue
                lines.append(f"  # {self.reasons[dotted]}")
                lines.append(
                    f"  {key}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                )
        return "\n".join(lines) + "\n"


def target_spacing(found: Fingerprint) -> tuple[tuple[float, ...], str]:
    spacings = found.spacings
    median = np.median(spacings, axis=0)
    if median.max() <= ANISOTROPY * median.min():
        return tuple(float(v) for v in median), "the median spacing of the cases"
    thick = int(np.argmax(median))
    median[thick] = np.percentile(spacings[:, thick], 10)
    return (
        tuple(float(v) for v in median),
        f"the median spacing, but the 10th percentile along axis {thick}: the slices are over "
        f"{ANISOTROPY:g} times thicker than the pixels, and the thinnest cases keep their detail",
    )


def _pooling(shape: np.ndarray, spacing: np.ndarray, max_levels: int) -> list[list[int]]:
    """Per-level pooling factors: pool the axes that stay >= MIN_COARSEST voxels and whose
    spacing is within twice the finest spacing of those axes."""
    shape, spacing = shape.astype(float), spacing.astype(float)
    pooling = []
    while len(pooling) < max_levels - 1:
        long_enough = np.ceil(shape / 2) >= MIN_COARSEST
        if not long_enough.any():
            break
        finest = spacing[long_enough].min()
        factors = [2 if ok and s <= 2 * finest else 1 for ok, s in zip(long_enough, spacing, strict=True)]
        pooling.append(factors)
        shape = np.ceil(shape / np.array(factors))
        spacing = spacing * np.array(factors)
    return pooling or [[2] * len(shape)]


def _fit_patch(shape: np.ndarray, spacing: np.ndarray, voxels: int) -> np.ndarray:
    """``shape`` shrunk a voxel at a time along its longest physical axis to at most ``voxels``."""
    patch = shape.astype(int)
    while np.prod(patch) > voxels:
        axis = int(np.argmax(patch * spacing))
        patch[axis] = max(MIN_COARSEST, patch[axis] - 1)
    return patch


def _coarsest(shape: np.ndarray, pooling: list[list[int]]) -> np.ndarray:
    """The size of the coarsest level: each level rounds odd sizes up."""
    for factors in pooling:
        shape = np.ceil(shape / np.array(factors))
    return shape.astype(int)


def _divisible(patch: np.ndarray, pooling: list[list[int]], spacing: np.ndarray, voxels: int) -> np.ndarray:
    """``patch`` rounded to the nearest multiples of its total pooling per axis, then trimmed a
    multiple at a time along its longest physical axis until it is within ``voxels`` again."""
    total = np.prod(np.array(pooling), axis=0)
    rounded = np.maximum(total, np.round(patch / total) * total).astype(int)
    while np.prod(rounded) > voxels and (rounded > total).any():
        extent = np.where(rounded > total, rounded * spacing, -1.0)
        axis = int(np.argmax(extent))
        rounded[axis] -= total[axis]
    return rounded


def _flip_axes(found: Fingerprint, dims: int) -> tuple[list[int], str]:
    if found.unit == "µm":
        return list(range(dims)), "microscopy has no anatomical sides: mirror every in-slice axis"
    names = " ".join(found.labels.values()).lower()
    sided = [axis for axis, words in SIDE_WORDS.items() if any(re.search(rf"\b{w}", names) for w in words)]
    if 0 in sided:
        return [], "no mirroring: a label names a side (left or right), which mirroring would swap"
    return [
        0
    ], "mirror left-right only: the body is near-symmetric that way, not front to back or top to bottom"


def _normalisation(found: Fingerprint) -> tuple[dict, str]:
    if found.is_ct:
        stats = found.channels[0]
        values = [round(v, 2) for v in (stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std)]
        return (
            {"modality": "ct", "ct_foreground": values},
            "CT: clip to the foreground's 0.5 and 99.5 percentiles, z-score with its mean and std "
            "(Hounsfield units mean the same in every scan, so one normalisation serves all)",
        )
    if found.unit == "µm":
        return {"modality": "em"}, "microscopy: a z-score per image after clipping its 0.5/99.5 percentiles"
    return (
        {"modality": "mri"},
        f"{', '.join(found.modalities.values())}: intensities differ from scan to scan, so each scan "
        "(each channel) is z-scored on its own after clipping its 0.5/99.5 percentiles",
    )


def _short_name(task: str) -> str:
    return re.sub(r"^task\d+_", "", task.lower())


def plan_task(found: Fingerprint, device: str = "cpu") -> Plan:
    """The config for the task ``found`` describes, planned for ``device`` (cpu or cuda)."""
    budget = BUDGETS[device]
    reasons: dict[str, str] = {}
    spacing, why_spacing = target_spacing(found)
    spacing_array = np.array(spacing)
    resampled = np.median(found.shapes * found.spacings / spacing_array, axis=0)
    single_slice = bool((np.median(found.shapes, axis=0) == 1).any())
    anisotropy = spacing_array.max() / spacing_array.min()
    dims = 2 if single_slice or anisotropy > VERY_ANISOTROPIC else 3
    if single_slice:
        reasons["model.spatial_dims"] = "2D: every case is a single slice"
    elif dims == 2:
        reasons["model.spatial_dims"] = (
            f"2D: the slices are {anisotropy:.1f} times thicker than their pixels (over {VERY_ANISOTROPIC:g}), "
            "so a 3D patch holds little context across slices for its cost"
        )
    else:
        reasons["model.spatial_dims"] = (
            f"3D: the voxels are at most {anisotropy:.1f} times longer one way than another"
        )
    in_plane = slice(0, 2) if dims == 2 else slice(0, 3)
    shape, plane_spacing = resampled[in_plane], spacing_array[in_plane]
    per_sample = (budget.voxels_3d // budget.batch_3d) if dims == 3 else (budget.pixels_2d // budget.batch_2d)
    batch = budget.batch_3d if dims == 3 else budget.batch_2d
    whole = bool(np.prod(np.ceil(shape)) <= per_sample) and dims == 3
    patch = np.ceil(shape).astype(int) if whole else _fit_patch(np.ceil(shape), plane_spacing, per_sample)
    pooling = _pooling(patch, plane_spacing, budget.max_levels)
    while (
        not whole
        and (rounded := _divisible(patch, pooling, plane_spacing, per_sample)).tolist() != patch.tolist()
    ):
        # Rounding down can cost the coarsest level a voxel: pool again for the rounded patch.
        patch, pooling = rounded, _pooling(rounded, plane_spacing, budget.max_levels)
    coarsest = _coarsest(patch, pooling)
    same_spacing = bool(np.allclose(found.spacings, spacing_array, rtol=0.01))
    normalisation, why_normalisation = _normalisation(found)
    flips, why_flips = _flip_axes(found, dims)
    data = {
        "task": found.task,
        **normalisation,
        "spacing": None if same_spacing else [round(v, 4) for v in spacing],
        "patch_size": None if whole else patch.tolist(),
        "flip_axes": flips,
        "channel_names": [found.modalities[k] for k in sorted(found.modalities)],
        "affine_augment_prob": 0.2,
    }
    if dims == 2:
        data["patches_per_volume"] = 4
    reasons.update(
        {
            "data.task": "the task folder, found under the data root like any config's",
            "data.modality": why_normalisation,
            "data.spacing": "no resampling: every case already has the target spacing "
            + f"({' x '.join(f'{v:g}' for v in spacing)} {found.unit})"
            if same_spacing
            else f"resample to {why_spacing}",
            "data.patch_size": f"whole volumes: the median case ({_shape_text(shape)}) fits a {device} step's budget"
            if whole
            else f"the median case ({_shape_text(shape)}) shrunk along its longest physical axis to fit a "
            f"{device} step's budget of {per_sample:,} voxels per sample, divisible by the pooling",
            "data.flip_axes": why_flips,
            "data.channel_names": "the modality of each input channel, from dataset.json, for the viewer",
            "data.affine_augment_prob": "random rotation and scaling on one sample in five, as the project's recipes",
        }
    )
    if "ct_foreground" in normalisation:
        reasons["data.ct_foreground"] = "(low, high, mean, std) of the foreground intensities over every case"
    if dims == 2:
        reasons["data.patches_per_volume"] = "four slices per volume per epoch, as the 2D EM recipe"
    levels = len(pooling) + 1
    model = {
        "spatial_dims": dims,
        "in_channels": len(found.modalities),
        "out_channels": len(found.labels),
        "levels": levels,
        "pooling": pooling,
        "base_channels": budget.base_channels_3d if dims == 3 else budget.base_channels_2d,
        "skip_dropout": 0.1,
    }
    reasons.update(
        {
            "model.in_channels": f"one input per modality: {', '.join(found.modalities.values())}",
            "model.out_channels": f"background and {len(found.labels) - 1} label(s)",
            "model.levels": f"as many as keep the coarsest level at least {MIN_COARSEST} voxels per axis "
            f"(here {_shape_text(coarsest)}), at most {budget.max_levels} for a {device} step",
            "model.pooling": "per level, 2 along each axis still long enough and no coarser than twice the "
            "finest, 1 otherwise: fine axes first",
            "model.base_channels": f"the width at full resolution for a {device} step",
            "model.skip_dropout": "each long skip dropped on one batch in ten, so switching it off at "
            "inference stays in distribution",
        }
    )
    # A 2D model validates by sliding windows over every slice of every validation case, which
    # costs several of its short patch epochs; a 3D epoch is long next to its validation.
    val_every = 5 if dims == 2 else 2
    trainer = {"batch_size": batch, "lr": 0.002, "dice_background": False, "val_every": val_every}
    if not whole:
        trainer["roi_size"] = patch.tolist()
    reasons.update(
        {
            "trainer.batch_size": f"samples per step within the {device} budget",
            "trainer.lr": "the project's CPU recipes' peak learning rate for batches of two",
            "trainer.dice_background": "the Dice half of the loss over the labels only, as nnU-Net",
            "trainer.val_every": f"validate every {'fifth' if dims == 2 else 'second'} epoch: "
            + (
                "sliding windows over every validation slice cost several patch epochs"
                if dims == 2
                else "a 3D epoch is long next to its validation"
            ),
        }
    )
    if not whole:
        reasons["trainer.roi_size"] = "sliding-window inference in windows of the patch size"
    tree = {
        "name": f"{_short_name(found.task)}_{dims}d_plan",
        "data": data,
        "model": model,
        "trainer": trainer,
    }
    config = build_config(tree, source=f"the plan of {found.task}")
    summary = [
        f"Planned by `segment plan` for {device} from the fingerprint of {found.task}:",
        f"{len(found.cases)} cases, {len(found.modalities)} channel(s) ({', '.join(found.modalities.values())}), "
        f"labels {', '.join(f'{k} {v}' for k, v in sorted(found.labels.items()))};",
        f"median shape {_shape_text(np.median(found.shapes, axis=0))} at "
        f"{_shape_text(np.median(found.spacings, axis=0))} {found.unit}.",
        "Every value below is an ordinary config key: edit it, or override it with --set.",
    ]
    return Plan(config, reasons, summary)


def _shape_text(values) -> str:
    return " x ".join(f"{v:g}" for v in np.round(np.asarray(values, dtype=float), 2))
