"""A zipped DICOM series: the real hippocampus_001 series unpacks, flat or nested, to the voxels
the folder gives; hostile, damaged and bomb archives are refused in one sentence naming the
upload, leaving the folder as it was and nothing beside it; the viewer's upload of a zip damaged
at random gives a scan or one sentence, and leaves no unpacked folder behind."""

from __future__ import annotations

import io
import stat
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment.app.uploads import read_upload

from segment import archives
from segment.archives import RATIO_FLOOR_BYTES, unpack_dicom_zip
from segment.io import ScanError, read_scan

CASE = "hippocampus_001"
NAME = "upload.zip"
write_series = load_script("nifti_to_dicom").write_series
CENTRAL = b"PK\x01\x02"  # a central directory entry: general purpose flags at +8, method +10, size +24


@pytest.fixture(scope="module")
def series(hippocampus_root, tmp_path_factory) -> Path:
    source = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"
    folder = tmp_path_factory.mktemp("dicom") / "series"
    return write_series(sitk.ReadImage(str(source)), folder, "1.2.826.0.1.3680043.2.1125.4")


@pytest.fixture
def folder(tmp_path) -> Path:
    """The private folder an upload unpacks into, below a parent nothing else may appear in."""
    folder = tmp_path / "parent" / "upload"
    folder.mkdir(parents=True)
    return folder


def zipped(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def series_files(series: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{path.name}": path.read_bytes() for path in sorted(series.iterdir())}


def patched(data: bytes, offset: int, fmt: str, value: int, entry: int = 0) -> bytes:
    """``data`` with one field of its ``entry``-th central directory record changed."""
    start = -1
    for _ in range(entry + 1):
        start = data.index(CENTRAL, start + 1)
    changed = bytearray(data)
    struct.pack_into(fmt, changed, start + offset, value)
    return bytes(changed)


def listing(path: Path) -> list[str]:
    return sorted(str(child.relative_to(path)) for child in path.rglob("*"))


def refused(data: bytes, folder: Path, message: str) -> str:
    """Unpack ``data``, expecting a refusal that starts with ``message``; the folder keeps only
    what it held and nothing appears beside it."""
    (folder / "mine.txt").write_text("held before")
    before, beside = listing(folder), listing(folder.parent)
    with pytest.raises(ScanError) as error:
        unpack_dicom_zip(data, folder, NAME)
    text = str(error.value)
    assert text.startswith(message), text
    assert text.endswith(".") and "\n" not in text and text.count("; ") == 1, text
    assert listing(folder) == before and listing(folder.parent) == beside
    assert (folder / "mine.txt").read_text() == "held before"
    return text


def test_a_zipped_series_reads_as_the_folder_does(series, folder):
    unpacked = unpack_dicom_zip(zipped(series_files(series)), folder, NAME)
    assert unpacked == folder
    assert sorted(path.name for path in folder.iterdir()) == [f"f{index:05d}.dcm" for index in range(35)]
    scan, reference = read_scan(unpacked), read_scan(series)
    np.testing.assert_array_equal(scan.array, reference.array)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-6)


def test_nested_folders_and_other_files_are_flattened_and_passed_over(series, folder):
    files = series_files(series, prefix="patient/study 1/series/") | {"patient/README.txt": b"notes"}
    with zipfile.ZipFile(io.BytesIO(zipped(files))) as archive:
        assert len(archive.namelist()) == 36
    scan = read_scan(unpack_dicom_zip(zipped(files), folder, NAME))
    np.testing.assert_array_equal(scan.array, read_scan(series).array)
    assert not [path for path in folder.iterdir() if path.is_dir()]


def test_a_blank_slice_compresses_well_but_is_not_a_bomb(folder):
    unpack_dicom_zip(zipped({"blank.dcm": bytes(512 * 512 * 2)}), folder, NAME)
    assert (folder / "f00000.dcm").stat().st_size == 512 * 512 * 2


@pytest.mark.parametrize("data", [b"", b"not a zip at all", zipped({"a.dcm": b"x" * 100})[:60]])
def test_junk_and_truncated_bytes_are_not_a_zip(data, folder):
    refused(data, folder, f"{NAME} is not a readable zip archive (")


def test_a_damaged_entry_fails_its_crc_and_what_was_written_is_removed(folder):
    data = bytearray(zipped({"a.dcm": b"first" * 100, "b.dcm": b"second" * 100}, zipfile.ZIP_STORED))
    data[data.index(b"second") + 7] ^= 0xFF
    assert "Bad CRC-32" in refused(bytes(data), folder, f"{NAME} is not a readable zip archive (")


def test_a_header_declaring_fewer_bytes_than_it_holds_is_refused(folder):
    data = zipped({"a.dcm": b"first" * 100, "b.dcm": bytes(range(256)) * 40})
    lying = patched(data, 24, "<I", 1000, entry=1)  # declares 1000 of its 10,240 bytes
    refused(lying, folder, f"{NAME} is not a readable zip archive (Bad CRC-32")


def test_more_bytes_than_declared_are_stopped_while_streaming(folder, monkeypatch):
    data = zipped({"a.dcm": b"x" * 10, "b.dcm": b"y" * 10})
    # A reader that trusted the data over the header (CPython's stops at the declared size).
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, entry: io.BytesIO(bytes(entry.file_size + 1)))
    refused(data, folder, f"{NAME} holds 'a.dcm', which unpacks to more than the 10 bytes it declares;")


@pytest.mark.parametrize(
    "entry", ["../evil.dcm", "series/../../evil.dcm", "/abs.dcm", "..\\evil.dcm", "C:/evil.dcm"]
)
def test_names_that_point_outside_are_refused(entry, folder):
    refused(
        zipped({"ok.dcm": b"x", entry: b"x"}),
        folder,
        f"{NAME} holds an entry named {entry!r} that points outside",
    )


def test_a_symlink_entry_is_refused(folder):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("series/slice.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    refused(buffer.getvalue(), folder, f"{NAME} holds a link or special file ('series/slice.dcm');")


def test_an_encrypted_entry_is_refused(folder):
    refused(patched(zipped({"a.dcm": b"x" * 100}), 8, "<H", 0x1), folder, f"{NAME} is encrypted ('a.dcm');")


def test_an_unknown_compression_method_is_refused(folder):
    deflate64 = patched(zipped({"a.dcm": b"x" * 100}), 10, "<H", 9)
    refused(deflate64, folder, f"{NAME} uses a compression method that cannot be read (")


def test_a_zip_bomb_is_refused_from_its_directory(folder):
    bomb = zipped({"a.dcm": b"x", "zeros.dcm": bytes(2 * RATIO_FLOOR_BYTES)})
    refused(bomb, folder, f"{NAME} holds 'zeros.dcm', compressed 1,0")


def test_too_many_entries_are_refused(folder, monkeypatch):
    monkeypatch.setattr(archives, "MAX_ENTRIES", 3)
    refused(
        zipped({f"{index}.dcm": b"x" for index in range(4)}),
        folder,
        f"{NAME} holds 4 entries, more than the 3 allowed;",
    )


def test_too_many_bytes_in_all_are_refused(folder, monkeypatch):
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 2 * 1024**2)
    files = {f"{index}.dcm": np.random.default_rng(index).bytes(1024**2) for index in range(3)}
    refused(zipped(files), folder, f"{NAME} unpacks to 3 MiB, more than the 0.00195312 GiB allowed;")


@pytest.mark.parametrize("files", [{}, {"series/": b""}])
def test_a_zip_without_files_is_refused(files, folder):
    refused(zipped(files), folder, f"{NAME} holds no files;")


ZIP_FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Where a zip's structures start: local file headers, central directory records, the end record.
SIGNATURES = (b"PK\x03\x04", CENTRAL, b"PK\x05\x06")


def zipped_entries(entries: list[tuple[str, bytes]]) -> bytes:
    """A zip of ``entries`` in order, a name given twice stored twice (as some zip tools do)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def damaged_zip(files: dict[str, bytes], choices) -> bytes:
    """The series zipped with entries dropped or stored twice, then bytes overwritten, mostly in
    the zip's headers and directory, and the archive perhaps cut short."""
    names = list(files)
    dropped = choices.draw(st.sets(st.sampled_from(names), max_size=3), label="dropped")
    twice = choices.draw(st.sets(st.sampled_from(names), max_size=3), label="stored twice")
    entries = [(name, files[name]) for name in names if name not in dropped]
    data = bytearray(zipped_entries(entries + [(name, files[name]) for name in sorted(twice)]))
    starts = [index for signature in SIGNATURES for index in _occurrences(bytes(data), signature)]
    for _ in range(choices.draw(st.integers(0, 3), label="patches")):
        anywhere = choices.draw(st.booleans(), label="in the data")
        start = choices.draw(st.sampled_from(starts), label="structure") + choices.draw(
            st.integers(0, 46), label="at"
        )
        if anywhere:
            start = choices.draw(st.integers(0, len(data) - 1), label="offset")
        patch = choices.draw(st.binary(min_size=1, max_size=8), label="bytes")
        data[start : start + len(patch)] = patch
    if choices.draw(st.booleans(), label="truncated"):
        data = data[: choices.draw(st.integers(0, len(data) - 1), label="length")]
    return bytes(data)


def _occurrences(data: bytes, signature: bytes) -> list[int]:
    found, start = [], data.find(signature)
    while start >= 0:
        found.append(start)
        start = data.find(signature, start + 1)
    return found


def unpacked_folders(temporary: Path) -> list[str]:
    return sorted(path.name for path in temporary.iterdir() if path.name.startswith("segment-upload-"))


@ZIP_FUZZ
@given(choices=st.data())
def test_a_damaged_zipped_series_upload_gives_a_scan_or_one_sentence(series, tmp_path, monkeypatch, choices):
    """read_upload on a zip of the real series damaged at random: a scan with usable geometry,
    or one ScanError sentence naming the upload; never an unpacked folder left behind."""
    # A temporary directory of this test's own, so that uploads other processes read at the same
    # time are not counted as left behind.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = damaged_zip(series_files(series), choices)
    try:
        scan = read_upload(NAME, data, "scan").scan
    except ScanError as error:
        message = str(error)
        assert message.endswith(".") and "\n" not in message and NAME in message, message
        assert "scan.zip" not in message, message  # our name for the upload never shows
    else:
        assert np.isfinite(scan.affine).all() and scan.array.ndim == 3
    assert unpacked_folders(tmp_path) == []
