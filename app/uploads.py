"""What the viewer accepts as a scan, read without Streamlit: an uploaded NIfTI, NRRD or MHA
file, a .zip of one DICOM series (:mod:`segment.archives`), or the bundled example case.
Uploaded bytes are written under names we choose in a private folder that is removed once read;
the name the browser sent is shown in messages and never used as a path."""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from segment import examples
from segment.archives import read_dicom_zip
from segment.io import SUPPORTED_SUFFIXES, ZIP_SUFFIX, Scan, ScanError, read_scan, scan_suffix

EXAMPLE_CASE = "hippocampus_099"  # in segment/examples/, with its licence and attribution
# What Streamlit's uploader filters on: it looks at the last suffix only (.gz, not .nii.gz);
# read_upload checks the whole name.
SCAN_TYPES = ("nii", "gz", "nrrd", "mha", "zip")
LABEL_TYPES = ("nii", "gz", "nrrd", "mha")


@dataclass(frozen=True)
class Upload:
    """An uploaded file read as a scan. ``name`` is what the browser sent: it is shown in
    messages and never used as a path; ``scan.path`` is the name we chose (in a folder since
    removed)."""

    name: str
    digest: str
    scan: Scan


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def accepted(what: str) -> str:
    """The formats the ``what`` upload takes, for the uploader's label and the refusals."""
    formats = ", ".join(SUPPORTED_SUFFIXES)
    return f"{formats} or a {ZIP_SUFFIX} of one DICOM series" if what == "scan" else formats


def read_upload(name: str, data: bytes, what: str, channels: int = 1) -> Upload:
    """Read uploaded bytes as a scan (``what`` is "scan" or "labels") of ``channels`` channels
    (the model's inputs; labels have one), under a name we choose (``<what>.nii.gz``; a zipped
    DICOM series unpacks as ``scan.zip/``); ScanError, naming the upload, when they are not a
    usable scan."""
    suffix = scan_suffix(name)
    if what == "scan" and name.lower().endswith(ZIP_SUFFIX):
        return Upload(name, digest(data), read_dicom_zip(data, name, channels))
    if not suffix:
        raise ScanError(f"The {what} {name!r} is not a supported file; upload {accepted(what)}.")
    ours = f"{what}{suffix}"
    with tempfile.TemporaryDirectory(prefix="segment-upload-") as folder:
        path = Path(folder) / ours
        path.write_bytes(data)
        try:
            scan = read_scan(path, channels)
        except ScanError as error:
            # The message should name the file the user chose, not our temporary copy.
            raise ScanError(str(error).replace(ours, name)) from None
    return Upload(name, digest(data), scan)


def example_upload(what: str) -> tuple[str, bytes]:
    """(name, bytes) of the bundled example's scan ("scan") or labels ("labels")."""
    folder = Path(examples.__file__).resolve().parent / EXAMPLE_CASE
    path = folder / ("image.nii.gz" if what == "scan" else "label.nii.gz")
    return f"{EXAMPLE_CASE}{'' if what == 'scan' else '_labels'}.nii.gz", path.read_bytes()


def upload_names(message: str, *uploads: Upload | None) -> str:
    """``message`` with our names for the uploads' files replaced by the names they were
    uploaded under, in one pass (an upload name may contain another file's name)."""
    names = {upload.scan.path.name: upload.name for upload in uploads if upload is not None}
    if not names:
        return message
    pattern = "|".join(re.escape(ours) for ours in sorted(names, key=len, reverse=True))
    return re.sub(pattern, lambda match: names[match.group(0)], message)
