"""Label masks as a DICOM Segmentation (SEG) that references the series it segments.

Built with highdicom, and imported only when a SEG is asked for: nothing else needs highdicom.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from segment import __version__
from segment.atomic import write_atomically
from segment.io import Scan, ScanError, dicom_series
from segment.reporting import mask_text

# A model's config names its labels but codes no anatomy for them, so every segment gets the
# generic SNOMED CT "Tissue" category and type, as 3D Slicer gives a segment of unknown type;
# the segment label carries the label's name.
PROPERTY_CATEGORY = codes.SCT.Tissue
PROPERTY_TYPE = codes.SCT.Tissue
# Viewers list a study's series by number: a high one puts the SEG after the scans it segments.
SERIES_NUMBER = 1000
# Type 1 in the equipment module, so it cannot be left empty; software has no serial number.
DEVICE_SERIAL_NUMBER = "0"
LONG_STRING = 64  # the most characters a DICOM LO value (descriptions, model names) holds


def write_segmentation(
    mask: np.ndarray,
    scan: Scan,
    path: str | Path,
    label_names: dict[int, str],
    *,
    model: str,
    skip_mask: Sequence[int] | None = None,
) -> Path:
    """Write integer labels ``mask`` (``scan.array``'s (X, Y, Z) voxel order) as a BINARY DICOM
    SEG of the series in folder ``scan.path``, atomically.

    Each non-background label is one segment, numbered from 1 in label order and named with its
    label name. A label without voxels keeps its segment, described but with no frames (empty
    frames are omitted), so the SEG always names every label the model has; a mask with no
    label at all keeps its frames, all empty, since a SEG needs at least one frame."""
    path = Path(path)
    sources = _source_images(scan, mask.shape[2])
    segmentation = _segmentation(mask, sources, label_names, _algorithm(model, skip_mask), model)
    write_atomically(path, lambda temporary: segmentation.save_as(temporary))
    return path


def _source_images(scan: Scan, slices: int) -> list[pydicom.Dataset]:
    """The series' headers, one per mask slice, in GDCM's file order: the order SimpleITK's
    series reader stacked them along Z when the scan was read. Only GDCM's file list is read,
    never a path named inside a DICOM file."""
    series = dicom_series(scan.path)
    files = series[0][1] if len(series) == 1 else []
    if len(files) != slices:
        raise ScanError(
            f"{scan.path.name}/ holds {len(files)} DICOM files for {slices} slices; a DICOM SEG is "
            "written for a series of one file per slice, so write NIfTI for this one."
        )
    try:
        return [pydicom.dcmread(file, stop_before_pixels=True) for file in files]
    except InvalidDicomError as error:
        raise ScanError(f"{scan.path.name}/ holds a file pydicom cannot read ({error}).") from None


def _algorithm(model: str, skip_mask: Sequence[int] | None) -> hd.AlgorithmIdentificationSequence:
    parameters = {"model": model}
    if skip_mask is not None:
        # ``1101``: highdicom joins the parameters with commas, so not the CLI's ``1,1,0,1``.
        parameters["skip_mask"] = mask_text(skip_mask)
    return hd.AlgorithmIdentificationSequence(
        name="segment",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters=parameters,
    )


def _segmentation(
    mask: np.ndarray,
    sources: list[pydicom.Dataset],
    label_names: dict[int, str],
    algorithm: hd.AlgorithmIdentificationSequence,
    model: str,
) -> hd.seg.Segmentation:
    labels = [value for value in sorted(label_names) if value > 0]
    # highdicom takes (frames, rows, columns, segments), frame i being sources[i]: the mask's
    # Z indexes the files, and a DICOM frame's rows run along Y and its columns along X.
    frames = mask.transpose(2, 1, 0)
    channels = np.stack([frames == value for value in labels], axis=-1)
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=channels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(labels, label_names, algorithm),
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="segment",
            manufacturer_model_name="segment",
            software_versions=__version__,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            series_description=f"segment {model}"[:LONG_STRING],
            # A SEG needs one frame at least: an empty mask keeps all its (empty) frames.
            omit_empty_frames=bool(channels.any()),
        )
    except ValueError as error:
        # highdicom checks the source headers a SEG must copy or reference (one study, series
        # and frame of reference); a series lacking them is the user's to fix, not a bug here.
        reason = " ".join(str(error).split()).rstrip(".")
        folder = Path(sources[0].filename).parent.name
        raise ScanError(
            f"{folder}/ cannot be referenced by a DICOM SEG ({reason}); export the series with "
            "complete headers, or write NIfTI."
        ) from None


def _segment_descriptions(
    labels: list[int], label_names: dict[int, str], algorithm: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    return [
        hd.seg.SegmentDescription(
            number,
            label_names[value],
            PROPERTY_CATEGORY,
            PROPERTY_TYPE,
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm,
        )
        for number, value in enumerate(labels, start=1)
    ]
