"""Writing a volume out as a DICOM series, as a scanner would, for the tests that read DICOM."""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk


def write_series(image: sitk.Image, folder: Path, series_uid: str) -> Path:
    """``image`` as one MR DICOM file per slice, with the geometry tags a scanner writes."""
    # GDCM's writer sets the process locale to C, which would make every later subprocess's
    # output decode as ASCII in this test session; the locale is put back afterwards.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_slices(image, folder, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(image: sitk.Image, folder: Path, series_uid: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        slice_ = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{index:03d}.dcm"))
        writer.Execute(slice_)
    return folder
