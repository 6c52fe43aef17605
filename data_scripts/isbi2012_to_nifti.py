"""Convert the ISBI 2012 EM membrane PNG slices into a Medical Segmentation Decathlon task folder.

The MONAI pipeline reads MSD task folders (``dataset.json`` plus ``imagesTr``/``labelsTr``), so
converting ISBI 2012 into that layout lets the same code train on it unchanged::

    python data_scripts/isbi2012_to_nifti.py [--source DIR] [--output DIR] [--overwrite]

Source: the ``ISBI2012_EM_membrane`` folder (``train/image/{0..29}.png`` and
``train/label/{0..29}.png``, 8-bit greyscale, labels 0 = membrane and 255 = everything else).
Default: ``$SEGMENT_DATA_ROOT/ISBI2012_EM_membrane``, or ``./data/ISBI2012_EM_membrane`` when the
variable is unset. Output default: ``Task90_ISBI2012`` next to it in the same data root.

What is written, per training slice ``N.png``:

- ``imagesTr/isbi2012_NNN.nii.gz``: uint8 intensities, unchanged from the PNG.
- ``labelsTr/isbi2012_NNN.nii.gz``: uint8, 1 = membrane (0 in the PNG), 0 = everything else.

``NNN`` is the PNG's own slice number, zero-padded, so a case can be traced back to its source.

Layout and orientation. Every case is a single-slice 3-D volume of shape (H, W, 1), because the
slice-based MONAI transforms expect 3-D NIfTI. Voxel axis 0 is the PNG row (top to bottom),
axis 1 the PNG column (left to right), axis 2 the section. So ``nibabel.load(f).get_fdata()``,
and MONAI's ``LoadImage``, squeezed to 2-D, equal the PNG array exactly with no transpose.
(SimpleITK's ``GetArrayFromImage`` reverses axis order, as it does for every image, so it shows
the transpose; a viewer will likewise display the slice transposed relative to the PNG.)

Spacing. The ISBI 2012 stack has 4 x 4 nm pixels and 50 nm sections. The affine is
diag(0.004, 0.004, 0.05) and the NIfTI header's spatial unit is micrometre. nibabel and MONAI's
NibabelReader report those numbers as they are (0.004, not scaled). ITK-based readers convert
micrometres to millimetres, so they report 4e-06 and 5e-05. ``dataset.json`` records the spacing
and its unit.

The 30 unlabelled test slices are not converted: ``numTest`` is 0.

The task is built in a hidden temporary sibling folder and renamed into place. A killed
conversion can leave that hidden ``.<name>.partial-*`` folder behind, but never a half-written
task.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from segment.atomic import write_folder_atomically
from segment.errors import InputError

TASK_NAME = "Task90_ISBI2012"
SOURCE_NAME = "ISBI2012_EM_membrane"
CASE_PREFIX = "isbi2012"
# Voxel size in micrometres: 4 nm pixels, 50 nm sections (Cardona et al. 2010).
SPACING_UM = (0.004, 0.004, 0.05)
PNG_MEMBRANE = 0
PNG_BACKGROUND = 255


class ConversionError(Exception):
    """The conversion cannot proceed; the message is one sentence saying why."""


def default_data_root() -> Path:
    """``$SEGMENT_DATA_ROOT`` if set and non-empty, else ``./data``."""
    return Path(os.environ.get("SEGMENT_DATA_ROOT") or "data")


def _itk_reason(error: RuntimeError) -> str:
    """Shorten a multi-line SimpleITK error to its human-readable part, for one-line messages."""
    text = str(error)
    match = re.search(r"ITK ERROR: [^:]*\): (.*)", text, flags=re.DOTALL)
    reason = match.group(1) if match else text
    return " ".join(reason.split()).rstrip(".")


def read_png(path: Path) -> np.ndarray:
    """Read an 8-bit greyscale PNG as a (rows, columns) uint8 array, or raise ConversionError."""
    reader = sitk.ImageFileReader()
    # Forcing the PNG reader means a mislabelled file fails here instead of being read by another IO.
    reader.SetImageIO("PNGImageIO")
    reader.SetFileName(str(path))
    try:
        array = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as error:
        raise ConversionError(f"Cannot read {path} as a PNG image ({_itk_reason(error)}).") from error
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ConversionError(
            f"{path} is a {array.dtype} image of shape {array.shape}, but an 8-bit greyscale slice was expected."
        )
    return array


def find_pairs(source: Path) -> list[tuple[int, Path, Path]]:
    """List (slice number, image PNG, label PNG) for every training slice, in slice order."""
    image_dir = source / "train" / "image"
    label_dir = source / "train" / "label"
    if not source.is_dir():
        raise ConversionError(
            f"Source folder {source} does not exist; pass --source pointing at the {SOURCE_NAME} folder."
        )
    if not (image_dir.is_dir() and label_dir.is_dir()):
        raise ConversionError(
            f"{source} has no train/image and train/label folders, so it is not the {SOURCE_NAME} layout."
        )
    try:
        images = {p.name for p in image_dir.glob("*.png")}
        labels = {p.name for p in label_dir.glob("*.png")}
    except OSError as error:
        raise ConversionError(f"Cannot list the PNG files in {source} ({error.strerror}).") from error
    if not images:
        raise ConversionError(f"{image_dir} contains no PNG files.")
    if images != labels:
        unpaired = sorted(images ^ labels)
        raise ConversionError(
            f"Images and labels in {source / 'train'} do not pair up by file name "
            f"(unpaired: {', '.join(unpaired[:5])}{', ...' if len(unpaired) > 5 else ''})."
        )
    non_numeric = sorted(name for name in images if not Path(name).stem.isdigit())
    if non_numeric:
        raise ConversionError(
            f"{image_dir} holds {non_numeric[0]}, but slices must be named by their number (0.png, 1.png, ...)."
        )
    # Numeric order, not string order: 10.png must come after 9.png, not after 1.png.
    numbers = sorted(int(Path(name).stem) for name in images)
    return [(n, image_dir / f"{n}.png", label_dir / f"{n}.png") for n in numbers]


def membrane_label(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a label PNG and return uint8 with 1 = membrane, 0 = everything else."""
    png = read_png(path)
    if png.shape != shape:
        raise ConversionError(f"{path} has shape {png.shape} but its image has shape {shape}.")
    unexpected = np.setdiff1d(np.unique(png), [PNG_MEMBRANE, PNG_BACKGROUND])
    if unexpected.size:
        # Anything else would mean a resampled or different label set; guessing a threshold could
        # silently shift membrane boundaries.
        raise ConversionError(
            f"{path} contains values {unexpected[:5].tolist()} besides {PNG_MEMBRANE} and {PNG_BACKGROUND}."
        )
    return (png == PNG_MEMBRANE).astype(np.uint8)


def save_slice(array: np.ndarray, path: Path) -> None:
    """Save a (rows, columns) uint8 slice as an (H, W, 1) NIfTI with the ISBI spacing in micrometres."""
    affine = np.diag([*SPACING_UM, 1.0])
    image = nib.Nifti1Image(array[:, :, np.newaxis], affine)
    # Both qform and sform, with the same code, so every reader (nibabel, ITK) takes the same geometry.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="micron")
    nib.save(image, path)


def dataset_json(case_ids: list[str]) -> dict:
    """The MSD ``dataset.json`` for the converted cases, with the spacing unit spelled out."""
    return {
        "name": "ISBI2012",
        "description": (
            "ISBI 2012 EM segmentation challenge, neuronal membranes in serial-section TEM of the Drosophila "
            "first-instar larva ventral nerve cord; each case is one 512x512 slice stored as a (H, W, 1) volume, "
            "voxel axis 0 = PNG row, axis 1 = PNG column; voxel spacing 0.004 x 0.004 x 0.05 micrometres "
            "(4 x 4 nm pixels, 50 nm sections), NIfTI spatial unit micrometre"
        ),
        "reference": (
            "Cardona et al., PLoS Biol 8(10): e1000515 (2010); Arganda-Carreras et al., Front. Neuroanat. 9:142 "
            "(2015); ISBI 2012 challenge 'Segmentation of neuronal structures in EM stacks'"
        ),
        "licence": "ISBI 2012 challenge terms: non-commercial use, attribution",
        "tensorImageSize": "3D",
        "spacing": list(SPACING_UM),
        "spacingUnit": "micrometre",
        "modality": {"0": "EM"},
        "labels": {"0": "background", "1": "membrane"},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"} for case in case_ids
        ],
        "test": [],
    }


def write_task(pairs: list[tuple[int, Path, Path]], folder: Path) -> None:
    """Write images, labels and dataset.json for ``pairs`` into the (empty) ``folder``."""
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    case_ids = []
    for number, image_png, label_png in pairs:
        case = f"{CASE_PREFIX}_{number:03d}"
        image = read_png(image_png)
        label = membrane_label(label_png, image.shape)
        save_slice(image, folder / "imagesTr" / f"{case}.nii.gz")
        save_slice(label, folder / "labelsTr" / f"{case}.nii.gz")
        case_ids.append(case)
    (folder / "dataset.json").write_text(json.dumps(dataset_json(case_ids), indent=4) + "\n")


def convert(source: Path, output: Path, overwrite: bool = False) -> Path:
    """Convert the ISBI 2012 training slices in ``source`` into the MSD task folder ``output``.

    Raises ConversionError, with a one-sentence message, if the source is missing or malformed,
    if ``output`` exists and ``overwrite`` is false, or if ``output`` cannot be written.
    Returns ``output``.
    """
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; pass --overwrite to replace it.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder, so it will not be replaced.")
    # Validate the whole source before touching the output side.
    pairs = find_pairs(source)
    try:
        write_folder_atomically(output, lambda staging: write_task(pairs, staging), "the task")
    except InputError as error:
        raise ConversionError(str(error)) from None
    except OSError as error:
        raise ConversionError(f"Cannot write {output} ({error.strerror or error}).") from error
    return output


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on any error, after one line on stderr)."""
    data_root = default_data_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=data_root / SOURCE_NAME,
        help=f"the {SOURCE_NAME} folder (default: %(default)s, from $SEGMENT_DATA_ROOT or ./data)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=data_root / TASK_NAME,
        help="the task folder to create (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        output = convert(args.source, args.output, overwrite=args.overwrite)
    except ConversionError as error:
        print(error, file=sys.stderr)
        return 2
    count = json.loads((output / "dataset.json").read_text())["numTraining"]
    print(f"Wrote {count} ISBI 2012 cases to {output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
