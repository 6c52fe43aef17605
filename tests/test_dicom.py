"""DICOM in: a real hippocampus scan written out as a DICOM series gives, through `segment
predict`, the mask the NIfTI gives, voxel for voxel; folders that are not one series are refused
in one sentence."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from segment.cli import app
from segment.io import ScanError, read_scan

MODEL = "hippocampus_3d"
CASE = "hippocampus_001"


@pytest.fixture(scope="module")
def series(hippocampus_root, tmp_path_factory) -> tuple[Path, Path]:
    """The shared case as a DICOM series, and the same voxels as a NIfTI."""
    source = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"
    folder = tmp_path_factory.mktemp("dicom")
    return write_series(sitk.ReadImage(str(source)), folder / "series", "1.2.826.0.1.3680043.2.1125.2"), source


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
    from_nifti = runner.invoke(app, ["predict", "--model", MODEL, "-i", str(nifti), "-o", str(tmp_path / "n.nii.gz")])
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
    assert "1.2.826.0.1.3680043.2.1125.2 (35 files)" in message and "1.2.826.0.1.3680043.2.1125.3 (35 files)" in message


def test_a_series_with_a_missing_slice_is_refused_not_stacked_at_the_wrong_spacing(series, tmp_path):
    folder, _ = series
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    (gap / "slice_017.dcm").unlink()
    with pytest.raises(ScanError, match=r"^gap/ has missing or unevenly spaced slices \(gaps from 1 to 2 mm\)"):
        read_scan(gap)


def test_a_folder_of_files_that_are_not_dicom_is_refused_in_one_sentence(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "slice.dcm").write_bytes(b"\0" * 200)
    result = CliRunner().invoke(app, ["predict", "--model", MODEL, "-i", str(junk), "-o", str(tmp_path / "m.nii.gz")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: junk/ holds no DICOM series and no scans")
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_100_slice_series_reads_with_its_spacing(tmp_path):
    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 1000, (100, 256, 256), dtype=np.int16))
    volume.SetSpacing((0.9, 0.9, 2.0))
    folder = write_series(volume, tmp_path / "big", "1.2.826.0.1.3680043.2.1125.4")
    scan = read_scan(folder)
    assert scan.array.shape == (256, 256, 100)
    np.testing.assert_allclose(scan.spacing, (0.9, 0.9, 2.0), atol=1e-5)


DICOM_FUZZ = settings(
    max_examples=120,
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
        action = choices.draw(st.sampled_from(["keep", "keep", "overwrite", "truncate", "drop"]), label=f"slice {index}")
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
