"""A zipped DICOM series, from the viewer's upload or ``segment predict --input series.zip``,
unpacked safely and read.

:func:`read_dicom_zip` unpacks into a private temporary folder, which is removed whatever
happens, reads the series there with :func:`segment.io.read_scan`, and rewrites its messages to
name the archive and its entries as the user knows them.

Every regular file in the archive is written straight into that folder under a name chosen here
(``f00000.dcm``, ``f00001``, ... in archive order; ``.dcm`` kept only where the entry's name
says DICOM, so that a broken one is refused rather than passed over), whatever folders the
archive nests it in; no name from inside the archive is ever joined to a path. The folder then
holds the series flat, as :func:`segment.io.read_scan` reads it: files that are not DICOM
images, such as a README, a thumbnail or macOS's ``__MACOSX/._*`` and ``.DS_Store`` files, are
passed over there and named in a warning.

An archive is refused with one :class:`~segment.io.ScanError` sentence naming the upload when
it is not a readable zip, when any entry is hostile (an absolute name, a ``..`` component, a
link or other special file), encrypted, or a zip bomb (too many entries, too many bytes in all,
or compressed too well), and when it holds no files. The entries are counted before the archive
is opened, and the rest is checked from its central directory before anything is written. Since
declared sizes can lie, each entry is also streamed in chunks and stopped as soon as it gives
more bytes than it declared (damaged data fails its CRC check while streaming); after such a
refusal the files written so far are removed, so the folder holds only what it held before.
"""

from __future__ import annotations

import io
import lzma
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

from segment.io import Scan, ScanError, named_as_dicom, read_scan

# Our name for the unpacked folder, which messages about the series name; they are rewritten
# to name the archive, and our file names in it to name the entries.
UNPACKED = "scan.zip"
OUR_NAMES = re.compile(rf"{re.escape(UNPACKED)}|\bf\d{{5}}(?:\.dcm)?\b")
SHOWN_CHARACTERS = 80  # of a name chosen by whoever made the archive

# A thin-slice CT series has a few thousand slices; ten thousand would be several series.
MAX_ENTRIES = 5_000
# Every central directory record starts with this; zipfile parses them all into objects when it
# opens an archive (a 500 MB upload can hold millions: gigabytes of memory), so they are counted
# in the bytes first. Compressed data holds it by chance about once per 4 GiB.
RECORD_SIGNATURE = b"PK\x01\x02"
# About twice the viewer's 500 MB upload cap: DICOM compresses about two to one, and MAX_VOXELS of
# int16 is 1 GiB.
MAX_UNPACKED_BYTES = 1024**3
# Deflate reaches about 1000:1 only on runs of one byte; real DICOM slices stay far below 200:1.
MAX_RATIO = 200
# ... except a blank 512 x 512 slice (512 KiB of zeros), which is legitimate: the ratio is only
# held against entries larger than any single slice (1024 x 1024 int16 is 2 MiB).
RATIO_FLOOR_BYTES = 4 * 1024**2
CHUNK_BYTES = 1024**2
# What a damaged archive raises while its directory and entries are read: zipfile's own error,
# the decompressors' (bzip2's OSError is turned into BadZipFile in _chunks, so that a failing
# disk is not blamed on the upload), a truncated stream, a negative seek from a damaged offset
# and an entry name that is not the UTF-8 it claims (both ValueError).
DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError)


def read_dicom_zip(data: bytes, name: str, channels: int = 1) -> Scan:
    """The one DICOM series in zip archive ``data``, unpacked into a private temporary folder
    that is removed whatever happens. ``name`` is what the archive was called (shown in
    messages, never used as a path); :class:`ScanError`, naming it and its entries, when the
    archive is unsafe or holds no usable series."""
    with tempfile.TemporaryDirectory(prefix="segment-zip-") as temporary:
        folder = Path(temporary) / UNPACKED
        folder.mkdir()
        entries = unpack_dicom_zip(data, folder, name)
        try:
            scan = read_scan(folder, channels)
        except ScanError as error:
            raise ScanError(_archived_names(str(error), name, entries)) from None
    scan.warnings[:] = [_archived_names(warning, name, entries) for warning in scan.warnings]
    return scan


def read_zip_file(path: Path, channels: int = 1) -> Scan:
    """:func:`read_dicom_zip` of the file at ``path``, refused unread if it is larger than its
    series may be."""
    size = path.stat().st_size
    if size > MAX_UNPACKED_BYTES:
        raise ScanError(
            f"{path.name} is {size / 1024**2:,.0f} MiB, more than the {MAX_UNPACKED_BYTES / 1024**2:,.0f} MiB "
            "a zipped series may unpack to; zip one DICOM series."
        )
    return read_dicom_zip(path.read_bytes(), path.name, channels)


def _archived_names(message: str, name: str, entries: dict[str, str]) -> str:
    """``message`` naming the archive ``name`` and its entries instead of our folder and files,
    in one pass: an entry's name may look like one of ours."""

    def archived(match: re.Match[str]) -> str:
        ours = match.group(0)
        if ours == UNPACKED:
            return name
        return repr(entries[ours][:SHOWN_CHARACTERS]) if ours in entries else ours

    return OUR_NAMES.sub(archived, message)


def unpack_dicom_zip(data: bytes, folder: Path, name: str) -> dict[str, str]:
    """Write the files of the zip archive ``data`` into the existing ``folder`` under names
    chosen here, and return each one's name in the archive by the name it was written under;
    :class:`ScanError` naming ``name`` if the archive is unreadable or unsafe, with ``folder``
    left as it was."""
    records = data.count(RECORD_SIGNATURE)
    if records > MAX_ENTRIES:
        raise ScanError(
            f"{name} holds {records:,} entries, more than the {MAX_ENTRIES:,} allowed; zip one DICOM series."
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _extract(archive, _checked_files(archive.infolist(), name), folder, name)
    except DAMAGED as error:
        reason = " ".join(str(error).split())[:200]
        raise ScanError(
            f"{name} is not a readable zip archive ({reason}); upload one DICOM series zipped again."
        ) from None
    except NotImplementedError as error:
        raise ScanError(
            f"{name} uses a compression method that cannot be read ({error}); "
            "zip it again with the standard one."
        ) from None


def _checked_files(entries: list[zipfile.ZipInfo], name: str) -> list[zipfile.ZipInfo]:
    """The file entries of the central directory (at most MAX_ENTRIES entries in all, counted
    before), refused in one sentence if any entry is hostile, encrypted or a bomb, or if there
    are none."""
    for entry in entries:
        _check_entry(entry, name)
    total = sum(entry.file_size for entry in entries)
    if total > MAX_UNPACKED_BYTES:
        raise ScanError(
            f"{name} unpacks to {total / 1024**2:,.0f} MiB, more than the "
            f"{MAX_UNPACKED_BYTES / 1024**3:g} GiB allowed; zip one DICOM series."
        )
    files = [entry for entry in entries if not entry.is_dir()]
    if not files:
        raise ScanError(f"{name} holds no files; zip the files of one DICOM series.")
    return files


def _check_entry(entry: zipfile.ZipInfo, name: str) -> None:
    shown = repr(entry.filename[:SHOWN_CHARACTERS])  # an attacker chooses it: shown short and quoted
    if _escapes(entry.filename):
        raise ScanError(
            f"{name} holds an entry named {shown} that points outside the archive; it was refused as unsafe."
        )
    if stat.S_IFMT(entry.external_attr >> 16) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ScanError(f"{name} holds a link or special file ({shown}); zip the series' files themselves.")
    if entry.flag_bits & 0x1:
        raise ScanError(f"{name} is encrypted ({shown}); zip the series without a password.")
    if entry.file_size > RATIO_FLOOR_BYTES and entry.file_size > MAX_RATIO * max(entry.compress_size, 1):
        raise ScanError(
            f"{name} holds {shown}, compressed {entry.file_size / max(entry.compress_size, 1):,.0f} to 1, "
            "as only a zip bomb or a damaged archive is; it was refused."
        )


def _escapes(filename: str) -> bool:
    """An absolute name, a Windows drive, or a ``..`` component, with either slash."""
    parts = re.split(r"[\\/]", filename)
    return filename.startswith(("/", "\\")) or ".." in parts or bool(PureWindowsPath(filename).drive)


def _extract(
    archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], folder: Path, name: str
) -> dict[str, str]:
    """Each of ``files`` into ``folder`` as ``f{index:05d}.dcm`` (or without the suffix where
    its name does not say DICOM), returning the entries' names by ours; on any failure the files
    written so far are removed again."""
    written: dict[str, str] = {}
    try:
        for index, entry in enumerate(files):
            suffix = ".dcm" if named_as_dicom(re.split(r"[\\/]", entry.filename)[-1]) else ""
            target = folder / f"f{index:05d}{suffix}"
            # "x": never overwrite, nor later remove, a file the folder already held.
            with target.open("xb") as sink:
                written[target.name] = entry.filename
                _copy(archive, entry, sink, name)
    except BaseException:
        for ours in written:
            (folder / ours).unlink(missing_ok=True)
        raise
    return written


def _copy(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, sink: BinaryIO, name: str) -> None:
    """Stream ``entry`` into ``sink``, stopping at the first chunk beyond its declared size
    (the declared sizes were checked against MAX_UNPACKED_BYTES, so this also holds the total).
    CPython's reader stops at the declared size as well, and then fails the CRC check; this does
    not rely on that."""
    copied = 0
    with archive.open(entry) as source:
        for chunk in _chunks(source):
            copied += len(chunk)
            if copied > entry.file_size:
                raise ScanError(
                    f"{name} holds {entry.filename[:SHOWN_CHARACTERS]!r}, which unpacks to more than the "
                    f"{entry.file_size:,} bytes it declares; it was refused as damaged or hostile."
                )
            sink.write(chunk)


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    while True:
        try:
            chunk = source.read(CHUNK_BYTES)
        except OSError as error:  # the archive is in memory: only bzip2's "Invalid data stream"
            raise zipfile.BadZipFile(str(error)) from None
        if not chunk:
            return
        yield chunk
