"""The data scripts: ISBI 2012 PNG -> MSD NIfTI conversion on the real data, MSD fetching offline,
and a real hippocampus scan written as a DICOM series.

The conversion tests read the real ISBI 2012 slices from the shared data root. They compare
every converted voxel against the PNG read independently with Pillow. The fetch tests never
mock the network: the download test runs only when the download host is unreachable, and the
success path downloads a local tar through a ``file://`` URL.
"""

import hashlib
import json
import socket
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import load_script
from PIL import Image

from segment.data import msd
from segment.io import read_scan

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "data_scripts"
TASK = "Task04_Hippocampus"


isbi2012 = load_script("isbi2012_to_nifti")
fetch_msd = load_script("fetch_msd")
nifti_to_dicom = load_script("nifti_to_dicom")


def png(path: Path) -> np.ndarray:
    """A PNG as a (rows, columns) array, read with Pillow rather than the converter's SimpleITK."""
    with Image.open(path) as image:
        return np.asarray(image)


def voxels(path: Path) -> np.ndarray:
    """A NIfTI's stored voxels, in their stored dtype (no float conversion that could hide a change)."""
    return np.asanyarray(nib.load(path).dataobj)


def one_sentence(message: str) -> bool:
    return "\n" not in message.strip() and message.strip().endswith(".")


@pytest.fixture(scope="module")
def converted(isbi_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return isbi2012.convert(isbi_source, tmp_path_factory.mktemp("isbi") / "Task90_ISBI2012")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash, to prove a folder was left untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- ISBI 2012 conversion ------------------------------------------------------------------


def test_every_converted_case_equals_its_png_pixel_for_pixel(converted: Path, isbi_source: Path):
    dataset = json.loads((converted / "dataset.json").read_text())
    assert dataset["numTraining"] == len(dataset["training"]) == 30
    slice_numbers = []
    for case in dataset["training"]:
        image_path, label_path = converted / case["image"], converted / case["label"]
        assert image_path.is_file() and label_path.is_file()
        number = int(image_path.name.removesuffix(".nii.gz").split("_")[1])
        assert label_path.name == image_path.name
        slice_numbers.append(number)

        image, label = voxels(image_path), voxels(label_path)
        assert image.shape == label.shape == (512, 512, 1)
        assert image.dtype == label.dtype == np.uint8
        # No transpose or flip anywhere: NIfTI axis 0 is the PNG row, axis 1 the PNG column.
        np.testing.assert_array_equal(image.squeeze(), png(isbi_source / "train" / "image" / f"{number}.png"))
        source_label = png(isbi_source / "train" / "label" / f"{number}.png")
        np.testing.assert_array_equal(label.squeeze(), (source_label == 0).astype(np.uint8))

        for path in (image_path, label_path):
            header = nib.load(path).header
            np.testing.assert_allclose(header.get_zooms(), (0.004, 0.004, 0.05), rtol=1e-6)
            assert header.get_xyzt_units()[0] == "micron"
            np.testing.assert_allclose(nib.load(path).affine, np.diag([0.004, 0.004, 0.05, 1.0]), rtol=1e-6)
    assert sorted(slice_numbers) == list(range(30))


def test_dataset_json_is_msd_format_and_documents_the_spacing(converted: Path):
    dataset = json.loads((converted / "dataset.json").read_text())
    assert dataset["tensorImageSize"] == "3D"
    assert dataset["modality"] == {"0": "EM"}
    assert dataset["labels"] == {"0": "background", "1": "membrane"}
    assert dataset["licence"] == "ISBI 2012 challenge terms: non-commercial use, attribution"
    assert dataset["numTest"] == 0 and dataset["test"] == []
    assert dataset["spacing"] == [0.004, 0.004, 0.05]
    assert dataset["spacingUnit"] == "micrometre"
    assert "micrometre" in dataset["description"]
    assert all(
        c["image"].startswith("./imagesTr/") and c["label"].startswith("./labelsTr/")
        for c in dataset["training"]
    )
    # The images are stored in slice order, so case 0 is 0.png, not whatever sorts first as text.
    assert dataset["training"][10]["image"] == "./imagesTr/isbi2012_010.nii.gz"


def test_monai_loads_the_task_like_any_msd_task(converted: Path, isbi_source: Path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    cases = load_decathlon_datalist(converted / "dataset.json", data_list_key="training", base_dir=converted)
    loaded = LoadImaged(keys=["image", "label"])(cases[29])
    assert tuple(loaded["image"].shape) == (512, 512, 1)
    np.testing.assert_array_equal(
        loaded["image"].numpy().squeeze(), png(isbi_source / "train" / "image" / "29.png")
    )
    np.testing.assert_array_equal(
        loaded["label"].numpy().squeeze(), png(isbi_source / "train" / "label" / "29.png") == 0
    )
    np.testing.assert_allclose(loaded["image"].pixdim.numpy(), [0.004, 0.004, 0.05], rtol=1e-6)


def test_converting_twice_without_overwrite_fails_and_keeps_the_first_output(
    isbi_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    output = isbi2012.convert(isbi_source, tmp_path / "Task90_ISBI2012")
    before = snapshot(output)

    with pytest.raises(isbi2012.ConversionError, match="already exists; pass --overwrite") as error:
        isbi2012.convert(isbi_source, output)
    assert one_sentence(str(error.value))
    assert isbi2012.main(["--source", str(isbi_source), "--output", str(output)]) == 2
    stderr = capsys.readouterr().err
    assert one_sentence(stderr) and "--overwrite" in stderr
    assert snapshot(output) == before

    isbi2012.convert(isbi_source, output, overwrite=True)
    assert snapshot(output) == before  # same data gives byte-identical files
    # Neither the staging folder nor the retired old task is left next to the output.
    assert list(tmp_path.iterdir()) == [output]


def test_missing_source_exits_2_with_one_line_on_stderr(tmp_path: Path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "isbi2012_to_nifti.py"),
            "--source",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert one_sentence(result.stderr)
    assert str(tmp_path / "missing") in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_label_midway_leaves_no_partial_output(tmp_path: Path):
    source = tmp_path / "source"
    for sub in ("train/image", "train/label"):
        (source / sub).mkdir(parents=True)
    for number, label_values in enumerate([(0, 255), (0, 128)]):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(source / "train" / "image" / f"{number}.png")
        label = np.full((8, 8), label_values[1], np.uint8)
        label[:, 0] = label_values[0]
        Image.fromarray(label).save(source / "train" / "label" / f"{number}.png")

    with pytest.raises(isbi2012.ConversionError, match="128") as error:
        isbi2012.convert(source, tmp_path / "Task90_ISBI2012")
    assert one_sentence(str(error.value))
    # Slice 0 was already written when slice 1 failed; none of it may remain.
    assert list(tmp_path.iterdir()) == [source]


def test_a_read_only_output_folder_is_refused(isbi_source: Path, tmp_path: Path):
    # The shared data folders are read-only by mode bits only; as root, nothing else would stop a write.
    read_only = tmp_path / "shared"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(isbi2012.ConversionError, match="read-only"):
            isbi2012.convert(isbi_source, read_only / "not-yet" / "Task90_ISBI2012")
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


# ---- MSD fetch -----------------------------------------------------------------------------


def download_host_reachable(url: str) -> bool:
    """Whether a download of ``url`` could succeed from here, judged by a quick TCP connection."""
    if urllib.request.getproxies().get(urlparse(url).scheme):
        return True  # a proxy might reach the host even though a direct connection cannot
    try:
        with socket.create_connection((urlparse(url).hostname, 443), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("root_exists", [True, False], ids=["existing-root", "new-root"])
def test_offline_fetch_fails_in_one_sentence_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, root_exists: bool
):
    url = msd.TASKS[TASK]
    if download_host_reachable(url):
        pytest.skip(f"{urlparse(url).hostname} is reachable, so this would really download {TASK} (27 MB)")
    data_root = tmp_path if root_exists else tmp_path / "data"

    with pytest.raises(msd.FetchError) as error:
        msd.fetch_task(TASK, data_root)
    message = str(error.value)
    assert one_sentence(message)
    assert url in message and "by hand" in message and str(data_root) in message
    assert list(tmp_path.iterdir()) == []

    assert fetch_msd.main([TASK, "--data-root", str(data_root)]) == 2
    stderr = capsys.readouterr().err
    assert one_sentence(stderr) and url in stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_fails_listing_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(msd.FetchError) as error:
        msd.fetch_task("Task11_Kidney", tmp_path)
    assert one_sentence(str(error.value))
    assert all(name in str(error.value) for name in msd.TASKS)

    assert fetch_msd.main(["Task11_Kidney", "--data-root", str(tmp_path)]) == 2
    assert one_sentence(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_task_is_not_downloaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    (tmp_path / TASK).mkdir()
    (tmp_path / TASK / "dataset.json").write_text("{}")
    assert msd.fetch_task(TASK, tmp_path) == tmp_path / TASK

    monkeypatch.setenv("SEGMENT_DATA_ROOT", str(tmp_path))  # the default data root
    assert fetch_msd.main([TASK]) == 0
    assert "already" in capsys.readouterr().out


def test_a_task_folder_without_dataset_json_is_left_alone(tmp_path: Path):
    (tmp_path / TASK / "imagesTr").mkdir(parents=True)
    with pytest.raises(msd.FetchError, match=r"no dataset\.json"):
        msd.fetch_task(TASK, tmp_path)
    assert (tmp_path / TASK / "imagesTr").is_dir()


@pytest.fixture
def local_task_tar(tmp_path: Path) -> tuple[Path, str]:
    """A tiny MSD-shaped tar of a fake Task04 and its md5, served through a file:// URL."""
    task = tmp_path / "build" / TASK
    (task / "imagesTr").mkdir(parents=True)
    (task / "dataset.json").write_text('{"name": "fake"}')
    (task / "imagesTr" / "case.nii.gz").write_bytes(b"not really an image")
    tar = tmp_path / "served" / f"{TASK}.tar"
    tar.parent.mkdir()
    with tarfile.open(tar, "w") as archive:
        archive.add(task, arcname=TASK)
    return tar, hashlib.md5(tar.read_bytes()).hexdigest()


def test_fetch_verifies_extracts_and_renames_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_task_tar: tuple[Path, str]
):
    tar, md5 = local_task_tar
    monkeypatch.setitem(msd.TASKS, TASK, tar.as_uri())
    monkeypatch.setitem(msd.MD5, TASK, md5)
    data_root = tmp_path / "data"

    assert msd.fetch_task(TASK, data_root) == data_root / TASK
    assert json.loads((data_root / TASK / "dataset.json").read_text()) == {"name": "fake"}
    assert (data_root / TASK / "imagesTr" / "case.nii.gz").read_bytes() == b"not really an image"
    assert list(data_root.iterdir()) == [data_root / TASK]  # the tar and staging folder are gone


def test_a_checksum_mismatch_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_task_tar: tuple[Path, str]
):
    tar, _ = local_task_tar
    monkeypatch.setitem(msd.TASKS, TASK, tar.as_uri())
    monkeypatch.setitem(msd.MD5, TASK, "0" * 32)
    data_root = tmp_path / "data"

    with pytest.raises(msd.FetchError, match="md5") as error:
        msd.fetch_task(TASK, data_root)
    assert one_sentence(str(error.value))
    assert not data_root.exists()


# ---- NIfTI -> DICOM series -----------------------------------------------------------------


def write_dicom(*args: Path | str) -> subprocess.CompletedProcess:
    """``data_scripts/nifti_to_dicom.py ARGS`` run as a user runs it."""
    command = [sys.executable, str(SCRIPTS / "nifti_to_dicom.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_scan_written_as_dicom_reads_back_with_its_voxels_affine_and_one_frame_of_reference(
    hippocampus_root: Path, tmp_path: Path
):
    source = hippocampus_root / TASK / "imagesTr" / "hippocampus_001.nii.gz"
    result = write_dicom(source, tmp_path / "series")
    assert result.returncode == 0, result.stderr
    scan, reference = read_scan(tmp_path / "series"), read_scan(source)
    np.testing.assert_array_equal(scan.array, reference.array)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-4)

    files = sorted((tmp_path / "series").iterdir())
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    assert [header.InstanceNumber for header in headers] == list(range(1, reference.array.shape[2] + 1))
    for shared in ("FrameOfReferenceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality"):
        assert len({header.get(shared) for header in headers} - {None}) == 1, shared
    assert len({header.SOPInstanceUID for header in headers}) == len(headers)
    assert headers[0].Modality == "MR" and headers[0].SliceThickness == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "series"]  # no staging folder left beside it


def test_an_existing_output_folder_is_refused_in_one_sentence_and_left_untouched(
    hippocampus_root: Path, tmp_path: Path
):
    output = tmp_path / "series"
    output.mkdir()
    (output / "slice_000.dcm").write_bytes(b"held before")
    before = snapshot(output)
    result = write_dicom(hippocampus_root / TASK / "imagesTr" / "hippocampus_001.nii.gz", output)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert one_sentence(result.stderr) and result.stderr.startswith(f"Error: {output} already exists")
    assert snapshot(output) == before and list(tmp_path.iterdir()) == [output]


@pytest.mark.parametrize(
    ("voxels", "reason"),
    [(np.zeros((4, 5), np.int16), "2D image"), (np.full((4, 5, 3), 0.5, np.float32), "int16 cannot hold")],
    ids=["2d", "fractions"],
)
def test_a_scan_that_is_not_3d_or_not_int16_is_refused_in_one_sentence(
    voxels: np.ndarray, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), tmp_path / "scan.nii.gz")
    assert nifti_to_dicom.main([str(tmp_path / "scan.nii.gz"), str(tmp_path / "series")]) == 2
    stderr = capsys.readouterr().err
    assert one_sentence(stderr) and stderr.startswith("Error: ") and reason in stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "scan.nii.gz"]
