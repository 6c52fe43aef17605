"""A zipped DICOM series: the real hippocampus_001 series unpacks, flat or nested, to the voxels
the folder gives; hostile, damaged and bomb archives are refused in one sentence naming the
upload, leaving the folder as it was and nothing beside it; files that are not DICOM images are
passed over and named, a broken file that claims to be DICOM and a second series are refused
naming them; tens of thousands of tiny entries are refused in bounded time and memory (printed
with -s); the viewer's upload of a zip damaged at random gives a scan or one sentence, and no
unpacked folder is ever left behind."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from segment.app.uploads import read_upload

from segment import archives
from segment.archives import RATIO_FLOOR_BYTES, read_dicom_zip, unpack_dicom_zip
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
    entries = unpack_dicom_zip(zipped(series_files(series)), folder, NAME)
    assert entries == {f"f{index:05d}.dcm": f"slice_{index:03d}.dcm" for index in range(35)}
    assert sorted(path.name for path in folder.iterdir()) == list(entries)
    scan, reference = read_scan(folder), read_scan(series)
    np.testing.assert_array_equal(scan.array, reference.array)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-6)
    assert scan.warnings == []


def test_nested_folders_are_flattened_and_a_file_not_named_as_dicom_keeps_no_suffix(series, folder):
    files = series_files(series, prefix="patient/study 1/series/") | {"patient/README.txt": b"notes"}
    entries = unpack_dicom_zip(zipped(files), folder, NAME)
    assert entries["f00000.dcm"] == "patient/study 1/series/slice_000.dcm"
    assert entries["f00035"] == "patient/README.txt"
    scan = read_scan(folder)
    np.testing.assert_array_equal(scan.array, read_scan(series).array)
    assert not [path for path in folder.iterdir() if path.is_dir()]
    assert scan.warnings == ["upload/: passed over 1 file that is not a DICOM image (f00035)."]


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


def with_symlink(files: dict[str, bytes]) -> bytes:
    """A zip of ``files`` and a symbolic link entry series/slice.dcm -> /etc/passwd."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("series/slice.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def test_a_symlink_entry_is_refused(folder):
    refused(with_symlink({}), folder, f"{NAME} holds a link or special file ('series/slice.dcm');")


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


@pytest.fixture
def private_temporary(tmp_path, monkeypatch) -> Path:
    """A temporary directory of this test's own, for the private folders a zip unpacks into
    (uploads other processes read at the same time are not counted as left behind)."""
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return temporary


def refused_in_private(data: bytes, private_temporary: Path) -> str:
    """read_dicom_zip's one-sentence refusal of ``data``; its private folder is gone."""
    with pytest.raises(ScanError) as error:
        read_dicom_zip(data, NAME)
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message and NAME in message, message
    assert "scan.zip" not in message and "f000" not in message, message  # our names never show
    assert list(private_temporary.iterdir()) == []
    return message


def dicom_without_pixels() -> bytes:
    """A DICOM file that is no image, as a DICOMDIR in an exported study is."""
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.FileSetID = "EXPORT"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_harmless_extras_are_passed_over_and_named(series, tmp_path, private_temporary):
    """A README, macOS's .DS_Store and __MACOSX/._ files, a thumbnail and a DICOMDIR beside the
    series: the scan is the folder's, and one warning names what was passed over."""
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "thumb.png"))
    extras = {
        "export/README.txt": b"Exported by the PACS",
        "export/.DS_Store": b"\0\0\0\1Bud1" + bytes(100),
        "__MACOSX/export/._slice_000.dcm": b"\0\5\x16\7\0\2\0\0Mac OS X        " + bytes(60),
        "export/thumb.png": (tmp_path / "thumb.png").read_bytes(),
        "DICOMDIR": dicom_without_pixels(),
    }
    scan = read_dicom_zip(zipped(series_files(series, prefix="export/") | extras), NAME)
    np.testing.assert_array_equal(scan.array, read_scan(series).array)
    assert scan.warnings == [
        f"{NAME}/: passed over 5 files that are not DICOM images ('export/README.txt', 'export/.DS_Store', "
        "'__MACOSX/export/._slice_000.dcm', 'export/thumb.png', 'DICOMDIR')."
    ]
    assert list(private_temporary.iterdir()) == []


HOSTILE_BESIDE_THE_SERIES = {
    "a ../ name": ({"../evil.dcm": b"x"}, f"{NAME} holds an entry named '../evil.dcm' that points outside"),
    "an absolute name": ({"/etc/evil.dcm": b"x"}, f"{NAME} holds an entry named '/etc/evil.dcm' that points outside"),
    "a zip bomb": ({"zeros.dcm": bytes(2 * RATIO_FLOOR_BYTES)}, f"{NAME} holds 'zeros.dcm', compressed 1,0"),
}


@pytest.mark.parametrize(("extra", "expected"), HOSTILE_BESIDE_THE_SERIES.values(), ids=HOSTILE_BESIDE_THE_SERIES)
def test_a_hostile_entry_beside_the_series_is_refused_and_nothing_is_left(series, private_temporary, extra, expected):
    assert refused_in_private(zipped(series_files(series) | extra), private_temporary).startswith(expected)


def test_a_symlink_beside_the_series_is_refused_and_nothing_is_left(series, private_temporary):
    message = refused_in_private(with_symlink(series_files(series)), private_temporary)
    assert message.startswith(f"{NAME} holds a link or special file ('series/slice.dcm');")


def test_a_file_named_as_dicom_that_is_not_is_refused_naming_it(series, private_temporary):
    files = series_files(series) | {"slice_035.dcm": b"\0" * 100}
    message = refused_in_private(zipped(files), private_temporary)
    assert message == (
        f"{NAME}/ holds 1 file named as DICOM without the marker every DICOM file has, damaged or not "
        "DICOM at all ('slice_035.dcm'); export the series again."
    )


def test_a_dicom_file_declaring_more_than_it_holds_is_refused_before_gdcm_reads_it(series, private_temporary):
    files = series_files(series)
    damaged = bytearray(files["slice_005.dcm"])
    modality = damaged.index(struct.pack("<HH", 0x0008, 0x0060), 132 + 200)
    struct.pack_into("<I", damaged, modality + 4, 0x7FFFFFF0)  # Modality's length: 2 GiB
    files["slice_005.dcm"] = bytes(damaged)
    message = refused_in_private(zipped(files), private_temporary)
    assert message == (
        f"{NAME}/ holds 'slice_005.dcm', a DICOM file whose headers cannot be trusted (element (0008,0060) "
        f"declares 2,147,483,632 bytes, but {len(damaged) - modality - 8:,} remain in the file); export the series again."
    )


def described_series(image: sitk.Image, folder: Path, uid: str, description: str) -> dict[str, bytes]:
    """The files of ``image`` written as series ``uid`` described as ``description``."""
    files = {}
    for path in sorted(write_series(image, folder, uid).iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = description
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        files[f"{description}/{path.name}"] = buffer.getvalue()
    return files


def test_two_series_are_refused_naming_both_never_mixed(hippocampus_root, tmp_path, private_temporary):
    image = sitk.ReadImage(str(hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"))
    first = described_series(image, tmp_path / "first", "1.2.826.0.1.3680043.2.1125.5", "T1 axial")
    second = described_series(image[:, :, :20], tmp_path / "second", "1.2.826.0.1.3680043.2.1125.6", "T1 repeat")
    message = refused_in_private(zipped(first | second), private_temporary)
    assert message == (
        f"{NAME}/ holds 2 DICOM series, give one per folder: 'T1 axial' 1.2.826.0.1.3680043.2.1125.5 "
        "(35 files); 'T1 repeat' 1.2.826.0.1.3680043.2.1125.6 (20 files)."
    )


# Run in a process of its own, so that its peak memory is the archive's alone: reads the zip at
# argv[1] as `segment predict --input` does, and prints the time, the peak memory and the
# outcome. The peak is Linux's VmHWM, this process image's own: getrusage's ru_maxrss would
# start from the memory of the pytest process that started it.
MEASURED_READ = """
import json, re, sys, time
from pathlib import Path
from segment.io import ScanError, read_scan

def peak_mib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

before = peak_mib()
start = time.perf_counter()
try:
    outcome = read_scan(Path(sys.argv[1])).warnings
except ScanError as error:
    outcome = str(error)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(), "growth_mib": peak_mib() - before, "outcome": outcome}))
"""


def measured_read(archive: Path, temporary: Path) -> dict:
    """MEASURED_READ of ``archive`` in a subprocess whose temporary directory is ``temporary``;
    printed (pytest -s) for the docs."""
    environment = os.environ | {"TMPDIR": str(temporary), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_READ, str(archive)],
        capture_output=True, text=True, timeout=300, env=environment, check=True,
    )
    measured = json.loads(result.stdout)
    print(
        f"\n{archive.name} ({archive.stat().st_size / 1024**2:.1f} MiB): {measured['seconds']:.2f} s, "
        f"peak {measured['peak_mib']:.0f} MiB ({measured['growth_mib']:.0f} MiB for the read)"
    )
    return measured


LINUX_MEMORY = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")


@LINUX_MEMORY
def test_tens_of_thousands_of_tiny_entries_are_refused_in_bounded_time_and_memory(tmp_path):
    archive = tmp_path / "tiny.zip"
    archive.write_bytes(zipped({f"tiny/{index:05d}.dcm": b"x" for index in range(30_000)}, zipfile.ZIP_STORED))
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    measured = measured_read(archive, temporary)
    assert measured["outcome"] == "tiny.zip holds 30,000 entries, more than the 5,000 allowed; zip one DICOM series."
    assert measured["seconds"] < 5 and measured["growth_mib"] < 100
    assert list(temporary.iterdir()) == [] and set(tmp_path.iterdir()) == {archive, temporary}


@LINUX_MEMORY
def test_a_series_among_thousands_of_tiny_extras_reads_in_bounded_time_and_memory(series, tmp_path):
    extras = {f"junk/{index:05d}.txt": b"x" for index in range(archives.MAX_ENTRIES - 36)}
    archive = tmp_path / "crowded.zip"
    archive.write_bytes(zipped(series_files(series) | extras))
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    measured = measured_read(archive, temporary)
    assert measured["outcome"] == [
        "crowded.zip/: passed over 4,964 files that are not DICOM images ('junk/00000.txt', 'junk/00001.txt', "
        "'junk/00002.txt', 'junk/00003.txt', 'junk/00004.txt', and 4,959 more)."
    ]
    assert measured["seconds"] < 60 and measured["growth_mib"] < 300
    assert list(temporary.iterdir()) == []


def test_read_scan_takes_the_path_of_a_zip_as_segment_predict_gives_it(series, tmp_path, private_temporary):
    archive = tmp_path / "My Series.zip"
    archive.write_bytes(zipped(series_files(series, prefix="series/")))
    scan = read_scan(archive)
    np.testing.assert_array_equal(scan.array, read_scan(series).array)
    np.testing.assert_allclose(scan.affine, read_scan(series).affine, atol=1e-6)
    archive.write_bytes(zipped({"../evil.dcm": b"x"}))
    with pytest.raises(ScanError, match=r"^My Series.zip holds an entry named '../evil.dcm' that points outside"):
        read_scan(archive)
    assert list(private_temporary.iterdir()) == [] and set(tmp_path.iterdir()) == {archive, private_temporary}


def test_a_zip_file_larger_than_a_series_may_unpack_to_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 1024**2)
    archive = tmp_path / "large.zip"
    archive.write_bytes(zipped({"a.dcm": np.random.default_rng(0).bytes(2 * 1024**2)}, zipfile.ZIP_STORED))
    with pytest.raises(ScanError, match=r"^large.zip is 2 MiB, more than the 1 MiB a zipped series may unpack to;"):
        read_scan(archive)


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
    return sorted(path.name for path in temporary.iterdir() if path.name.startswith("segment-"))


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
