"""Build a two-channel MSD task from the Decathlon hippocampus task: real anatomy, two inputs.

Two of the Decathlon's ten tasks (brain tumour, prostate) store several MRI sequences as the 4th
dimension of each image. This script makes a small task of that layout from the hippocampus
scans, so multi-channel training, prediction and the viewer can be tried without a 7 GB
download::

    python data_scripts/two_channel_hippocampus.py --source DIR/Task04_Hippocampus \\
        --output DIR/Task91_HippocampusTwoChannel [--cases N] [--overwrite]

What is written, per case (the first ``N`` training cases in name order, all by default):

- ``imagesTr/<case>.nii.gz``: float32 (X, Y, Z, 2) with the source's affine and header.
  Channel 0 is the scan unchanged; channel 1 its Gaussian gradient magnitude (sigma 1 voxel),
  a second view of the same anatomy that, like a second MRI sequence, has its own intensities
  and brings out other structure (the edges).
- ``labelsTr/<case>.nii.gz``: the source's label file, copied byte for byte.
- ``dataset.json``: the source's, with ``"modality": {"0": "MRI", "1": "MRI gradient
  magnitude"}``, ``tensorImageSize`` 4D, and only these cases.

The task is built in a hidden temporary sibling folder and renamed into place: a killed run can
leave that ``.<name>.partial-*`` folder behind, never a half-written task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from segment.atomic import write_folder_atomically
from segment.errors import InputError

TASK_NAME = "Task91_HippocampusTwoChannel"
MODALITIES = {"0": "MRI", "1": "MRI gradient magnitude"}
GRADIENT_SIGMA = 1.0  # voxels: the hippocampus scans are about 1 mm isotropic


class ConversionError(Exception):
    """The task cannot be built; the message is one sentence saying why."""


def source_cases(source: Path, cases: int | None) -> tuple[dict, list[dict[str, str]]]:
    """The source's dataset.json and its first ``cases`` training entries in name order."""
    listing = source / "dataset.json"
    if not listing.is_file():
        raise ConversionError(
            f"{listing} does not exist; pass --source pointing at the Task04_Hippocampus folder."
        )
    try:
        dataset = json.loads(listing.read_text())
        entries = sorted(dataset["training"], key=lambda entry: entry["image"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(
            f"{listing} is not an MSD dataset.json ({error.__class__.__name__}: {error})."
        ) from None
    if cases is not None and cases < 1:
        raise ConversionError(f"--cases {cases}: give at least 1.")
    return dataset, entries[:cases]


def two_channels(image: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    """The 4D image of ``image``: the scan, then its gradient magnitude."""
    if len(image.shape) != 3:
        raise ConversionError(f"{path} has shape {image.shape}; the source task must hold 3D scans.")
    scan = np.asarray(image.dataobj, dtype=np.float32)
    edges = ndimage.gaussian_gradient_magnitude(scan, sigma=GRADIENT_SIGMA)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    stacked = nib.Nifti1Image(np.stack([scan, edges], axis=-1), image.affine, header)
    stacked.header.set_slope_inter(1.0, 0.0)  # the intensities are written as they are
    return stacked


def write_task(source: Path, dataset: dict, entries: list[dict[str, str]], folder: Path) -> None:
    """Write the two-channel images, the copied labels and dataset.json into the empty ``folder``."""
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    for entry in entries:
        image_path, label_path = source / entry["image"], source / entry["label"]
        try:
            image = nib.load(image_path)
            stacked = two_channels(image, image_path)
        except (OSError, nib.filebasedimages.ImageFileError) as error:
            raise ConversionError(f"Cannot read {image_path} ({error}).") from None
        nib.save(stacked, folder / entry["image"])
        shutil.copyfile(label_path, folder / entry["label"])
    listing = {key: value for key, value in dataset.items() if key not in ("training", "test")}
    listing |= {
        "name": f"{dataset.get('name', 'Hippocampus')} two-channel",
        "description": f"{dataset.get('description', '')}; channel 1 is the Gaussian gradient "
        f"magnitude (sigma {GRADIENT_SIGMA:g} voxel) of channel 0, made by data_scripts/two_channel_hippocampus.py",
        "tensorImageSize": "4D",
        "modality": MODALITIES,
        "numTraining": len(entries),
        "numTest": 0,
        "training": entries,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(listing, indent=4) + "\n")


def build(source: Path, output: Path, cases: int | None = None, overwrite: bool = False) -> Path:
    """Build the two-channel task ``output`` from the first ``cases`` cases of ``source``.

    Raises ConversionError, with a one-sentence message, if the source is not an MSD task of 3D
    scans, if ``output`` exists and ``overwrite`` is false, or if it cannot be written."""
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; pass --overwrite to replace it.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder, so it will not be replaced.")
    dataset, entries = source_cases(source, cases)
    try:
        write_folder_atomically(output, lambda staging: write_task(source, dataset, entries, staging), "the task")
    except InputError as error:
        raise ConversionError(str(error)) from None
    except OSError as error:
        raise ConversionError(f"Cannot write {output} ({error.strerror or error}).") from error
    return output


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on any error, after one line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the Task04_Hippocampus folder")
    parser.add_argument(
        "--output", type=Path, required=True, help=f"the task folder to create, e.g. .../{TASK_NAME}"
    )
    parser.add_argument(
        "--cases", type=int, default=None, help="only the first N cases in name order (default: all)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        output = build(args.source, args.output, args.cases, args.overwrite)
    except ConversionError as error:
        print(error, file=sys.stderr)
        return 2
    count = json.loads((output / "dataset.json").read_text())["numTraining"]
    print(f"Wrote {count} two-channel hippocampus cases to {output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
