"""Reading scans and writing masks with the scan's geometry intact.

NIfTI goes through nibabel; NRRD and MHA through SimpleITK (MONAI has no SimpleITK reader).
Every scan is held as a 3D array in the file's own voxel order plus the nibabel-style affine
(voxel index -> RAS+ millimetres), so a mask written back lines up with its scan whatever
the orientation: RAS, LPS or oblique.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from segment.atomic import write_atomically, write_atomically_as

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".mha")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# A header may declare any size; refuse before allocating more than this many voxels (2 GB of
# float32), which is far beyond any CT or MRI volume.
MAX_VOXELS = 512 * 1024 * 1024
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ScanError(ValueError):
    """A file cannot be used as a scan; the message says which file and why."""


@dataclass
class Scan:
    """A 3D scan: intensities in the file's voxel order and the voxel -> RAS+ mm affine."""

    array: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4)
    path: Path
    nifti_header: nib.Nifti1Header | None = None  # carried over to the mask
    itk_reference: sitk.Image | None = None  # geometry source for NRRD/MHA masks
    warnings: list[str] = field(default_factory=list)  # odd but usable input, for the user

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def scan_suffix(path: str | Path) -> str:
    """The full suffix that decides the format (``.nii.gz``, not ``.gz``), or ``""``."""
    name = Path(path).name.lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), "")


def scan_stem(path: str | Path) -> str:
    name = Path(path).name
    return name[: len(name) - len(scan_suffix(name))] if scan_suffix(name) else Path(name).stem


def _as_volume(array: np.ndarray, path: Path) -> np.ndarray:
    """Accept (X, Y, Z), (X, Y) as one slice, and trailing singleton axes; refuse the rest."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ScanError(
            f"{path.name} has {array.ndim} dimensions {array.shape}; give one 3D volume (or a 2D slice)."
        )
    return array


def _check_size(shape: tuple[int, ...], path: Path) -> None:
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise ScanError(
            f"{path.name} declares {voxels:,} voxels {tuple(shape)}, more than the {MAX_VOXELS:,} allowed."
        )


def _read_nifti(path: Path) -> Scan:
    try:
        image = nib.load(path)
        _check_size(image.shape, path)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except ScanError:
        raise
    except Exception as error:  # nibabel raises many kinds for broken files
        raise ScanError(
            f"{path.name} is not a readable NIfTI file ({error.__class__.__name__}: {error})."
        ) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ScanError(f"{path.name} is not a NIfTI image.")
    return Scan(
        _as_volume(array, path), image.affine.astype(np.float64), path, nifti_header=image.header.copy()
    )


def _read_itk(path: Path) -> Scan:
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_size(reader.GetSize(), path)
        image = reader.Execute()
    except ScanError:
        raise
    except RuntimeError as error:
        raise ScanError(
            f"{path.name} is not a readable {scan_suffix(path)} file ({str(error).strip().splitlines()[-1]})."
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ScanError(f"{path.name} is not a single-channel 2D or 3D image.")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    # SimpleITK's array is (Z, Y, X); ours is (X, Y, Z) as nibabel reads it.
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return Scan(_as_volume(array, path), LPS_TO_RAS @ lps, path, itk_reference=image)


def read_scan(path: str | Path) -> Scan:
    """Read a NIfTI, NRRD or MHA scan; :class:`ScanError` with one sentence if it is unusable."""
    path = Path(path)
    suffix = scan_suffix(path)
    if not suffix:
        raise ScanError(f"{path.name} is not a supported scan; use {', '.join(SUPPORTED_SUFFIXES)}.")
    if not path.is_file():
        raise ScanError(f"{path} does not exist.")
    if path.stat().st_size == 0:
        raise ScanError(f"{path.name} is empty.")
    scan = _read_nifti(path) if suffix in NIFTI_SUFFIXES else _read_itk(path)
    non_finite = ~np.isfinite(scan.array)
    if non_finite.all():
        raise ScanError(f"{path.name} holds no finite intensities.")
    if non_finite.any():
        # NaN/Inf appear after resampling; the lowest finite value reads as background.
        scan.array[non_finite] = scan.array[~non_finite].min()
        scan.warnings.append(
            f"{path.name}: {int(non_finite.sum())} NaN or infinite voxels were set to the lowest finite intensity."
        )
    return scan


def label_description(label_names: dict[int, str]) -> str:
    return "labels " + " ".join(f"{value}={name}" for value, name in sorted(label_names.items()) if value > 0)


def write_mask(mask: np.ndarray, scan: Scan, path: str | Path, label_names: dict[int, str]) -> Path:
    """Write integer labels ``mask`` (same shape as ``scan.array``) with the scan's geometry.

    The format follows ``path``'s suffix. Label names go into the NIfTI description (or the
    NRRD/MHA metadata) and, in full, into a ``<name>.labels.json`` sidecar. Written atomically."""
    path = Path(path)
    if mask.shape != scan.array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the scan's {scan.array.shape}")
    suffix = scan_suffix(path)
    if not suffix:
        raise ScanError(f"Cannot write {path.name}: use {', '.join(SUPPORTED_SUFFIXES)}.")
    labels = mask.astype(np.uint8)
    description = label_description(label_names)
    if suffix in NIFTI_SUFFIXES:
        header = scan.nifti_header.copy() if scan.nifti_header is not None else nib.Nifti1Header()
        header.set_data_dtype(np.uint8)
        header["descrip"] = description[:79].encode()
        image = nib.Nifti1Image(labels, scan.affine, header)
        image.header.set_slope_inter(1.0, 0.0)
        write_atomically_as(path, suffix, lambda named: nib.save(image, named))
    else:
        image = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
        if scan.itk_reference is not None:
            image.CopyInformation(scan.itk_reference)
        else:
            _set_itk_geometry(image, scan.affine)
        image.SetMetaData("labels", description)
        write_atomically_as(path, suffix, lambda named: sitk.WriteImage(image, str(named), True))
    sidecar = path.with_name(scan_stem(path) + ".labels.json")
    write_atomically(
        sidecar,
        lambda temporary: temporary.write_text(
            json.dumps({str(k): v for k, v in sorted(label_names.items())}, indent=2)
        ),
    )
    return path


def _set_itk_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).reshape(-1)))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
