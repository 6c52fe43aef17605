"""DICOM in: a real hippocampus scan written out as a DICOM series gives, through `segment
predict`, the mask the NIfTI gives, voxel for voxel, from the folder or a zip of it; folders
that are not one series are refused in one sentence; every file's headers are checked before
GDCM parses it, so damaged ones cost no memory (peaks printed with -s). DICOM out: the mask as a
DICOM SEG whose frames, placed by their source images' geometry alone, hold the NIfTI mask's
labels voxel for voxel."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from segment import io as segment_io
from segment import workflows
from segment.cli import app
from segment.dicom_seg import write_segmentation
from segment.errors import InputError
from segment.io import ScanError, dicom_series, read_scan

MODEL = "hippocampus_3d"
CASE = "hippocampus_001"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.2"
write_series = load_script("nifti_to_dicom").write_series


@pytest.fixture(scope="module")
def series(hippocampus_root, tmp_path_factory) -> tuple[Path, Path]:
    """The shared case as a DICOM series, and the same voxels as a NIfTI."""
    source = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"
    folder = tmp_path_factory.mktemp("dicom")
    return write_series(sitk.ReadImage(str(source)), folder / "series", SERIES_UID), source


def test_a_dicom_series_reads_with_the_niftis_voxels_and_geometry(series):
    folder, nifti = series
    scan, reference = read_scan(folder), read_scan(nifti)
    # The scan is uint8, so int16 DICOM keeps every intensity.
    np.testing.assert_array_equal(scan.array, reference.array)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-4)


def test_predict_on_the_series_gives_the_niftis_mask_voxel_for_voxel(series, tmp_path):
    folder, nifti = series
    runner = CliRunner()
    from_dicom = runner.invoke(app, ["predict", "--model", MODEL, "-i", str(folder), "-o", str(tmp_path)])
    from_nifti = runner.invoke(
        app, ["predict", "--model", MODEL, "-i", str(nifti), "-o", str(tmp_path / "n.nii.gz")]
    )
    assert from_dicom.exit_code == 0 and from_nifti.exit_code == 0, from_dicom.output
    dicom_mask = nib.load(tmp_path / "series.nii.gz")
    nifti_mask = nib.load(tmp_path / "n.nii.gz")
    np.testing.assert_array_equal(np.asarray(dicom_mask.dataobj), np.asarray(nifti_mask.dataobj))
    np.testing.assert_allclose(dicom_mask.affine, nifti_mask.affine, atol=1e-4)


def test_a_folder_of_two_series_is_refused_listing_both(series, tmp_path):
    folder, nifti = series
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    write_series(sitk.ReadImage(str(nifti)), tmp_path / "other", "1.2.826.0.1.3680043.2.1125.3")
    for path in (tmp_path / "other").iterdir():
        shutil.copy(path, mixed / f"other_{path.name}")
    with pytest.raises(ScanError) as error:
        read_scan(mixed)
    message = str(error.value)
    assert message.startswith("mixed/ holds 2 DICOM series, give one per folder: ")
    assert (
        "1.2.826.0.1.3680043.2.1125.2 (35 files)" in message
        and "1.2.826.0.1.3680043.2.1125.3 (35 files)" in message
    )


def test_a_series_with_a_missing_slice_is_refused_not_stacked_at_the_wrong_spacing(series, tmp_path):
    folder, _ = series
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    (gap / "slice_017.dcm").unlink()
    with pytest.raises(
        ScanError, match=r"^gap/ has missing or unevenly spaced slices \(gaps from 1 to 2 mm\)"
    ):
        read_scan(gap)


def test_a_folder_of_files_that_are_not_dicom_is_refused_in_one_sentence(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "slice.dcm").write_bytes(b"\0" * 200)
    result = CliRunner().invoke(
        app, ["predict", "--model", MODEL, "-i", str(junk), "-o", str(tmp_path / "m.nii.gz")]
    )
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1].startswith("Error: junk/ holds no DICOM series and no scans")
    )
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_100_slice_series_reads_with_its_spacing(tmp_path):
    volume = sitk.GetImageFromArray(
        np.random.default_rng(0).integers(0, 1000, (100, 256, 256), dtype=np.int16)
    )
    volume.SetSpacing((0.9, 0.9, 2.0))
    folder = write_series(volume, tmp_path / "big", "1.2.826.0.1.3680043.2.1125.4")
    scan = read_scan(folder)
    assert scan.array.shape == (256, 256, 100)
    np.testing.assert_allclose(scan.spacing, (0.9, 0.9, 2.0), atol=1e-5)


def test_predict_on_a_zip_of_the_series_gives_the_folders_mask(series, tmp_path, monkeypatch):
    folder, _ = series
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"export/{path.name}")
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    runner = CliRunner()
    from_zip = runner.invoke(
        app, ["predict", "--model", MODEL, "-i", str(archive), "-o", str(tmp_path / "z.nii.gz")]
    )
    # Into a folder: a NIfTI mask named after the archive.
    masks = tmp_path / "masks"
    masks.mkdir()
    into_folder = runner.invoke(app, ["predict", "--model", MODEL, "-i", str(archive), "-o", str(masks)])
    assert into_folder.exit_code == 0, into_folder.output
    from_folder = runner.invoke(
        app, ["predict", "--model", MODEL, "-i", str(folder), "-o", str(tmp_path / "f.nii.gz")]
    )
    assert from_zip.exit_code == 0 and from_folder.exit_code == 0, from_zip.output
    zip_mask, folder_mask = nib.load(tmp_path / "z.nii.gz"), nib.load(tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(np.asarray(zip_mask.dataobj), np.asarray(folder_mask.dataobj))
    np.testing.assert_array_equal(
        np.asarray(nib.load(masks / "series.nii.gz").dataobj), np.asarray(zip_mask.dataobj)
    )
    np.testing.assert_allclose(zip_mask.affine, folder_mask.affine, atol=1e-6)
    assert list(temporary.iterdir()) == []  # the unpacked series is gone


def test_slices_are_stacked_in_gdcms_order_whatever_their_file_names(series, tmp_path):
    """The pre-scan, not GDCM, lists the series now; it orders the slices as GDCM's series
    helper does, which the DICOM SEG writer relies on."""
    folder, _ = series
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(folder.iterdir())
    for path, index in zip(files, np.random.default_rng(0).permutation(len(files)), strict=True):
        shutil.copy(path, shuffled / f"image_{index:03d}.dcm")
    gdcm_order = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(shuffled)))
    assert dicom_series(shuffled) == [(SERIES_UID, gdcm_order)]
    assert gdcm_order != sorted(gdcm_order)
    np.testing.assert_array_equal(read_scan(shuffled).array, read_scan(folder).array)


def edited_copy(folder: Path, target: Path, index: int, edit) -> Path:
    """``folder`` copied to ``target`` with ``edit`` applied to its ``index``-th file's dataset."""
    shutil.copytree(folder, target)
    path = sorted(target.iterdir())[index]
    dataset = pydicom.dcmread(path)
    edit(dataset)
    dataset.save_as(path)
    return path


def test_a_length_running_past_its_item_is_refused_naming_the_element(series, tmp_path):
    folder, _ = series
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.9"
    path = edited_copy(
        folder, tmp_path / "nested", 3, lambda dataset: setattr(dataset, "ReferencedImageSequence", [item])
    )
    assert read_scan(path.parent).array.shape == (35, 51, 35)  # a sequence is fine
    content = bytearray(path.read_bytes())
    uid = content.index(struct.pack("<HH", 0x0008, 0x1155))
    struct.pack_into("<I", content, uid + 4, 4096)  # past its item, not past the file
    path.write_bytes(bytes(content))
    with pytest.raises(ScanError) as error:
        read_scan(path.parent)
    assert str(error.value) == (
        "nested/ holds slice_003.dcm, a DICOM file whose headers cannot be trusted (element (0008,1155) "
        "declares 4,096 bytes, but 28 remain in the item holding it); export the series again."
    )


def test_a_deflated_file_is_refused_as_its_headers_cannot_be_checked(series, tmp_path):
    folder, _ = series

    def deflate(dataset):
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian

    edited_copy(folder, tmp_path / "deflated", 0, deflate)
    with pytest.raises(
        ScanError,
        match=r"^deflated/ holds slice_000.dcm, a DICOM file whose headers cannot be trusted "
        r"\(they are deflated, and cannot be checked before GDCM inflates them\)",
    ):
        read_scan(tmp_path / "deflated")


def test_slices_of_one_uid_in_different_planes_are_refused_not_mixed(series, tmp_path):
    folder, _ = series
    edited_copy(
        folder,
        tmp_path / "localiser",
        17,
        lambda dataset: setattr(dataset, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
    )
    with pytest.raises(ScanError) as error:
        read_scan(tmp_path / "localiser")
    assert str(error.value) == (
        "localiser/ has slices in different orientations under one series UID; give one series of parallel slices."
    )


def test_a_folder_declaring_millions_of_header_elements_is_refused(series, monkeypatch):
    """Each header costs the pre-scan about 3 microseconds and GDCM more; the cap keeps a folder
    of 1 GiB of empty elements from taking minutes (the series holds 35 slices of 44 here)."""
    folder, _ = series
    monkeypatch.setattr(segment_io, "MAX_DICOM_ELEMENTS", 1000)
    with pytest.raises(ScanError) as error:
        read_scan(folder)
    assert str(error.value) == (
        "series/ holds more than 1,000 DICOM header elements, far more than a series has; give one DICOM series."
    )


# In a process of its own: reads the folder at argv[1] and prints the outcome and its peak memory,
# Linux's VmHWM (getrusage's ru_maxrss would start from the pytest process's memory).
MEASURED_READ = """
import json, re, sys
from pathlib import Path
from segment.io import ScanError, read_scan

def peak_mib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

try:
    outcome = read_scan(Path(sys.argv[1])).warnings
except ScanError as error:
    outcome = str(error)
print(json.dumps({"peak_mib": peak_mib(), "outcome": outcome}))
"""
# An implicit VR element header declaring 2 GiB: GDCM allocated that (2.1 GB seen) for a
# 108-byte file of no DICOM at all.
GDCM_BAIT = struct.pack("<HHI", 0x0008, 0x0016, 0x7FFFFFF0) + b"1.2.3" * 20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")
def test_gdcm_never_parses_a_file_whose_headers_declare_gigabytes(series, tmp_path):
    """Beside the series, a file that is no DICOM and a DICOM slice each declaring a 2 GiB
    element: the first is passed over and named, the second refused naming it, and the reading
    process peaks at what reading the series alone takes."""
    folder, _ = series
    bait = tmp_path / "bait"
    shutil.copytree(folder, bait)
    (bait / "notes.txt").write_bytes(GDCM_BAIT)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    slice_ = damaged / "slice_005.dcm"
    content = bytearray(slice_.read_bytes())
    struct.pack_into(
        "<I", content, content.index(struct.pack("<HH", 0x0008, 0x0060), 132 + 200) + 4, 0x7FFFFFF0
    )
    slice_.write_bytes(bytes(content))
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    peaks = {}
    for case in (folder, bait, damaged):
        result = subprocess.run(
            [sys.executable, "-c", MEASURED_READ, str(case)],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
            check=True,
        )
        measured = json.loads(result.stdout)
        peaks[case.name] = measured["peak_mib"]
        print(f"\n{case.name}: peak {measured['peak_mib']:.0f} MiB: {measured['outcome']}")
        if case == bait:
            assert measured["outcome"] == ["bait/: passed over 1 file that is not a DICOM image (notes.txt)."]
        if case == damaged:
            assert measured["outcome"].startswith(
                "damaged/ holds slice_005.dcm, a DICOM file whose headers cannot be trusted (element (0008,0060) "
                "declares 2,147,483,632 bytes"
            )
    assert max(peaks.values()) < peaks[folder.name] + 50, peaks


DICOM_FUZZ = settings(
    # Every file's headers are checked before GDCM parses it (GDCM allocates what a damaged
    # element length declares: peaks of 2.5-10 GB were seen here before): memory stays flat.
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@DICOM_FUZZ
@given(choices=st.data())
def test_read_scan_survives_damaged_dicom_files(series, tmp_path_factory, choices):
    """Bytes of some slices overwritten (their headers mostly), slices cut short or dropped:
    a scan with usable geometry comes back, or one ScanError sentence; nothing else."""
    folder, _ = series
    damaged = tmp_path_factory.mktemp("damaged")
    files = sorted(folder.iterdir())
    for index, path in enumerate(files):
        content = bytearray(path.read_bytes())
        action = choices.draw(
            st.sampled_from(["keep", "keep", "overwrite", "truncate", "drop"]), label=f"slice {index}"
        )
        if action == "drop":
            continue
        if action == "overwrite":
            start = choices.draw(st.integers(0, min(len(content), 1200) - 1), label="at")
            patch = choices.draw(st.binary(min_size=1, max_size=32), label="bytes")
            content[start : start + len(patch)] = patch
        if action == "truncate":
            content = content[: choices.draw(st.integers(0, len(content) - 1), label="length")]
        (damaged / path.name).write_bytes(bytes(content))
    try:
        scan = read_scan(damaged)
    except ScanError as error:
        message = str(error)
        assert message.endswith(".") and "\n" not in message
        return
    assert np.isfinite(scan.affine).all() and scan.array.ndim == 3


def _labels_under_pixels(source: pydicom.Dataset, mask: nib.Nifti1Image) -> tuple[np.ndarray, int]:
    """The NIfTI mask's labels under each pixel of DICOM image ``source``, found from the two
    files' geometry alone (pixel -> patient LPS -> RAS -> NIfTI voxel), and the mask slice."""
    row_step, column_step = (float(step) for step in source.PixelSpacing)
    along_row, along_column = np.reshape(np.asarray(source.ImageOrientationPatient, dtype=float), (2, 3))
    rows, columns = np.mgrid[: source.Rows, : source.Columns]
    lps = (
        np.asarray(source.ImagePositionPatient, dtype=float)
        + columns[..., None] * column_step * along_row
        + rows[..., None] * row_step * along_column
    )
    index = nib.affines.apply_affine(np.linalg.inv(mask.affine), lps * [-1, -1, 1])
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    i, j, k = np.round(index).astype(int).transpose(2, 0, 1)
    assert (index > -0.5).all() and (np.round(index) < mask.shape).all()
    assert len(np.unique(k)) == 1
    return np.asarray(mask.dataobj)[i, j, k], int(k[0, 0])


def test_predict_writes_a_dicom_seg_whose_segments_are_the_niftis_mask_voxel_for_voxel(series, tmp_path):
    folder, nifti = series
    result = CliRunner().invoke(
        app,
        ["predict", "--model", MODEL, "-i", str(folder), "-o", str(tmp_path), "--output-format", "dicom-seg"],
    )
    assert result.exit_code == 0, result.output
    workflows.predict(MODEL, nifti, tmp_path / "n.nii.gz", progress=False)
    mask = nib.load(tmp_path / "n.nii.gz")
    label_names = {
        int(value): name for value, name in json.loads((tmp_path / "n.labels.json").read_text()).items()
    }
    written = tmp_path / "series.seg.dcm"
    assert result.output.startswith(f"{written}: ")

    dataset = pydicom.dcmread(written)
    assert dataset.Modality == "SEG" and dataset.SegmentationType == "BINARY"
    assert [item.SeriesInstanceUID for item in dataset.ReferencedSeriesSequence] == [SERIES_UID]
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]
    assert dataset.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    segments = dataset.SegmentSequence
    assert [item.SegmentLabel for item in segments] == [label_names[1], label_names[2]]
    assert {item.SegmentAlgorithmType for item in segments} == {"AUTOMATIC"}
    assert {item.SegmentAlgorithmName for item in segments} == {"segment"}
    assert {item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for item in segments} == {"Tissue"}

    seg = hd.seg.segread(written)
    frames = seg.get_pixels_by_source_instance([source.SOPInstanceUID for source in sources])
    seen = set()
    for source, pixels in zip(sources, frames, strict=True):
        expected, slice_ = _labels_under_pixels(source, mask)
        seen.add(slice_)
        for channel, value in enumerate((1, 2)):  # segments 1 and 2 are labels 1 and 2
            np.testing.assert_array_equal(pixels[..., channel], expected == value)
    assert seen == set(range(mask.shape[2]))
    assert all((np.asarray(mask.dataobj) == value).sum() > 1000 for value in (1, 2))


def test_a_nifti_input_is_refused_for_a_dicom_seg_in_one_sentence(series, tmp_path):
    _, nifti = series
    output = tmp_path / "mask.dcm"
    result = CliRunner().invoke(
        app,
        ["predict", "--model", MODEL, "-i", str(nifti), "-o", str(output), "--output-format", "dicom-seg"],
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: {nifti.name} is not a folder of one DICOM series, and a DICOM SEG can only reference "
        "DICOM images; give the series folder, or --output-format nifti."
    )
    assert not any(tmp_path.iterdir())


def test_a_dicom_seg_goes_to_a_dcm_file_outside_the_series_folder(series, tmp_path):
    folder, _ = series
    with pytest.raises(
        InputError, match=r"^mask.nii.gz: a DICOM SEG is a .dcm file; give a file name ending in .dcm"
    ):
        workflows.predict(MODEL, folder, tmp_path / "mask.nii.gz", output_format="dicom-seg")
    with pytest.raises(InputError, match="is inside the series folder it segments"):
        workflows.predict(MODEL, folder, folder, output_format="dicom-seg")


def test_one_voxel_lands_on_its_source_frame_and_pixel_and_an_empty_label_keeps_its_segment(series, tmp_path):
    """Without a model: one voxel of label 1 at an (X, Y, Z) of unequal coordinates comes back
    at row Y, column X of the frame whose source image is file Z; label 2, with no voxels, is
    described and has no frames."""
    folder, _ = series
    scan = read_scan(folder)
    mask = np.zeros(scan.array.shape, dtype=np.uint8)
    mask[7, 30, 21] = 1
    written = write_segmentation(
        mask, scan, tmp_path / "one.dcm", {0: "background", 1: "one", 2: "none"}, model="m"
    )
    seg = hd.seg.segread(written)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["one", "none"]
    assert seg.NumberOfFrames == 1
    source = pydicom.dcmread(sorted(folder.iterdir())[21], stop_before_pixels=True)
    assert source.InstanceNumber == 22
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)[0]
    assert np.argwhere(pixels[..., 0]).tolist() == [[30, 7]] and not pixels[..., 1].any()


def test_a_series_without_a_frame_of_reference_is_refused_in_one_sentence(series, tmp_path):
    folder, _ = series
    stripped = tmp_path / "series"
    stripped.mkdir()
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(stripped / path.name)
    scan = read_scan(stripped)
    output = tmp_path / "out"
    output.mkdir()
    with pytest.raises(ScanError) as error:
        write_segmentation(
            np.zeros(scan.array.shape, np.uint8), scan, output / "s.dcm", {0: "bg", 1: "a"}, model="m"
        )
    message = str(error.value)
    assert message.startswith("series/ cannot be referenced by a DICOM SEG (")
    assert message.endswith("); export the series with complete headers, or write NIfTI.")
    assert "Frame Of Reference" in message and "\n" not in message
    assert not any(output.iterdir())


def test_highdicom_is_imported_only_to_write_a_seg():
    """Training and NIfTI prediction never pay for, or depend on, the DICOM SEG writer."""
    modules = "segment.cli, segment.workflows, segment.training.loop"
    code = f"import sys, {modules}; print('highdicom' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True, timeout=120).strip() == "False"


def test_a_slice_whose_header_declares_another_size_is_refused_before_reading(series, tmp_path):
    folder, _ = series
    damaged = tmp_path / "sizes"
    shutil.copytree(folder, damaged)
    slice_ = sorted(damaged.iterdir())[5]
    dataset = pydicom.dcmread(slice_)
    dataset.Rows = 30000  # a damaged header: the series reader would allocate 30000 rows for every slice
    dataset.save_as(slice_)
    with pytest.raises(ScanError, match=r"^sizes/ has slices of different sizes \("):
        read_scan(damaged)
