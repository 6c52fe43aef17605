"""Stand-ins for the ten Medical Segmentation Decathlon tasks, for planning without their data.

Each task folder gets the task's real ``dataset.json`` metadata (name, modalities, labels,
``numTraining``, ``tensorImageSize``) and a few synthetic cases with the task's published median
voxel spacing and shape (MSD paper; nnU-Net's dataset fingerprints), its channel count (4D
images for the two multi-modal tasks), and its intensity range: CT in Hounsfield units (air
-1000, soft tissue 40, the labelled organ or lesion brighter), MRI as scanners store it. The
anatomy is ellipsoids: enough for a fingerprint and a plan, not for learning anatomy::

    python data_scripts/msd_fixtures.py --output DIR [--scale 0.125] [--cases 3] [--tasks Task05_Prostate ...]

``--scale`` shrinks every axis's voxel count (the spacing stays the task's; no axis below 8
voxels), so tests can train on the fixtures in seconds; 1 gives the published sizes, which is what docs/plans.md is planned
from. The cases' thick-axis spacing varies by +-20 % so that the planner's median and
percentile rules have something to choose between. Images are uncompressed NIfTI (``.nii``):
quick to write and read at full size.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass(frozen=True)
class TaskFacts:
    name: str  # dataset.json's "name"
    modalities: tuple[str, ...]
    labels: tuple[str, ...]  # background first
    training: int  # numTraining of the full task
    spacing: tuple[float, float, float]  # median, mm
    shape: tuple[int, int, int]  # median, voxels
    background: float  # intensity outside the body
    tissue: float  # the body
    structures: tuple[float, ...]  # each label's intensity, label 1 first


TASKS = {
    "Task01_BrainTumour": TaskFacts(
        "BRATS",
        ("FLAIR", "T1w", "t1gd", "T2w"),
        ("background", "edema", "non-enhancing tumor", "enhancing tumour"),
        484,
        (1.0, 1.0, 1.0),
        (240, 240, 155),
        0.0,
        400.0,
        (700.0, 550.0, 900.0),
    ),
    "Task02_Heart": TaskFacts(
        "LeftAtrium",
        ("MRI",),
        ("background", "left atrium"),
        20,
        (1.25, 1.25, 1.37),
        (320, 320, 110),
        0.0,
        250.0,
        (600.0,),
    ),
    "Task03_Liver": TaskFacts(
        "LiverTumour",
        ("CT",),
        ("background", "liver", "cancer"),
        131,
        (0.77, 0.77, 1.0),
        (512, 512, 432),
        -1000.0,
        40.0,
        (100.0, 60.0),
    ),
    "Task04_Hippocampus": TaskFacts(
        "Hippocampus",
        ("MRI",),
        ("background", "Anterior", "Posterior"),
        260,
        (1.0, 1.0, 1.0),
        (36, 50, 35),
        0.0,
        60000.0,
        (90000.0, 80000.0),
    ),
    "Task05_Prostate": TaskFacts(
        "PROSTATE",
        ("T2", "ADC"),
        ("background", "PZ", "TZ"),
        32,
        (0.625, 0.625, 3.6),
        (320, 320, 20),
        0.0,
        300.0,
        (700.0, 500.0),
    ),
    "Task06_Lung": TaskFacts(
        "Lung",
        ("CT",),
        ("background", "cancer"),
        63,
        (0.79, 0.79, 1.24),
        (512, 512, 252),
        -1000.0,
        -700.0,
        (30.0,),
    ),
    "Task07_Pancreas": TaskFacts(
        "Pancreas",
        ("CT",),
        ("background", "pancreas", "cancer"),
        281,
        (0.8, 0.8, 2.5),
        (512, 512, 93),
        -1000.0,
        40.0,
        (110.0, 70.0),
    ),
    "Task08_HepaticVessel": TaskFacts(
        "HepaticVessel",
        ("CT",),
        ("background", "Vessel", "Tumour"),
        303,
        (0.8, 0.8, 5.0),
        (512, 512, 49),
        -1000.0,
        40.0,
        (180.0, 70.0),
    ),
    "Task09_Spleen": TaskFacts(
        "Spleen",
        ("CT",),
        ("background", "spleen"),
        41,
        (0.79, 0.79, 5.0),
        (512, 512, 90),
        -1000.0,
        40.0,
        (120.0,),
    ),
    "Task10_Colon": TaskFacts(
        "Colon",
        ("CT",),
        ("background", "colon cancer primaries"),
        126,
        (0.78, 0.78, 5.0),
        (512, 512, 95),
        -1000.0,
        40.0,
        (90.0,),
    ),
}


def _ellipsoid(grid: list[np.ndarray], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """Voxels inside the ellipsoid (centre and radii as fractions of each axis)."""
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def _case(facts: TaskFacts, shape: tuple[int, int, int], case: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (X, Y, Z) or (X, Y, Z, C) float32, labels (X, Y, Z) uint8) of one synthetic case."""
    grid = list(np.ogrid[tuple(slice(0.0, 1.0, complex(0, n)) for n in shape)])
    labels = np.zeros(shape, np.uint8)
    body = _ellipsoid(grid, (0.5, 0.5, 0.5), (0.45, 0.4, 0.6))
    shift = 0.04 * (case % 3 - 1)
    for value in range(1, len(facts.labels)):
        # Each further label sits inside the one before it, as a tumour in its organ.
        radius = 0.2 / value
        labels[
            _ellipsoid(grid, (0.45 + shift, 0.5, 0.5), (radius, radius * 1.2, max(radius * 1.5, 0.34)))
        ] = value
    values = np.array([facts.tissue, *facts.structures], np.float32)
    image = np.where(body, facts.tissue, facts.background).astype(np.float32)
    image[labels > 0] = values[labels[labels > 0]]
    # Noise of a twentieth of the intensity span: every label gets a spread of intensities, as
    # real tissue has, for the foreground statistics to describe.
    span = float(values.max() - min(facts.background, values.min()))
    image += np.random.default_rng(case).normal(0.0, span / 20, shape).astype(np.float32)
    channels = [image * (1.0 + 0.25 * channel) for channel in range(len(facts.modalities))]
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    # CT is stored as scanners store it, int16 Hounsfield units: half the bytes of float32.
    return (image.astype(np.int16) if facts.background <= -1000 else image), labels


def write_task(task: str, output: Path, scale: float = 1.0, cases: int = 3) -> Path:
    """Write the stand-in of ``task`` into ``output/<task>`` and return that folder."""
    facts = TASKS[task]
    folder = output / task
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    # Never below 8 voxels an axis (or the task's own size): a volume must still pool.
    shape = tuple(max(min(n, 8), round(n * scale)) for n in facts.shape)
    stem = task.split("_", 1)[1].lower()
    training = []
    for case in range(cases):
        spacing = list(facts.spacing)
        thick = int(np.argmax(spacing))
        if spacing[thick] > min(spacing):
            spacing[thick] *= 1.0 + 0.2 * (case % 3 - 1)
        affine = np.diag([*spacing, 1.0])
        image, labels = _case(facts, shape, case)
        name = f"{stem}_{case:03d}.nii"
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / name)
        nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": facts.name,
        "description": f"A synthetic stand-in for {task} (segment's data_scripts/msd_fixtures.py).",
        "tensorImageSize": "4D" if len(facts.modalities) > 1 else "3D",
        "modality": {str(k): v for k, v in enumerate(facts.modalities)},
        "labels": {str(k): v for k, v in enumerate(facts.labels)},
        "numTraining": facts.training,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="Folder to hold the task folders.")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="Voxel counts times this (1: published sizes)."
    )
    parser.add_argument("--cases", type=int, default=3, help="Cases per task.")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS), help="Which tasks.")
    args = parser.parse_args(argv)
    for task in args.tasks:
        print(write_task(task, args.output, args.scale, args.cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
