"""The Streamlit viewer driven headless (AppTest) with a real hippocampus scan and model."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, load_script, segment_command, set_args, tiny_hippocampus_overrides
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

VIEWER = str(ROOT / "app" / "viewer.py")
CASE = "hippocampus_001"


@pytest.fixture
def case_bytes(hippocampus_root) -> tuple[bytes, bytes]:
    task = hippocampus_root / "Task04_Hippocampus"
    return (task / "imagesTr" / f"{CASE}.nii.gz").read_bytes(), (
        task / "labelsTr" / f"{CASE}.nii.gz"
    ).read_bytes()


@pytest.fixture
def media(monkeypatch) -> dict[str, bytes]:
    """Every file the page hands to the browser (pictures, downloads), by its URL's file id."""
    served: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def recording(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        served[file_id] = self._files_by_id[file_id].content
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    return served


@pytest.fixture
def viewer(tmp_path, monkeypatch) -> AppTest:
    # An empty MLflow store of its own: the picker then lists the bundled models only.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return AppTest.from_file(VIEWER, default_timeout=180).run()


def upload(app: AppTest, key: str, name: str, data: bytes) -> AppTest:
    return app.file_uploader(key=key).set_value((name, data, "application/gzip")).run()


def served(media: dict[str, bytes], url: str) -> bytes:
    return media[url.rsplit("/", 1)[-1].split(".")[0]]


def metrics(app: AppTest) -> pd.DataFrame:
    return app.dataframe[0].value


def test_upload_shows_the_mask_and_switching_a_skip_changes_picture_and_numbers(viewer, case_bytes, media):
    scan, truth = case_bytes
    assert "Upload a NIfTI scan to begin." in [info.value for info in viewer.info]
    app = upload(viewer, "scan", "case.nii.gz", scan)
    assert not app.exception and not app.error
    assert [image.captions[0] for image in app.image] == ["axial", "coronal", "sagittal"]
    before = [image.value[0] for image in app.image]
    table = metrics(app)
    assert list(table["label"]) == ["Anterior", "Posterior"]
    assert (table["volume (mL)"] > 0.5).all()
    assert (table["Dice vs all skips on"] == 1.0).all()

    app = upload(app, "truth", "labels.nii.gz", truth)
    assert (metrics(app)["dice vs truth (all on)"] > 0.8).all()

    app = app.toggle(key="skip_0").set_value(False).run()
    assert not app.exception
    table = metrics(app)
    assert (table["Dice vs all skips on"] < 1.0).all()
    assert (table["change vs all skips on (mL)"] != 0).any()
    assert (table["dice vs truth (now)"] != table["dice vs truth (all on)"]).any()
    after = [image.value[0] for image in app.image]
    assert len(after) == 6, "the lost-detail row appears once a skip is off"
    assert after[:3] != before, "the mask pictures change"
    lost_picture = np.asarray(Image.open(io.BytesIO(served(media, after[3]))))
    assert (lost_picture[..., 0].astype(int) - lost_picture[..., 2] > 100).any(), (
        "lost voxels are drawn in red"
    )


def test_the_mask_download_is_a_nifti_with_the_scans_geometry(viewer, case_bytes, media):
    scan, _ = case_bytes
    app = upload(viewer, "scan", "case.nii.gz", scan)
    buttons = {button.proto.label: button.proto.url for button in app.get("download_button")}
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(served(media, buttons["Download mask (NIfTI)"])))
    original = nib.Nifti1Image.from_bytes(gzip.decompress(scan))
    assert mask.shape == original.shape
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}
    table = pd.read_csv(io.BytesIO(served(media, buttons["Download volumes and metrics (CSV)"])))
    assert list(table["label"]) == ["Anterior", "Posterior"]


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("notes.txt.gz", b"hello", "is not a NIfTI file"),
        ("broken.nii.gz", b"\x1f\x8b\x08\x00not really gzip", "is not a readable NIfTI file"),
        ("empty.nii", b"", "is empty"),
        ("empty.nii.gz", b"", "is empty"),
        ("picture.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(8), "is not a readable NIfTI file"),
        (
            "volumes.nii",
            nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)).to_bytes(),
            "4 dimensions",
        ),
        # A header declaring 60000^3 float32 voxels (864 TB), made without allocating them.
        (
            "bomb.nii",
            nib.Nifti2Image(np.broadcast_to(np.float32(0), (60000,) * 3), np.eye(4)).header.binaryblock
            + bytes(4),
            "more than the 536,870,912 allowed",
        ),
        (
            "slice.nii",
            nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(8, 8), np.eye(4)).to_bytes(),
            "slice.nii is a 2D image but hippocampus_3d is a 3D model",
        ),
    ],
)
def test_unusable_uploads_give_an_error_and_the_app_keeps_working(viewer, case_bytes, name, data, expected):
    app = upload(viewer, "scan", name, data)
    assert not app.exception
    assert any(expected in error.value for error in app.error)
    app = upload(app, "scan", "case.nii.gz", case_bytes[0])
    assert not app.error
    assert list(metrics(app)["label"]) == ["Anterior", "Posterior"]


def test_a_ground_truth_of_another_scan_is_refused(viewer, case_bytes, hippocampus_root):
    other = sorted((hippocampus_root / "Task04_Hippocampus" / "labelsTr").glob("*.nii.gz"))[5].read_bytes()
    app = upload(viewer, "scan", "case.nii.gz", case_bytes[0])
    app = upload(app, "truth", "other.nii.gz", other)
    assert any("differs from the scan's" in error.value for error in app.error)
    assert "dice vs truth (now)" not in metrics(app).columns


def test_a_ground_truth_with_labels_the_model_does_not_know_is_refused(viewer, case_bytes):
    truth = nib.Nifti1Image.from_bytes(gzip.decompress(case_bytes[1]))
    binary = (np.asarray(truth.dataobj) > 0).astype(np.uint8) * 255  # a 0/255 mask, as image tools save
    foreign = gzip.compress(nib.Nifti1Image(binary, truth.affine).to_bytes())
    app = upload(viewer, "scan", "case.nii.gz", case_bytes[0])
    app = upload(app, "truth", "mask.nii.gz", foreign)
    assert not app.exception
    assert any("holds label values 0..255 but the model knows 0..2" in error.value for error in app.error)
    assert "dice vs truth (now)" not in metrics(app).columns


def test_an_upload_named_like_a_path_is_segmented_and_its_name_never_used_as_one(
    viewer, case_bytes, tmp_path
):
    name = "../../evil dir/x;rm -rf.nii.gz"
    app = upload(viewer, "scan", name, case_bytes[0])
    assert not app.exception and not app.error
    assert list(metrics(app)["label"]) == ["Anterior", "Posterior"]
    # Used as a path, the name would land two folders above the viewer's working folder
    # (tmp_path), the app's folder, or a temporary folder.
    for base in (tmp_path, ROOT / "app", ROOT, Path(tempfile.gettempdir()) / "upload"):
        assert not (base / "../../evil dir").exists()
    for folder in (tmp_path, tmp_path.parent, ROOT, ROOT / "app", Path(tempfile.gettempdir())):
        assert not [path for path in folder.iterdir() if "evil" in path.name or "rm -rf" in path.name]


@pytest.fixture
def store_with_a_model_trained_without_level_2(tmp_path, hippocampus_root) -> str:
    """An MLflow store holding a small real model trained with long skip 2 removed."""
    uri = f"sqlite:///{tmp_path / 'trained.db'}"
    overrides = [
        *tiny_hippocampus_overrides(),
        "model.levels=5",
        "model.base_channels=2",
        "model.skips=[1,0,1,1]",
        "model.skip_dropout=0",
        "name=hippocampus_3d_skips1011",
    ]
    trained = subprocess.run(
        segment_command("train", "--config", str(ROOT / "configs/hippocampus_3d.yaml"), "--quiet", *set_args(overrides)),
        cwd=tmp_path,
        env=os.environ | {"SEGMENT_DATA_ROOT": str(hippocampus_root), "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    return uri


def test_a_switched_off_skip_can_be_set_beside_a_model_trained_without_it(
    tmp_path, monkeypatch, case_bytes, store_with_a_model_trained_without_level_2
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_with_a_model_trained_without_level_2)
    monkeypatch.chdir(tmp_path)
    app = upload(AppTest.from_file(VIEWER, default_timeout=180).run(), "scan", "case.nii.gz", case_bytes[0])
    assert app.selectbox(key="model").value == "hippocampus_3d (bundled)"
    assert not [box for box in app.checkbox if box.key == "side_by_side"], "no peer while all skips are on"

    app = app.toggle(key="skip_0").set_value(False).run()
    assert not [box for box in app.checkbox if box.key == "side_by_side"], "no model lacks level 1 only"
    app = app.toggle(key="skip_0").set_value(True).run()
    app = app.toggle(key="skip_1").set_value(False).run()
    offer = app.checkbox(key="side_by_side")
    assert "hippocampus_3d_skips1011" in offer.label

    app = offer.check().run()
    assert not app.exception and not app.error
    captions = [image.captions[0] for image in app.image]
    assert captions[3:6] == ["axial: trained without", "coronal: trained without", "sagittal: trained without"]
    app = upload(app, "truth", "labels.nii.gz", case_bytes[1])
    table = metrics(app)
    assert table["Dice, switched off vs trained without"].between(0, 1).all()
    assert table["volume, trained without (mL)"].ge(0).all()
    assert "dice vs truth (trained without)" in table.columns


def test_an_em_slice_is_measured_in_its_own_micrometres(viewer, isbi_source, tmp_path):
    """The bundled EM model on a real ISBI slice converted as the task is: sizes, volumes and the
    NSD tolerance are in micrometres, where 1 mm would cover the whole slice."""
    isbi2012 = load_script("isbi2012_to_nifti")
    [(_, image_png, label_png), *_] = isbi2012.find_pairs(isbi_source)
    image = isbi2012.read_png(image_png)
    isbi2012.save_slice(image, tmp_path / "slice.nii.gz")
    isbi2012.save_slice(isbi2012.membrane_label(label_png, image.shape), tmp_path / "membranes.nii.gz")

    app = viewer.selectbox(key="model").set_value("isbi2012_2d (bundled)").run()
    app = upload(app, "scan", "slice.nii.gz", (tmp_path / "slice.nii.gz").read_bytes())
    app = upload(app, "truth", "membranes.nii.gz", (tmp_path / "membranes.nii.gz").read_bytes())
    assert not app.exception and not app.error
    assert app.toggle(key="skip_0").label.endswith("full resolution, 0.004 µm")
    assert app.toggle(key="skip_1").label.endswith("1/2 resolution, 0.008 µm"), "pooled within the slice only"
    table = metrics(app)
    assert 0.7 < table["dice vs truth (all on)"][0] <= 1.0
    assert table["volume (µm³)"][0] > 0
    assert 0.5 < table["nsd vs truth (all on)"][0] < 0.999, "a tolerance of two pixels, not of the whole slice"
    assert "NSD with a tolerance of 0.008 µm" in " ".join(caption.value for caption in app.caption)
