"""Write a NIfTI, NRRD or MHA scan as a DICOM series: one file per slice, as a scanner writes one.

`segment predict` reads a folder of one DICOM series and can answer it with a DICOM SEG, and the
viewer takes such a folder zipped. This script makes such a series out of any scan, to try both
with data at hand or to hand a scan to a DICOM viewer::

    python data_scripts/nifti_to_dicom.py SCAN OUTPUT_FOLDER [--modality MR|CT] [--series-uid UID]

What is written, per slice ``N`` (from 0, along the scan's third voxel axis):
``OUTPUT_FOLDER/slice_NNN.dcm``, an MR (or CT) Image Storage instance of int16 voxels with the
tags a scanner writes and a DICOM SEG must reference: Study, Series and SOP Instance UIDs, the
Frame of Reference UID shared by every slice, Instance Number ``N + 1``, Image Position and
Orientation (Patient), Pixel Spacing, Slice Thickness and Modality. UIDs not given are made
fresh with pydicom's ``generate_uid``, so two runs on one scan make two unrelated series.

Voxels are stored as int16, as scanners store MR and CT: a scan whose voxels int16 cannot hold
exactly (fractions, or values beyond -32768..32767) is refused rather than rounded.

Geometry. The scan's voxel-to-world mapping is kept: ``segment.io.read_scan`` gives the series
the same voxels and affine as the scan. A scan whose axes are left-handed (the third axis
against the cross product of the first two) is written with its slices in reverse order, since
a DICOM series' slice order follows that cross product; the voxels stay where they were in
space.

The series is built in a hidden temporary sibling folder and renamed into place. A killed run
can leave that hidden ``.<name>.partial-*`` folder behind, but never a half-written series.
An existing output folder is refused unless it is empty.
"""

from __future__ import annotations

import argparse
import locale
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import RE_VALID_UID, generate_uid

from segment.atomic import write_folder_atomically
from segment.errors import InputError

STORAGE_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
INT16 = np.iinfo(np.int16)
MAX_UID_LENGTH = 64


class ConversionError(Exception):
    """The series cannot be written; the message is one sentence saying why."""


def _itk_reason(error: RuntimeError) -> str:
    """Shorten a multi-line SimpleITK error to its human-readable part, for one-line messages."""
    match = re.search(r"ITK ERROR: [^:]*\): (.*)", str(error), flags=re.DOTALL)
    return " ".join((match.group(1) if match else str(error)).split()).rstrip(".")


def read_volume(path: Path) -> sitk.Image:
    """``path`` as a single-channel 3D int16 image, or ConversionError."""
    if not path.is_file():
        raise ConversionError(f"{path} is not a file; give a .nii, .nii.gz, .nrrd or .mha scan.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ConversionError(f"Cannot read {path} as a scan ({_itk_reason(error)}).") from None
    dimension, channels = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension != 3 or channels != 1:
        raise ConversionError(
            f"{path} is a {dimension}D image with {channels} channel(s), "
            "but a DICOM series is written from a single-channel 3D scan."
        )
    voxels = sitk.GetArrayViewFromImage(image)
    if not (np.all(np.mod(voxels, 1) == 0) and INT16.min <= voxels.min() and voxels.max() <= INT16.max):
        raise ConversionError(
            f"{path} holds voxel values that int16 cannot hold exactly (fractions, or beyond "
            f"{INT16.min}..{INT16.max}), and DICOM MR and CT images store int16."
        )
    return sitk.Cast(image, sitk.sitkInt16)


def right_handed(image: sitk.Image) -> sitk.Image:
    """``image`` with its slices in the order a DICOM reader stacks them: along the cross product
    of the row and column directions. Flipping keeps every voxel at its place in space."""
    if np.linalg.det(np.reshape(image.GetDirection(), (3, 3))) > 0:
        return image
    return sitk.Flip(image, (False, False, True))


def decimals(values) -> str:
    """A DICOM multi-valued decimal string (DS values hold at most 16 characters)."""
    return "\\".join(f"{value:.6f}" for value in values)


def slice_tags(image: sitk.Image, index: int, series: dict[str, str]) -> dict[str, str]:
    """The tags of slice ``index``: the series-wide ones and where this slice lies."""
    direction = image.GetDirection()
    return {
        **series,
        "0008|0018": generate_uid(),  # SOP Instance UID
        "0020|0013": str(index + 1),  # Instance Number
        "0020|0032": decimals(image.TransformIndexToPhysicalPoint((0, 0, index))),  # Image Position
        # Image Orientation: the directions along a row (voxel axis 0) and down a column (axis 1).
        "0020|0037": decimals((*direction[0:7:3], *direction[1:8:3])),
        "0018|0050": decimals(image.GetSpacing()[2:]),  # Slice Thickness
    }


def series_tags(modality: str, series_uid: str) -> dict[str, str]:
    """The tags every slice of one series shares."""
    tags = {
        "0008|0016": STORAGE_CLASSES[modality],  # SOP Class UID
        "0008|0060": modality,
        "0020|000d": generate_uid(),  # Study Instance UID
        "0020|000e": series_uid,
        "0020|0011": "1",  # Series Number
        "0020|0052": generate_uid(),  # Frame of Reference UID, which a DICOM SEG must share
    }
    if modality == "CT":
        # Type 1 in the CT Image module: the stored values are the Hounsfield units themselves.
        tags |= {"0028|1052": "0", "0028|1053": "1"}
    return tags


def write_slices(image: sitk.Image, folder: Path, tags: dict[str, str]) -> None:
    writer = sitk.ImageFileWriter()
    # Else GDCM gives every file a study and series UID of its own: 35 slices, 35 series.
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        slice_ = image[:, :, index]
        for tag, value in slice_tags(image, index, tags).items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{index:03d}.dcm"))
        writer.Execute(slice_)


def write_series(
    image: sitk.Image, folder: Path, series_uid: str | None = None, modality: str = "MR"
) -> Path:
    """Write ``image`` (3D, int16 values) into the new or empty ``folder`` as one DICOM file per
    slice of series ``series_uid`` (fresh if not given), and return ``folder``."""
    # GDCM's writer sets the process locale to C, which would make every later subprocess's output
    # decode as ASCII in a caller's process (a test session, say); the locale is put back afterwards.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        image = right_handed(sitk.Cast(image, sitk.sitkInt16))
        tags = series_tags(modality, series_uid or generate_uid())
        return _write_in_place(folder, lambda staging: write_slices(image, staging, tags))
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_in_place(folder: Path, write) -> Path:
    """Run ``write`` on a hidden sibling of ``folder`` and rename that into place."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConversionError(
            f"{folder} already exists and is not an empty folder; give a new output folder."
        )
    try:
        return write_folder_atomically(folder, write, "the series")
    except InputError as error:
        raise ConversionError(str(error)) from None
    except OSError as error:
        raise ConversionError(f"Cannot write {folder} ({error.strerror or error}).") from None
    except RuntimeError as error:  # SimpleITK's, for a write that failed (a full disk, say)
        raise ConversionError(f"Cannot write {folder} ({_itk_reason(error)}).") from None


def convert(scan: Path, output: Path, modality: str = "MR", series_uid: str | None = None) -> Path:
    """Write ``scan`` into the new folder ``output`` as a DICOM series; ConversionError, one
    sentence, when it cannot."""
    if series_uid is not None and not (RE_VALID_UID.match(series_uid) and len(series_uid) <= MAX_UID_LENGTH):
        raise ConversionError(
            f"{series_uid!r} is not a DICOM UID (numbers joined by dots, at most {MAX_UID_LENGTH} characters)."
        )
    return write_series(read_volume(scan), output, series_uid, modality)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on any error, after one line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan", type=Path, help="a 3D scan: .nii, .nii.gz, .nrrd or .mha")
    parser.add_argument("output", type=Path, help="the folder to create, one .dcm file per slice")
    parser.add_argument(
        "--modality", choices=sorted(STORAGE_CLASSES), default="MR", help="default: %(default)s"
    )
    parser.add_argument("--series-uid", help="the Series Instance UID (default: a new one)")
    args = parser.parse_args(argv)
    try:
        output = convert(args.scan, args.output, args.modality, args.series_uid)
    except ConversionError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {len(list(output.iterdir()))} DICOM slices to {output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
