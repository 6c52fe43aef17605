"""Reading scans and writing masks with the scan's geometry intact.

NIfTI goes through nibabel; NRRD and MHA through SimpleITK (MONAI has no SimpleITK reader).
Every scan is held as an array in the file's own voxel order, (X, Y, Z) or (X, Y, Z, channels)
for a multi-modal NIfTI (the Decathlon's brain tumour and prostate tasks store their MRI
sequences as the 4th dimension), plus the nibabel-style affine (voxel index -> RAS+
millimetres), so a mask written back lines up with its scan whatever the orientation: RAS, LPS
or oblique. Masks and labels are always 3D.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from segment.atomic import write_atomically, write_atomically_as
from segment.errors import SegmentError

if TYPE_CHECKING:
    import SimpleITK as sitk

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Probability and uncertainty maps: the values a uint16 voxel holds for [0, 1].
MAP_STEPS = 65535
ITK_SUFFIXES = (".nrrd", ".mha")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
# A header may declare any size; refuse before allocating more than this many voxels (2 GB of
# float32), which is far beyond any CT or MRI volume.
MAX_VOXELS = 512 * 1024 * 1024
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ScanError(SegmentError):
    """A file cannot be used as a scan; the message says which file and why."""


@dataclass
class Scan:
    """A 3D scan: intensities in the file's voxel order and the voxel -> RAS+ mm affine."""

    array: np.ndarray  # (X, Y, Z) float32, or (X, Y, Z, C) for C > 1 channels
    affine: np.ndarray  # (4, 4)
    path: Path
    nifti_header: nib.Nifti1Header | None = None  # carried over to the mask
    itk_reference: sitk.Image | None = None  # geometry source for NRRD/MHA masks
    warnings: list[str] = field(default_factory=list)  # odd but usable input, for the user
    spatial_dims: int = 3  # 2 when the file holds one 2D image (held here as a single slice)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The voxel grid (X, Y, Z), whatever the number of channels."""
        return tuple(self.array.shape[:3])

    @property
    def channels(self) -> int:
        return self.array.shape[3] if self.array.ndim == 4 else 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in :attr:`unit`."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def unit(self) -> str:
        """The spatial unit a NIfTI header declares (the converted EM task is in micrometres);
        millimetres otherwise, which is also what ITK reports for NRRD and MHA."""
        declared = self.nifti_header.get_xyzt_units()[0] if self.nifti_header is not None else "mm"
        return {"micron": "µm", "meter": "m"}.get(declared, "mm")

    @property
    def volume_unit(self) -> str:
        return "mL" if self.unit == "mm" else f"{self.unit}³"

    @property
    def voxel_volume(self) -> float:
        """One voxel's volume in :attr:`volume_unit`."""
        return float(np.prod(self.spacing)) / (1000.0 if self.unit == "mm" else 1.0)


def scan_suffix(path: str | Path) -> str:
    """The full suffix that decides the format (``.nii.gz``, not ``.gz``), or ``""``."""
    name = Path(path).name.lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), "")


def scan_stem(path: str | Path) -> str:
    name = Path(path).name
    return name[: len(name) - len(scan_suffix(name))] if scan_suffix(name) else Path(name).stem


def _volume_shape(shape: tuple[int, ...], path: Path, channels: int = 1) -> tuple[tuple[int, ...], int]:
    """The shape a file's declared ``shape`` is read as, (X, Y, Z) or (X, Y, Z, channels), and
    its spatial dimensions.

    Accepts (X, Y, Z), (X, Y) as one slice, trailing singleton axes, and (X, Y, Z, C) when C is
    ``channels`` > 1; refuses the rest from the header alone, before any voxel is read."""
    shape = tuple(int(size) for size in shape)
    if not shape or min(shape) < 1:
        raise ScanError(f"{path.name} declares an empty volume {shape}; its header is damaged.")
    voxels = int(np.prod(shape, dtype=np.float64))  # float: a damaged header can overflow int64
    if voxels > MAX_VOXELS:
        raise ScanError(
            f"{path.name} declares {voxels:,} voxels {shape}, more than the {MAX_VOXELS:,} allowed; "
            "its header is damaged or the scan must be cropped first."
        )
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3, 4):
        raise ScanError(
            f"{path.name} has {len(shape)} dimensions {shape}; give one 3D volume (or a 2D slice), "
            "e.g. a single channel or time point of it."
        )
    found = shape[3] if len(shape) == 4 else 1
    if found != channels:
        raise ScanError(_channel_mismatch(path, shape, channels))
    if len(shape) == 4:
        return shape, 3
    return (*shape, 1) if len(shape) == 2 else shape, len(shape)


def _channel_mismatch(path: Path, shape: tuple[int, ...], channels: int) -> str:
    wanted = f"the model reads {channels}; give a scan with one channel per model input."
    if len(shape) == 4:
        return f"{path.name} has 4 dimensions {shape}: {shape[3]} channels (its 4th dimension), but {wanted}"
    return f"{path.name} has 1 channel (it is {len(shape)}D, without a 4th dimension) but {wanted}"


def _unreadable(path: Path, reason: str) -> ScanError:
    reason = " ".join(reason.split())  # library messages can span lines; ours is one sentence
    return ScanError(
        f"{path.name} is not a readable NIfTI file ({reason[:200]}); "
        "check that it is a whole .nii or gzipped .nii.gz scan, or export it again."
    )


def _inflate(path: Path, wanted: int) -> bytes:
    """The decompressed bytes of gzip file ``path``, up to ``wanted`` of them, read in chunks so
    that a header declaring more than the stream holds costs no more memory than the stream.

    The stream is read past ``wanted`` to its end where it is not longer: only there does gzip
    check its CRC, and a stream damaged in the middle can inflate to plausible garbage."""
    chunks, total = [], 0
    with gzip.open(path) as stream:
        while total <= wanted and (chunk := stream.read(1 << 24)):
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)[:wanted]


class _HeaderProblems(logging.Filter):
    """Collects what nibabel logs while it reads one file (header fields it found odd or
    repaired, e.g. a zero voxel size set to 1 mm) instead of printing it: those become the
    scan's warnings. Only the reading thread's records are taken: viewer sessions stay apart."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.messages.append(record.getMessage())
        return False


def _read_nifti(path: Path, channels: int) -> Scan:
    problems = _HeaderProblems()
    nib.imageglobals.logger.addFilter(problems)
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise ScanError(f"{path.name} is a {type(image).__name__}, not a NIfTI image; give a NIfTI scan.")
        shape, dims = _volume_shape(image.shape, path, channels)
        dtype = image.get_data_dtype()
        if dtype.fields is not None or dtype.kind == "c":
            raise ScanError(
                f"{path.name} holds colour or complex voxels ({dtype}); give a single-channel greyscale scan."
            )
        # Before anything is allocated: a header may declare more data than the file holds, and
        # nibabel would first allocate all of it, then find the file short.
        declared = image.dataobj.offset + int(np.prod(image.shape)) * dtype.itemsize
        if path.name.lower().endswith(".gz"):
            # Inflated once, checked, and parsed from memory: nibabel would inflate it again.
            content = _inflate(path, declared)
            stored = len(content)
            if stored >= declared:
                image = type(image).from_bytes(content)
        else:
            stored = path.stat().st_size
        if stored < declared:
            raise _unreadable(
                path, f"its header declares {declared:,} bytes but the file holds only {stored:,}"
            )
        # Overflow to infinity (float64 or scaled data beyond float32) is counted and reported
        # with the NaN voxels by read_scan, not printed by numpy.
        with np.errstate(all="ignore"):
            array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except ScanError:
        raise
    except Exception as error:  # nibabel, gzip and numpy raise many kinds for broken files
        raise _unreadable(path, f"{error.__class__.__name__}: {error}") from None
    finally:
        nib.imageglobals.logger.removeFilter(problems)
    warnings = [
        f"{path.name}: nibabel found a problem in its header: {message}."
        for message in dict.fromkeys(problems.messages)  # a gzipped header is parsed twice
    ]
    return Scan(
        array,
        image.affine.astype(np.float64),
        path,
        nifti_header=image.header.copy(),
        warnings=warnings,
        spatial_dims=dims,
    )


def _read_itk(path: Path, channels: int) -> Scan:
    import SimpleITK as sitk  # only NRRD and MHA need it: NIfTI-only machines may lack it

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shape, dims = _volume_shape(reader.GetSize(), path, channels)
        image = reader.Execute()
    except ScanError:
        raise
    except RuntimeError as error:
        raise ScanError(f"{path.name} is not a readable {scan_suffix(path)} file ({_itk_reason(error)}).") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ScanError(
            f"{path.name} is not a single-channel 2D or 3D image; give a greyscale scan, or its channels as a 4D NIfTI."
        )
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    return _scan_from_itk(image, path, shape, dims)


def _scan_from_itk(image: sitk.Image, path: Path, shape: tuple[int, int, int], dims: int) -> Scan:
    import SimpleITK as sitk

    # SimpleITK's array is (Z, Y, X); ours is (X, Y, Z) as nibabel reads it.
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0).reshape(shape)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return Scan(array, LPS_TO_RAS @ lps, path, itk_reference=image, spatial_dims=dims)


def dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """The DICOM series GDCM finds in ``folder`` (not below it): (series UID, its files in
    slice order). Files that are not DICOM are passed over."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    # ITK prints "No Series were found" for a folder without any; the caller says so itself.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return [
            (uid, list(reader.GetGDCMSeriesFileNames(str(folder), uid)))
            for uid in reader.GetGDCMSeriesIDs(str(folder))
        ]
    except RuntimeError as error:
        raise ScanError(
            f"{folder.name}/ holds a damaged DICOM file ({_itk_reason(error)}); export the series again."
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _itk_reason(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unreadable").rstrip(".:")


def _read_dicom(folder: Path, channels: int) -> Scan:
    """One DICOM series in ``folder``, read with its geometry by SimpleITK's series reader."""
    import SimpleITK as sitk

    series = dicom_series(folder)
    if not series:
        raise ScanError(
            f"{folder.name}/ holds no DICOM series and no scans; give a folder of one DICOM series, "
            f"or scans ({', '.join(SUPPORTED_SUFFIXES)})."
        )
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series)
        raise ScanError(f"{folder.name}/ holds {len(series)} DICOM series, give one per folder: {listed}.")
    files = series[0][1]
    _check_slice_sizes(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # uneven slices are refused below instead
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ScanError(f"{folder.name}/ is not a readable DICOM series ({_itk_reason(error)}).") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise ScanError(f"{folder.name}/ is not a greyscale 3D DICOM series; give a CT or MR series.")
    _check_slice_spacing(reader, image, folder)
    shape, dims = _volume_shape(image.GetSize(), folder, channels)
    return _scan_from_itk(image, folder, shape, dims)


def _check_slice_sizes(files: list[str], folder: Path) -> None:
    """Refuse, from the headers alone, slices of different sizes and a series declaring more
    than MAX_VOXELS: the series reader would allocate whatever a damaged header declares."""
    import SimpleITK as sitk

    sizes = set()
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        try:
            header.ReadImageInformation()
        except RuntimeError as error:
            raise ScanError(f"{folder.name}/ holds a damaged DICOM file ({_itk_reason(error)}); export the series again.") from None
        sizes.add(tuple(header.GetSize()[:2]))
    if len(sizes) > 1:
        shown = ", ".join(" x ".join(map(str, size)) for size in sorted(sizes)[:3])
        raise ScanError(f"{folder.name}/ has slices of different sizes ({shown}); give the complete, undamaged series.")
    (columns, rows), = sizes
    _volume_shape((columns, rows, len(files)), folder)


def _check_slice_spacing(reader, image, folder: Path) -> None:
    """Refuse a series whose slices are missing or unevenly spaced: ITK would stack them at one
    spacing anyway, and a mask written on that grid would sit in the wrong place."""
    if image.GetDepth() < 3:
        return
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    try:
        positions = [
            [float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")]
            for index in range(image.GetDepth())
        ]
        along = np.asarray(positions) @ normal
    except (RuntimeError, ValueError):
        raise ScanError(
            f"{folder.name}/ has slices without a usable position (tag 0020,0032); export the series again."
        ) from None
    gaps = np.diff(along)
    typical = float(np.median(np.abs(gaps)))
    if typical == 0 or np.max(np.abs(np.abs(gaps) - typical)) > 0.01 * typical + 1e-3:
        raise ScanError(
            f"{folder.name}/ has missing or unevenly spaced slices (gaps from {np.min(np.abs(gaps)):.3g} to "
            f"{np.max(np.abs(gaps)):.3g} mm); give the complete series."
        )


def _check_geometry(scan: Scan) -> None:
    """Refuse a NaN, infinite or singular voxel -> world affine rather than guess one: a mask
    written with made-up geometry would sit in the wrong place without anyone noticing. (A zero
    NIfTI voxel size nibabel itself sets to 1 mm; that repair is passed on as a warning.)"""
    name = scan.path.name
    if not np.isfinite(scan.affine).all():
        raise ScanError(
            f"{name} has no usable geometry: its voxel-to-world affine holds NaN or infinite values; "
            "fix the header (NIfTI sform/qform, or origin, spacing and direction) or export it again."
        )
    if np.linalg.matrix_rank(scan.affine[:3, :3]) < 3:
        raise ScanError(
            f"{name} has no usable geometry: its voxel-to-world affine is singular (a voxel size of 0 "
            "or two axes along one line); fix the header or export it again."
        )


def read_scan(path: str | Path, channels: int = 1) -> Scan:
    """Read a NIfTI, NRRD or MHA scan, or a folder holding one DICOM series; :class:`ScanError`
    with one sentence if it is unusable.

    ``channels`` is how many the model reads: 1 takes a 3D scan (or a 2D slice); more take a
    4D NIfTI whose 4th dimension holds exactly that many (the Decathlon's multi-modal tasks).
    Any other combination is refused, naming both counts. NRRD and MHA files with vector
    voxels, and 4D ones, are refused (their channels would need ITK's own geometry for 4D);
    DICOM series are single-channel."""
    path = Path(path)
    suffix = scan_suffix(path)
    if path.is_dir():
        scan = _read_dicom(path, channels)
    elif not suffix:
        raise ScanError(f"{path.name} is not a supported scan; use {', '.join(SUPPORTED_SUFFIXES)}.")
    elif not path.is_file():
        raise ScanError(f"{path} does not exist.")
    elif path.stat().st_size == 0:
        raise ScanError(f"{path.name} is empty; give a scan ({', '.join(SUPPORTED_SUFFIXES)}).")
    else:
        scan = _read_nifti(path, channels) if suffix in NIFTI_SUFFIXES else _read_itk(path, channels)
    _check_geometry(scan)
    repaired = sum(_repair_non_finite(volume, path) for volume in _channel_views(scan.array))
    if repaired:
        scan.warnings.append(
            f"{path.name}: {repaired} NaN or infinite voxels were set to the lowest finite intensity."
        )
    return scan


def _channel_views(array: np.ndarray) -> list[np.ndarray]:
    """Each channel of ``array`` as a writable view (the array itself for one channel)."""
    return [array] if array.ndim == 3 else [array[..., index] for index in range(array.shape[3])]


def _repair_non_finite(volume: np.ndarray, path: Path) -> int:
    """Set NaN/Inf voxels of one channel (in place) to its lowest finite value, which reads as
    background: they appear after resampling. Returns how many there were."""
    non_finite = ~np.isfinite(volume)
    if non_finite.all():
        raise ScanError(f"{path.name} holds no finite intensities; give a scan with image data.")
    if non_finite.any():
        volume[non_finite] = volume[~non_finite].min()
    return int(non_finite.sum())


def check_label_matches(label: Scan, scan: Scan) -> None:
    """Refuse a label file whose voxel grid (shape or affine) is not the scan's: its voxels
    would be scored against the wrong anatomy."""
    if label.shape != scan.shape or not np.allclose(label.affine, scan.affine, atol=1e-3):
        raise ScanError(
            f"{label.path.name}: the label's shape or affine differs from the image's; "
            f"check that it is the labelling of {scan.path.name}."
        )


def label_description(label_names: dict[int, str]) -> str:
    return "labels " + " ".join(f"{value}={name}" for value, name in sorted(label_names.items()) if value > 0)


def write_maps(maps: np.ndarray, scan: Scan, path: str | Path, description: str) -> Path:
    """Write maps of values in [0, 1] (X, Y, Z, channels) over ``scan``'s voxels as a NIfTI with
    the scan's affine; ``description`` (what each channel holds) goes into its header.
    Atomically. NIfTI-1 has no float16, so values are stored as uint16 with a scale of 1/65535
    in the header (steps of 1.5e-5, half float32's size); every NIfTI reader applies it."""
    path = Path(path)
    if maps.shape[:3] != scan.shape:
        raise ValueError(f"map shape {maps.shape[:3]} differs from the scan's {scan.shape}")
    if scan_suffix(path) not in NIFTI_SUFFIXES:
        raise ScanError(f"Cannot write {path.name}: probability and uncertainty maps are NIfTI (.nii.gz or .nii).")
    header = nib.Nifti1Header()
    if scan.nifti_header is not None:
        header.set_xyzt_units(*scan.nifti_header.get_xyzt_units())
    header.set_data_dtype(np.uint16)
    header["descrip"] = description[:79].encode()
    steps = np.round(np.clip(maps, 0.0, 1.0) * MAP_STEPS).astype(np.uint16)
    image = nib.Nifti1Image(steps, scan.affine, header)
    image.header.set_slope_inter(1.0 / MAP_STEPS, 0.0)
    write_atomically_as(path, scan_suffix(path), lambda named: nib.save(image, named))
    return path


def write_mask(mask: np.ndarray, scan: Scan, path: str | Path, label_names: dict[int, str]) -> Path:
    """Write integer labels ``mask`` (the shape of ``scan``'s grid, :attr:`Scan.shape`) with the
    scan's geometry: a 3D mask, whatever the scan's channels.

    The format follows ``path``'s suffix. Label names go into the NIfTI description (or the
    NRRD/MHA metadata) and, in full, into a ``<name>.labels.json`` sidecar. Written atomically."""
    path = Path(path)
    if mask.shape != scan.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the scan's {scan.shape}")
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
        import SimpleITK as sitk

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
