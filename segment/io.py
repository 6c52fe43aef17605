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
import mmap
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from segment.atomic import raise_if_no_room, write_atomically, write_atomically_as
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
ZIP_SUFFIX = ".zip"  # of one DICOM series: segment.archives unpacks it

# A DICOM file opens with a 128-byte preamble and the marker "DICM"; a file without it is no
# DICOM file here (GDCM would still try to parse it), and one named so is refused as broken.
DICOM_PREAMBLE = 128
DICOM_MARKER = b"DICM"
DICOM_PREFIX = DICOM_PREAMBLE + len(DICOM_MARKER)
DICOM_SUFFIXES = (".dcm", ".dicom")
# A slice's headers hold a few hundred elements (5,000 slices: about 1.5 million), an enhanced
# multi-frame file's some tens of thousands. Each takes the pre-scan about 3 microseconds, and
# GDCM more: a folder of 1 GiB of empty 8-byte elements would keep them busy for minutes.
MAX_DICOM_ELEMENTS = 2_000_000
ORIENTATION_TOLERANCE = 1e-3  # of the direction cosines in Image Orientation (Patient)
DICOM_TEXT = 64  # the most characters of a DICOM UID or description a message shows
META_GROUP = 0x0002
ITEM_GROUP = 0xFFFE
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Value representations whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
IMPLICIT_LITTLE_ENDIAN, EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
TRANSFER_SYNTAX, SERIES_DESCRIPTION, SERIES_UID = 0x00020010, 0x0008103E, 0x0020000E
INSTANCE_NUMBER, IMAGE_POSITION, IMAGE_ORIENTATION = 0x00200013, 0x00200032, 0x00200037
PIXEL_DATA = 0x7FE00010
WANTED_TAGS = frozenset(
    (TRANSFER_SYNTAX, SERIES_DESCRIPTION, SERIES_UID, INSTANCE_NUMBER, IMAGE_POSITION, IMAGE_ORIENTATION)
)


class ScanError(SegmentError):
    """A file cannot be used as a scan; the message says which file and why."""


def nifti_unit(header: nib.Nifti1Header) -> str:
    """The spatial unit a NIfTI header declares: µm, m, or mm (also when it declares none)."""
    return {"micron": "µm", "meter": "m"}.get(header.get_xyzt_units()[0], "mm")


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
        return nifti_unit(self.nifti_header) if self.nifti_header is not None else "mm"

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
    """The DICOM image series in ``folder`` (not below it): (series UID, its files in slice
    order), every file checked by :func:`_dicom_header` first. Other files are passed over."""
    return [(uid, [str(item.path) for item in slices]) for uid, slices in _dicom_folder(folder).series.items()]


@dataclass(frozen=True)
class _DicomHeader:
    """What the pre-scan keeps of one DICOM file: the raw top-level values of WANTED_TAGS."""

    values: dict[int, bytes]
    has_pixels: bool
    elements: int  # element headers walked, items and delimiters included


class _UnsafeDicom(Exception):
    """A file claims to be DICOM (its marker) but its headers cannot be trusted; says why."""


class _TooManyElements(Exception):
    """The pre-scan's element budget ran out."""


@dataclass
class _Container:
    """Where the pre-scan is: a dataset (the file's or an item's), a sequence of items, or the
    fragments of compressed pixel data; up to where it may run, and how its elements are
    encoded."""

    kind: str  # "dataset", "sequence" or "fragments"
    end: int | None  # where a defined length ends it; None: its delimiter does
    limit: int  # no value inside may run past this: its own end, else its parent's limit
    endian: str  # "<" or ">", for struct
    implicit: bool  # implicit VR: no VR in the element headers

    def inner(self, kind: str, end: int | None, unknown_vr: bool = False) -> _Container:
        """A container inside this one (``end`` None: until its delimiter), encoded as this one
        except in an element of VR UN: implicit VR little endian there, whatever the file's
        transfer syntax (PS3.5 6.2.2)."""
        limit = self.limit if end is None else end
        if unknown_vr:
            return _Container(kind, end, limit, "<", True)
        return _Container(kind, end, limit, self.endian, self.implicit)


def _dicom_header(data: bytes | mmap.mmap, max_elements: int) -> _DicomHeader:
    """Walk every element header of the DICOM file ``data`` (preamble and marker checked by the
    caller), into sequences and items, before GDCM reads it: GDCM allocates whatever length a
    header declares (gigabytes for a damaged one). A length that runs past the end of the file
    or of the item holding it, a header cut short or an item out of place raises
    :class:`_UnsafeDicom`; more than ``max_elements`` headers raise :class:`_TooManyElements`.
    Values are skipped, not read, except WANTED_TAGS' at the top level."""
    size = len(data)
    # The file meta group is explicit VR little endian; the transfer syntax it names sets the rest.
    stack = [_Container("dataset", size, size, "<", False)]
    values: dict[int, bytes] = {}
    has_pixels, in_meta = False, True
    offset, elements = DICOM_PREFIX, 0
    while True:
        container = stack[-1]
        if offset == container.end:
            if len(stack) == 1:
                return _DicomHeader(values, has_pixels, elements)
            stack.pop()
            continue
        elements += 1
        if elements > max_elements:
            raise _TooManyElements
        if offset == container.limit:
            raise _UnsafeDicom(f"it ends at byte {offset:,}, inside a sequence or item never closed")
        if offset + 8 > container.limit:
            raise _UnsafeDicom(f"the element header at byte {offset:,} runs past the end of the file or its item")
        if in_meta and len(stack) == 1 and struct.unpack_from("<H", data, offset)[0] != META_GROUP:
            in_meta = False
            container.endian, container.implicit = _body_encoding(values.get(TRANSFER_SYNTAX))
        group, element, item_length = struct.unpack_from(container.endian + "HHI", data, offset)
        tag = group << 16 | element
        if group == ITEM_GROUP:  # items and delimiters: a tag and a 4-byte length in any encoding
            offset = _enter_item(tag, item_length, offset, stack)
            continue
        if container.kind != "dataset":
            raise _UnsafeDicom(f"element {_tag(tag)} at byte {offset:,} sits in a sequence outside any item")
        vr, length, start = _element_header(data, offset, container)
        top_level = len(stack) == 1
        if length == UNDEFINED_LENGTH:
            if tag == PIXEL_DATA:
                stack.append(container.inner("fragments", None))
            elif vr in (None, b"SQ", b"UN"):  # without a VR, an undefined length means items
                stack.append(container.inner("sequence", None, unknown_vr=vr == b"UN"))
            else:
                raise _UnsafeDicom(f"element {_tag(tag)} at byte {offset:,} declares an undefined length")
        elif start + length > container.limit:
            raise _UnsafeDicom(
                f"element {_tag(tag)} declares {length:,} bytes, but {container.limit - start:,} remain "
                + ("in the file" if container.limit == size else "in the item holding it")
            )
        elif vr == b"SQ" or (vr in (None, b"UN") and length >= 8 and _is_item(data, start, container.endian)):
            stack.append(container.inner("sequence", start + length, unknown_vr=vr == b"UN"))
        else:
            if top_level and tag in WANTED_TAGS:
                values[tag] = bytes(data[start : start + length])
            start += length
        has_pixels = has_pixels or (tag == PIXEL_DATA and top_level)
        offset = start


def _body_encoding(transfer_syntax: bytes | None) -> tuple[str, bool]:
    """(struct byte order, implicit VR) of the dataset after the file meta group."""
    if transfer_syntax is None:
        raise _UnsafeDicom("they name no transfer syntax (0002,0010)")
    uid = transfer_syntax.rstrip(b"\0 ").decode("latin-1")
    if uid == DEFLATED:
        raise _UnsafeDicom("they are deflated, and cannot be checked before GDCM inflates them")
    return (">" if uid == EXPLICIT_BIG_ENDIAN else "<"), uid == IMPLICIT_LITTLE_ENDIAN


def _enter_item(tag: int, length: int, offset: int, stack: list[_Container]) -> int:
    """Open or close the item or sequence that item tag ``tag`` at ``offset`` starts or ends,
    and return where the next header is."""
    container = stack[-1]
    start = offset + 8
    if tag == ITEM and container.kind == "sequence" and length == UNDEFINED_LENGTH:
        stack.append(container.inner("dataset", None))
        return start
    if tag == ITEM and container.kind != "dataset" and length != UNDEFINED_LENGTH:
        if start + length > container.limit:
            raise _UnsafeDicom(f"an item at byte {offset:,} declares {length:,} bytes, more than remain")
        if container.kind == "sequence":
            stack.append(container.inner("dataset", start + length))
            return start
        return start + length  # a fragment of compressed pixel data
    closes = ITEM_END if container.kind == "dataset" else SEQUENCE_END
    if tag == closes and container.end is None and len(stack) > 1:
        stack.pop()
        return start
    raise _UnsafeDicom(f"item tag {_tag(tag)} at byte {offset:,} is out of place")


def _element_header(data: bytes | mmap.mmap, offset: int, container: _Container) -> tuple[bytes | None, int, int]:
    """(VR, None without one; declared length; where the value starts) of the element at
    ``offset``. Where explicit VR is expected but the two bytes are no VR, the element is read
    as implicit VR, as pydicom and GDCM read files that switch encoding in a sequence."""
    vr = bytes(data[offset + 4 : offset + 6])
    if container.implicit or not (vr.isalpha() and vr.isupper()):
        return None, struct.unpack_from(container.endian + "I", data, offset + 4)[0], offset + 8
    if vr not in LONG_LENGTH_VRS:
        return vr, struct.unpack_from(container.endian + "H", data, offset + 6)[0], offset + 8
    if offset + 12 > container.limit:
        raise _UnsafeDicom(f"the element header at byte {offset:,} runs past the end of the file or its item")
    return vr, struct.unpack_from(container.endian + "I", data, offset + 8)[0], offset + 12


def _is_item(data: bytes | mmap.mmap, offset: int, endian: str) -> bool:
    return struct.unpack_from(endian + "HH", data, offset) == (ITEM_GROUP, ITEM & 0xFFFF)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass
class _Slice:
    """One DICOM image file, as the pre-scan read its header."""

    path: Path
    description: str
    position: np.ndarray | None  # Image Position (Patient), mm
    orientation: np.ndarray | None  # Image Orientation (Patient): row and column directions
    number: int | None  # Instance Number


@dataclass
class _DicomFolder:
    series: dict[str, list[_Slice]]  # series UID -> its images in slice order
    not_dicom: list[Path]  # files without the DICOM marker
    not_images: list[Path]  # DICOM files without pixel data (a DICOMDIR, a report)


def _dicom_folder(folder: Path) -> _DicomFolder:
    """Every file in ``folder`` (not below it) sorted into DICOM image series and the rest,
    each DICOM file's headers checked by :func:`_dicom_header` before anything else reads it;
    ScanError in one sentence for the first one whose headers cannot be trusted. This, not
    GDCM's own directory scan, finds the series: GDCM parses every file it is shown, a README
    included, and allocates whatever length its bytes happen to declare."""
    series: dict[str, list[_Slice]] = {}
    not_dicom, not_images = [], []
    budget = MAX_DICOM_ELEMENTS
    for path in sorted(child for child in folder.iterdir() if child.is_file()):
        try:
            header = _checked_dicom_file(path, budget)
        except OSError as error:
            raise ScanError(f"{folder.name}/ holds {path.name}, which cannot be read ({error.strerror or error}).") from None
        except _UnsafeDicom as error:
            raise ScanError(
                f"{folder.name}/ holds {path.name}, a DICOM file whose headers cannot be trusted ({error}); "
                "export the series again."
            ) from None
        except _TooManyElements:
            raise ScanError(
                f"{folder.name}/ holds more than {MAX_DICOM_ELEMENTS:,} DICOM header elements, "
                "far more than a series has; give one DICOM series."
            ) from None
        if header is None:
            not_dicom.append(path)
            continue
        budget -= header.elements
        if not header.has_pixels:
            not_images.append(path)
            continue
        uid = _text(header.values.get(SERIES_UID, b""))
        series.setdefault(uid, []).append(_slice(path, header.values))
    return _DicomFolder({uid: _slice_order(slices) for uid, slices in series.items()}, not_dicom, not_images)


def _checked_dicom_file(path: Path, max_elements: int) -> _DicomHeader | None:
    """:func:`_dicom_header` of the file at ``path``, mapped rather than read; None when it
    lacks the DICOM marker."""
    with path.open("rb") as file:
        if file.read(DICOM_PREFIX)[DICOM_PREAMBLE:] != DICOM_MARKER:
            return None
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _dicom_header(data, max_elements)


def _text(value: bytes) -> str:
    """A DICOM string as shown in a message: padding and characters that do not print dropped."""
    text = value.decode("latin-1").strip("\0 ")
    return "".join(character for character in text if character.isprintable())[:DICOM_TEXT]


def _numbers(value: bytes | None, count: int) -> np.ndarray | None:
    """A multi-valued decimal string of ``count`` finite numbers, else None."""
    if value is None:
        return None
    try:
        numbers = np.asarray([float(part) for part in _text(value).split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def _slice(path: Path, values: dict[int, bytes]) -> _Slice:
    number = _text(values.get(INSTANCE_NUMBER, b""))
    return _Slice(
        path,
        _text(values.get(SERIES_DESCRIPTION, b"")),
        _numbers(values.get(IMAGE_POSITION), 3),
        _numbers(values.get(IMAGE_ORIENTATION), 6),
        int(number) if number.lstrip("+-").isdigit() else None,
    )


def _slice_order(slices: list[_Slice]) -> list[_Slice]:
    """The order GDCM's series helper stacks slices in: along the normal of the first slice's
    orientation when every slice has a position and orientation, else by instance number; file
    name breaks ties. Missing, doubled and uneven slices are refused later, from the stack."""
    if all(item.position is not None and item.orientation is not None for item in slices):
        normal = np.cross(*slices[0].orientation.reshape(2, 3))
        return sorted(slices, key=lambda item: (float(normal @ item.position), item.number or 0, item.path.name))
    return sorted(slices, key=lambda item: (item.number is None, item.number or 0, item.path.name))


def _itk_reason(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unreadable").rstrip(".:")


def _read_dicom(folder: Path, channels: int) -> Scan:
    """One DICOM series in ``folder``, read with its geometry by SimpleITK's series reader from
    the files the pre-scan checked; files that are not DICOM images are passed over, and named
    in a warning."""
    import SimpleITK as sitk

    found = _dicom_folder(folder)
    if not found.series:
        raise ScanError(
            f"{folder.name}/ holds no DICOM series and no scans; give a folder of one DICOM series, "
            f"or scans ({', '.join(SUPPORTED_SUFFIXES)})."
        )
    misnamed = [path.name for path in found.not_dicom if named_as_dicom(path.name)]
    if misnamed:
        raise ScanError(
            f"{folder.name}/ holds {_counted(len(misnamed), 'file')} named as DICOM without the marker every "
            f"DICOM file has, damaged or not DICOM at all ({_listed(misnamed)}); export the series again."
        )
    if len(found.series) > 1:
        listed = _listed(
            [f"{_series_name(uid, slices)} ({len(slices)} files)" for uid, slices in found.series.items()], "; "
        )
        raise ScanError(f"{folder.name}/ holds {len(found.series)} DICOM series, give one per folder: {listed}.")
    (slices,) = found.series.values()
    _check_orientations(slices, folder)
    files = [str(item.path) for item in slices]
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
    scan = _scan_from_itk(image, folder, shape, dims)
    passed_over = sorted(path.name for path in found.not_dicom + found.not_images)
    if passed_over:
        what = "is not a DICOM image" if len(passed_over) == 1 else "are not DICOM images"
        scan.warnings.append(
            f"{folder.name}/: passed over {_counted(len(passed_over), 'file')} that {what} ({_listed(passed_over)})."
        )
    return scan


def named_as_dicom(name: str) -> bool:
    """Whether file name ``name`` says DICOM; macOS's "._" files, which carry the name of the
    file they describe, do not."""
    return name.lower().endswith(DICOM_SUFFIXES) and not name.startswith("._")


def _counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _listed(items: list[str], separator: str = ", ", shown: int = 5) -> str:
    """The first ``shown`` of ``items``, and how many more there are."""
    more = f"{separator}and {len(items) - shown:,} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def _series_name(uid: str, slices: list[_Slice]) -> str:
    description = slices[0].description
    named = uid or "without a series UID"
    return f"{description!r} {named}" if description else named


def _check_orientations(slices: list[_Slice], folder: Path) -> None:
    """Refuse slices of one series UID in different planes (a three-plane localiser, or series
    mixed under one UID): stacked into one volume they would mix anatomy."""
    orientations = np.asarray([item.orientation for item in slices if item.orientation is not None])
    if len(orientations) and np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise ScanError(
            f"{folder.name}/ has slices in different orientations under one series UID; "
            "give one series of parallel slices."
        )


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
    """Read a NIfTI, NRRD or MHA scan, or a folder or .zip holding one DICOM series (the zip
    through :mod:`segment.archives`); :class:`ScanError` with one sentence if it is unusable.

    ``channels`` is how many the model reads: 1 takes a 3D scan (or a 2D slice); more take a
    4D NIfTI whose 4th dimension holds exactly that many (the Decathlon's multi-modal tasks).
    Any other combination is refused, naming both counts. NRRD and MHA files with vector
    voxels, and 4D ones, are refused (their channels would need ITK's own geometry for 4D);
    DICOM series are single-channel."""
    path = Path(path)
    suffix = scan_suffix(path)
    if path.is_dir():
        scan = _read_dicom(path, channels)
    elif path.name.lower().endswith(ZIP_SUFFIX) and path.is_file():
        from segment.archives import read_zip_file  # which reads the unpacked folder with read_scan

        return read_zip_file(path, channels)
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

        def write_itk(named: Path) -> None:
            try:
                sitk.WriteImage(image, str(named), True)
            except RuntimeError:
                # Compressed, the file is no larger than the raw labels.
                raise_if_no_room(named.parent, labels.nbytes)
                raise

        write_atomically_as(path, suffix, write_itk)
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
