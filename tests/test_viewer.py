"""The Streamlit viewer: what its page shows, computed without Streamlit (segment.app.page_state
and the page module's shape), then the page driven headless (AppTest) with a real hippocampus
scan and model."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import tomllib
from conftest import ROOT, load_script, segment_command, set_args, tiny_hippocampus_overrides
from conftest import data_root as hippocampus_data_root
from PIL import Image
from scipy import ndimage
from segment.app.metrics_table import (
    PeerMask,
    against_all_on,
    distance_caption,
    mask_nifti,
    metrics_table,
    table_csv,
)
from segment.app.page_state import (
    NO_COMPARISON,
    Notice,
    Slot,
    compare_choices,
    default_preset,
    incomparable,
    level_labels,
    mask_summary,
    mask_text,
    model_choices,
    peer_for,
    preset_window,
    skip_key,
    skip_switches,
    train_without_hint,
    training_notice,
    visible_planes,
    window_presets,
)
from segment.app.rendering import AUTO_PRESET, HEAT_COLOURS, compose, hex_colour, label_colour, rgb_colour
from segment.app.uploads import EXAMPLE_CASE, Upload, digest, example_upload, read_upload, upload_names
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from segment.config import ExperimentConfig, load_config
from segment.data.tasks import split_task
from segment.engine.metrics import CaseScores
from segment.engine.skip_explorer import MaskChange, SkipExplorer
from segment.io import Scan, ScanError, read_scan
from segment.models import UNet, UNetEnsemble
from segment.models.sources import bundled_members
from segment.tracking.runs import RegisteredModel
from segment.workflows import load
from segment.workflows.viewer import STREAMLIT_SETTINGS

write_series = load_script("nifti_to_dicom").write_series
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


# --- what the page shows, without Streamlit -----------------------------------------------------


def hippocampus_config(**model) -> ExperimentConfig:
    config = load_config(ROOT / "configs" / "hippocampus_3d.yaml")
    return config.model_copy(update={"model": config.model.model_copy(update=model)})


def flat_scan(shape=(8, 9, 10), spacing=(1.0, 1.0, 1.0), unit: str | None = None) -> Scan:
    affine = np.diag([*spacing, 1.0])
    header = None
    if unit is not None:
        header = nib.Nifti1Header()
        header.set_xyzt_units(unit)
    return Scan(np.zeros(shape, np.float32), affine, Path("scan.nii.gz"), nifti_header=header)


def registered(name: str, long_skips, task="Task04_Hippocampus", dims=3, dice=0.85) -> RegisteredModel:
    return RegisteredModel(name, f"models:/{name}@best", 2, task, dice, dims, long_skips)


@pytest.mark.slow
def test_the_page_module_runs_nothing_on_import_and_the_state_needs_no_streamlit():
    """Only imports, constants, definitions and the `__main__` guard at module level (Streamlit
    and AppTest run the script as __main__); page_state and rendering never import Streamlit."""
    for module in ("viewer.py", "page_state.py", "metrics_table.py", "rendering.py", "uploads.py"):
        tree = ast.parse((ROOT / "app" / module).read_text())
        for statement in tree.body:
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                continue  # the docstring
            if isinstance(statement, ast.Assign | ast.AnnAssign):
                calls = [node for node in ast.walk(statement.value) if isinstance(node, ast.Call)]
                assert all(ast.unparse(call.func) == "TypeVar" for call in calls), ast.unparse(statement)
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                assert all(target.id.isupper() for target in targets), f"{module}: {ast.unparse(statement)}"
                continue
            if isinstance(statement, ast.If):
                assert ast.unparse(statement) == "if __name__ == '__main__':\n    main()", module
                assert module == "viewer.py"
                continue
            assert isinstance(statement, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef), (
                f"{module}: {ast.unparse(statement)[:80]}"
            )
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, segment.app.page_state, segment.app.metrics_table, segment.app.rendering, segment.app.uploads\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'streamlit'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_levels_are_counted_from_1_in_labels_and_widget_keys():
    config, scan = hippocampus_config(), flat_scan(spacing=(1.0, 1.0, 1.0))
    switches = skip_switches(config, scan, (True, False, True, True))
    assert [(s.level, s.key, s.on) for s in switches] == [
        (1, "skip_level_1", True),
        (2, "skip_level_2", False),
        (3, "skip_level_3", True),
        (4, "skip_level_4", True),
    ]
    assert [s.label for s in switches] == [
        "level 1 - full resolution, 1 mm",
        "level 2 - 1/2 resolution, 2 mm",
        "level 3 - 1/4 resolution, 4 mm",
        "level 4 - 1/8 resolution, 8 mm",
    ]
    assert skip_key(1) == "skip_level_1"
    with pytest.raises(ValueError, match="counted from 1"):
        skip_key(0)
    with pytest.raises(ValueError, match="skip mask of 3"):
        skip_switches(config, scan, (True, True, True))


def test_level_labels_follow_anisotropic_spacing_the_unit_and_2d_pooling():
    config = hippocampus_config()
    anisotropic = level_labels(config, flat_scan(spacing=(0.5, 0.5, 2.0)))
    assert anisotropic[1] == "level 2 - 1/2 resolution, 1 x 1 x 4 mm"
    em = load_config(ROOT / "segment" / "pretrained" / "isbi2012_2d" / "config.yaml")
    labels = level_labels(em, flat_scan((64, 64, 1), spacing=(0.004, 0.004, 0.05), unit="micron"))
    assert labels[:2] == ["level 1 - full resolution, 0.004 µm", "level 2 - 1/2 resolution, 0.008 µm"]


def test_model_choices_list_bundled_models_their_members_then_registered_ones():
    choices = model_choices(
        ["hippocampus_3d", "isbi2012_2d"],
        [registered("hippo_skips1011", (1, 0, 1, 1))],
        ["hippocampus_3d/member_1"],
    )
    assert choices == {
        "hippocampus_3d (bundled)": "hippocampus_3d",
        "isbi2012_2d (bundled)": "isbi2012_2d",
        "hippocampus_3d/member_1 (bundled ensemble member)": "hippocampus_3d/member_1",
        "hippo_skips1011 v2 (Task04_Hippocampus, val Dice 0.850)": "models:/hippo_skips1011@best",
    }
    assert model_choices([], []) == {}
    assert compare_choices(choices, "isbi2012_2d (bundled)") == [
        NO_COMPARISON,
        "hippocampus_3d (bundled)",
        "hippocampus_3d/member_1 (bundled ensemble member)",
        "hippo_skips1011 v2 (Task04_Hippocampus, val Dice 0.850)",
    ]


def test_a_bundled_ensembles_members_load_as_models_of_their_own():
    assert sorted(bundled_members()) == [f"hippocampus_3d/member_{k}" for k in (1, 2, 3)]
    member, ensemble = load("hippocampus_3d/member_2", device="cpu"), load("hippocampus_3d", device="cpu")
    assert isinstance(member.network, UNet) and isinstance(ensemble.network, UNetEnsemble)
    assert incomparable(member.config, ensemble.config) is None
    em = load("isbi2012_2d", device="cpu")
    assert incomparable(ensemble.config, em.config) == (
        f"{em.config.name} labels 1 membrane, not 1 Anterior, 2 Posterior as {ensemble.config.name} does; "
        "compare two models of one task."
    )


def test_the_training_notice_says_what_a_switched_off_skip_means():
    assert training_notice(hippocampus_config(long_skips=(1, 0, 1, 1))).kind == "info"
    dropout = training_notice(hippocampus_config(skip_dropout=(0.0, 0.2, 0.1, 0.0)))
    assert dropout == Notice(
        "success",
        "Trained with skip dropout 0.2: switching skips off stays close to what it saw in training.",
    )
    plain = training_notice(hippocampus_config(skip_dropout=0.0, long_skips=None))
    assert plain.kind == "warning" and "exaggerates what the skip carries" in plain.text


def test_the_peer_is_a_registered_model_of_the_task_built_with_exactly_the_skips_left_on():
    config = hippocampus_config(long_skips=None)
    built = (True, True, True, True)
    models = [
        registered("other_task", (1, 0, 1, 1), task="Task02_Heart"),
        registered("flat", (1, 0, 1, 1), dims=2),
        registered("all_on", (1, 1, 1, 1)),
        registered("without_2", (1, 0, 1, 1)),
    ]
    assert peer_for(models, config, built, built) is None, "nothing to compare while no skip is off"
    assert peer_for(models, config, (True, False, True, True), built).name == "without_2"
    assert peer_for(models, config, (False, True, True, True), built) is None
    assert train_without_hint((False, True, True, True)) == (
        "No registered model was trained without these skips; train one with "
        "`--set model.long_skips=[0,1,1,1] model.skip_dropout=0`."
    )


def test_an_upload_is_read_under_our_name_and_errors_name_the_upload(tmp_path):
    image = nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    data = gzip.compress(image.to_bytes())
    name = "../../evil dir/x;rm -rf.nii.gz"
    upload = read_upload(name, data, "scan")
    assert upload.name == name and upload.scan.path.name == "scan.nii.gz"
    assert upload.digest == digest(data) == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(upload.scan.array, np.asarray(image.dataobj))
    with pytest.raises(
        ScanError,
        match=r"The labels 'notes.txt' is not a supported file; upload .nii.gz, .nii, .nrrd, .mha\.$",
    ):
        read_upload("notes.txt", data, "labels")
    with pytest.raises(ScanError, match=r"^empty\.NII: .*|^empty\.NII is empty"):
        read_upload("empty.NII", b"", "scan")


def test_nrrd_mha_and_a_zipped_dicom_series_upload_as_the_nifti_does(hippocampus_root, tmp_path):
    source = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"
    reference = read_upload("case.nii.gz", source.read_bytes(), "scan").scan
    image = sitk.ReadImage(str(source))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"case{suffix}"), True)
        upload = read_upload(f"My Case{suffix.upper()}", (tmp_path / f"case{suffix}").read_bytes(), "scan")
        np.testing.assert_array_equal(upload.scan.array, reference.array)
        np.testing.assert_allclose(upload.scan.affine, reference.affine, atol=1e-4)
    series = write_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(series.iterdir()):
            zipped.write(path, f"exported/{path.name}")
    upload = read_upload("study.zip", archive.getvalue(), "scan")
    np.testing.assert_array_equal(upload.scan.array, reference.array)
    np.testing.assert_allclose(upload.scan.affine, reference.affine, atol=1e-4)
    with pytest.raises(ScanError, match=r"^The labels 'study.zip' is not a supported file; "):
        read_upload("study.zip", archive.getvalue(), "labels")
    with pytest.raises(ScanError) as refused:
        read_upload("junk.zip", b"PK not really a zip", "scan")
    assert "junk.zip" in str(refused.value) and "scan.zip" not in str(refused.value)


def test_a_zip_of_two_series_or_of_no_dicom_files_is_refused_in_one_sentence_naming_it(tmp_path):
    volume = sitk.GetImageFromArray(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8))
    uids = ("1.2.826.0.1.3680043.2.1125.11", "1.2.826.0.1.3680043.2.1125.12")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for uid in uids:
            for path in sorted(write_series(volume, tmp_path / uid, uid).iterdir()):
                zipped.write(path, f"{uid}/{path.name}")
        zipped.writestr("README.txt", "two series")
    with pytest.raises(ScanError) as two:
        read_upload("Two Series.zip", archive.getvalue(), "scan")
    message = str(two.value)
    assert message.startswith("Two Series.zip/ holds 2 DICOM series, give one per folder: "), message
    assert all(f"{uid} (4 files)" in message for uid in uids)
    assert "\n" not in message and message.endswith(".")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("notes.txt", "not an image")
        zipped.writestr("slice.dcm", bytes(200))
    with pytest.raises(ScanError) as junk:
        read_upload("notes.zip", archive.getvalue(), "scan")
    message = str(junk.value)
    assert message.startswith("notes.zip/ holds no DICOM series"), message
    assert "\n" not in message and message.endswith(".")


def test_the_upload_limit_is_the_same_in_the_docs_the_repositorys_settings_and_segment_app():
    documented = re.search(r"capped at \*\*(\d+) MB\*\* per file", (ROOT / "docs" / "viewer.md").read_text())
    settings = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]["maxUploadSize"]
    assert int(documented.group(1)) == settings == int(STREAMLIT_SETTINGS["server.maxUploadSize"])


def test_the_example_is_a_bundled_validation_case_with_its_licence():
    name, scan = example_upload("scan")
    labels_name, labels = example_upload("labels")
    assert (name, labels_name) == (f"{EXAMPLE_CASE}.nii.gz", f"{EXAMPLE_CASE}_labels.nii.gz")
    image, truth = read_upload(name, scan, "scan").scan, read_upload(labels_name, labels, "labels").scan
    assert image.array.shape == truth.array.shape and set(np.unique(truth.array)) == {0, 1, 2}
    readme = (ROOT / "segment" / "examples" / EXAMPLE_CASE / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Medical Segmentation Decathlon" in readme
    for member in (1, 2, 3):
        config = load_config(
            ROOT / "segment" / "pretrained" / "hippocampus_3d" / f"member_{member}" / "config.yaml"
        )
        split = split_task(config.data, hippocampus_data_root(), download=False)
        assert f"{EXAMPLE_CASE}.nii.gz" in {Path(case["image"]).name for case in split.val}, (
            "never trained on"
        )


def test_pictures_take_the_users_colours_hide_labels_and_blend_a_heat_map():
    grey = np.full((4, 4), 100, np.uint8)
    labels = np.zeros((4, 4), np.int64)
    labels[0, 0], labels[1, 1] = 1, 2
    picture = compose(grey, labels, 1.0, True, colours={1: (0, 255, 0)}, hidden=frozenset({2}))
    assert tuple(picture[0, 0]) == (0, 255, 0), "the chosen colour, fully opaque"
    assert tuple(picture[1, 1]) == (100, 100, 100), "a hidden label is not drawn"
    heat = np.zeros((4, 4), np.float32)
    heat[2, 2], heat[3, 3] = 0.25, 1.0
    picture = compose(grey, None, 0.5, True, heat=heat)
    assert tuple(picture[0, 0]) == (100, 100, 100), "certain voxels stay grey"
    hottest = np.asarray(HEAT_COLOURS(1.0))[:3] * 255
    np.testing.assert_allclose(picture[3, 3], hottest, atol=1, err_msg="opaque from HEAT_FULL")
    assert tuple(picture[2, 2]) not in ((100, 100, 100), tuple(picture[3, 3])), "half-way blended"
    assert rgb_colour(hex_colour((1, 128, 255))) == (1, 128, 255)
    legend = mask_summary((True,), NAMES, {1: (0, 255, 0)}, frozenset({2}))
    assert "rgb(0, 255, 0)'>&#9632;</span> Anterior" in legend and "Posterior" not in legend


def test_upload_names_replace_our_names_in_one_pass():
    scan = Upload("myscan.nii.gz", "1", flat_scan())  # its name holds our name for the scan
    labels = Upload("labels of scan.nii.gz", "2", replace(flat_scan(), path=Path("labels.nii.gz")))
    message = "labels.nii.gz: the label's shape differs; check that it is the labelling of scan.nii.gz."
    assert upload_names(message, labels, scan) == (
        "labels of scan.nii.gz: the label's shape differs; check that it is the labelling of myscan.nii.gz."
    )
    assert upload_names(message, None) == message


def test_a_slot_keeps_one_value_per_key_and_survives_a_failed_build():
    slot, builds = Slot(), []

    def build(value):
        builds.append(value)
        return value

    assert slot.get("a", lambda: build(1)) == 1
    assert slot.get("a", lambda: build(2)) == 1, "same key: not rebuilt"
    assert slot.get("b", lambda: build(3)) == 3
    with pytest.raises(ScanError):
        slot.get("c", lambda: (_ for _ in ()).throw(ScanError("unusable")))
    assert slot.get("b", lambda: build(4)) == 3, "a failed build keeps what was there"
    assert builds == [1, 3]


def test_display_choices():
    assert window_presets()[0] == AUTO_PRESET and "CT lung" in window_presets()
    assert default_preset(hippocampus_config()) == 0
    ct = load_config(ROOT / "configs" / "hippocampus_3d.yaml")
    ct = ct.model_copy(update={"data": ct.data.model_copy(update={"modality": "ct"})})
    assert window_presets()[default_preset(ct)] == "CT soft tissue"
    assert preset_window("CT lung", (5.0, 10.0)) == (-600.0, 1500.0)
    assert preset_window(AUTO_PRESET, (5.0, 10.0)) == (5.0, 10.0)
    assert visible_planes((30, 40, 20)) == ["axial", "coronal", "sagittal"]
    assert visible_planes((64, 64, 1)) == ["axial"], "one 2D slice: one picture"
    assert visible_planes((1, 1, 1)) == ["axial", "coronal", "sagittal"]


def test_the_mask_summary_gives_the_skip_mask_and_each_labels_colour():
    summary = mask_summary((True, False, True, True), {0: "background", 1: "Anterior", 2: "Posterior"})
    assert summary.startswith("**Mask** (skips 1011): ")
    assert summary.count("&#9632;") == 2 and "background" not in summary
    assert f"rgb{label_colour(2)}'>&#9632;</span> Posterior" in summary
    assert mask_text((False, True)) == "01"


NAMES = {0: "background", 1: "Anterior", 2: "Posterior"}


def test_the_metrics_table_from_fixed_results():
    scan = flat_scan(spacing=(1.0, 2.0, 1.0))  # 2 mm³ voxels
    mask = np.zeros(scan.array.shape, np.int64)
    mask[0, 0, :5], mask[1, 0, :3] = 1, 2
    change = MaskChange(
        mask > 0, mask > 0, {"Anterior": -0.002, "Posterior": 0.00012345}, {"Anterior": 0.5, "Posterior": 1.0}
    )
    table = metrics_table(NAMES, scan, mask, change)
    assert table.to_dict("list") == {
        "label": ["Anterior", "Posterior"],
        "volume (mL)": [0.01, 0.006],
        "change vs all skips on (mL)": [-0.002, 0.0001],
        "Dice vs all skips on": [0.5, 1.0],
    }
    assert against_all_on(table, scan) == (
        "**Against all skips on**: Anterior Dice 0.500, -0.002 mL, Posterior Dice 1.000, +0.000 mL"
    )
    assert distance_caption({}, scan) is None

    peer = PeerMask(
        "peer v1",
        np.where(mask == 1, 1, 0),
        replace(change, dice_to_reference={"Anterior": 1.0, "Posterior": 0.0}),
    )
    now = CaseScores(
        "case",
        dice={"Anterior": 0.8, "Posterior": 0.7},
        hd95={"Anterior": 1.5, "Posterior": math.nan},
        nsd={"Anterior": 0.9, "Posterior": 0.95},
        nsd_tolerance=2.0,
    )
    table = metrics_table(
        NAMES, scan, mask, change, peer, {"now": now, "all on": now, "trained without": now}
    )
    assert list(table.columns) == [
        "label",
        "volume (mL)",
        "change vs all skips on (mL)",
        "Dice vs all skips on",
        "volume, trained without (mL)",
        "Dice, switched off vs trained without",
        *(
            f"{metric} vs truth ({when})"
            for metric in ("dice", "hd95", "nsd")
            for when in ("now", "all on", "trained without")
        ),
    ]
    assert list(table["volume, trained without (mL)"]) == [0.01, 0.0]
    assert list(table["Dice, switched off vs trained without"]) == [1.0, 0.0]
    assert table["hd95 vs truth (now)"][0] == 1.5 and math.isnan(table["hd95 vs truth (now)"][1])
    assert distance_caption({"now": now}, scan) == "HD95 in mm; NSD with a tolerance of 2 mm."
    assert pd.read_csv(io.StringIO(table_csv(table))).shape == table.shape


def test_the_metrics_table_gives_the_compared_model_and_the_mean_uncertainty():
    scan = flat_scan(spacing=(1.0, 2.0, 1.0))
    mask = np.zeros(scan.array.shape, np.int64)
    mask[0, 0, :5] = 1
    change = MaskChange(
        mask > 0, mask > 0, {"Anterior": 0.0, "Posterior": 0.0}, {"Anterior": 1.0, "Posterior": 1.0}
    )
    compared = PeerMask(
        "member 1",
        np.where(mask == 1, 2, 0),
        replace(change, dice_to_reference={"Anterior": 0.0, "Posterior": 0.0}),
    )
    entropy = np.zeros(scan.array.shape, np.float32)
    entropy[0, 0, :2] = 0.5
    table = metrics_table(NAMES, scan, mask, change, compared=compared, uncertainty=entropy)
    assert list(table["volume, compared (mL)"]) == [0.0, 0.01]
    assert list(table["Dice vs compared"]) == [0.0, 0.0]
    assert table["mean uncertainty"][0] == 0.2, "two of the five Anterior voxels at 0.5"
    assert math.isnan(table["mean uncertainty"][1]), "no Posterior voxel to average over"


@pytest.fixture(scope="module")
def hippocampus_explorer(hippocampus_root) -> SkipExplorer:
    model = load("hippocampus_3d", device="cpu")
    scan = read_scan(hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz")
    return SkipExplorer(model.network, model.config, scan, model.runtime)


def test_the_metrics_table_from_a_real_explorer(hippocampus_explorer, hippocampus_root):
    explorer = hippocampus_explorer
    scan, names = explorer.scan, explorer.config.label_names
    built = explorer.model.resolve_skip_mask(None)
    reference = explorer.mask(built)
    mask = explorer.mask((False, *built[1:]))
    change = explorer.compare(mask, reference)
    truth = read_scan(hippocampus_root / "Task04_Hippocampus" / "labelsTr" / f"{CASE}.nii.gz").array
    scores = {"now": explorer.score(mask, truth), "all on": explorer.score(reference, truth)}
    table = metrics_table(names, scan, mask, change, scores=scores)
    assert list(table["label"]) == ["Anterior", "Posterior"]
    for value, name in ((1, "Anterior"), (2, "Posterior")):
        row = table.set_index("label").loc[name]
        assert row["volume (mL)"] == round(float((mask == value).sum()) * scan.voxel_volume, 4)
        before = float((reference == value).sum()) * scan.voxel_volume
        assert row["change vs all skips on (mL)"] == pytest.approx(row["volume (mL)"] - before, abs=1e-3)
        assert row["dice vs truth (now)"] == round(scores["now"].dice[name], 4)
    assert (table["Dice vs all skips on"] < 1.0).all()
    assert (table["dice vs truth (all on)"] > 0.8).all()
    same = metrics_table(names, scan, reference, explorer.compare(reference, reference))
    assert (same["Dice vs all skips on"] == 1.0).all() and (same["change vs all skips on (mL)"] == 0).all()
    assert "Anterior Dice 1.000, +0.000 mL" in against_all_on(same, scan)

    written = nib.Nifti1Image.from_bytes(gzip.decompress(mask_nifti(mask, scan, names)))
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    np.testing.assert_allclose(written.affine, scan.affine, atol=1e-5)


def test_the_explorers_uncertainty_is_high_on_the_border_and_keeps_switched_off_skips_off(
    hippocampus_explorer,
):
    explorer = hippocampus_explorer
    built = explorer.model.resolve_skip_mask(None)
    found = explorer.uncertainty(built)
    assert found.source == "the 3 members of the ensemble"
    assert found.entropy.shape == explorer.scan.array.shape and found.entropy.dtype == np.float32
    assert found.entropy.min() >= 0.0 and found.entropy.max() <= 1.0
    mask = explorer.mask(built)
    labelled = mask > 0
    border = labelled ^ ndimage.binary_erosion(labelled)
    far = ~ndimage.binary_dilation(labelled, iterations=4)
    assert found.entropy[border].mean() > 10 * found.entropy[far].mean()
    assert explorer.uncertainty(built) is found, "cached per skip mask"
    switched = explorer.uncertainty((False, *built[1:]))
    assert switched is not found and not np.array_equal(switched.entropy, found.entropy)


# --- the page, driven headless ------------------------------------------------------------------


@pytest.mark.slow
def test_an_unusable_mlflow_store_leaves_the_bundled_models(tmp_path, monkeypatch):
    (tmp_path / "broken.db").write_text("not a database")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'broken.db'}")
    monkeypatch.chdir(tmp_path)
    app = AppTest.from_file(VIEWER, default_timeout=180).run()
    assert not app.exception
    (caption,) = [caption.value for caption in app.sidebar.caption]
    assert caption.startswith(
        "MLflow models unavailable. Could not list the registered models in the MLflow store"
    )
    assert "broken.db" in caption and "DatabaseError" in caption
    assert app.selectbox(key="model").options == [
        "hippocampus_3d (bundled)",
        "isbi2012_2d (bundled)",
        *(f"hippocampus_3d/member_{k} (bundled ensemble member)" for k in (1, 2, 3)),
    ]
    assert "Upload a scan to begin, or try the example." in [info.value for info in app.info]


@pytest.mark.slow
def test_upload_shows_the_mask_and_switching_a_skip_changes_picture_and_numbers(viewer, case_bytes, media):
    scan, truth = case_bytes
    assert "Upload a scan to begin, or try the example." in [info.value for info in viewer.info]
    app = upload(viewer, "scan", "case.nii.gz", scan)
    assert not app.exception and not app.error
    assert [
        (toggle.key, toggle.label) for toggle in app.sidebar.toggle if toggle.key.startswith("skip_")
    ] == [
        ("skip_level_1", "level 1 - full resolution, 1 mm"),
        ("skip_level_2", "level 2 - 1/2 resolution, 2 mm"),
        ("skip_level_3", "level 3 - 1/4 resolution, 4 mm"),
        ("skip_level_4", "level 4 - 1/8 resolution, 8 mm"),
    ], "one switch per long skip, levels counted from 1"
    assert any(markdown.value.startswith("**Mask** (skips 1111): ") for markdown in app.markdown)
    assert "Anterior Dice 1.000" in next(m.value for m in app.markdown if "Against all skips on" in m.value)
    assert [image.captions[0] for image in app.image] == ["axial", "coronal", "sagittal"]
    before = [image.value[0] for image in app.image]
    table = metrics(app)
    assert list(table["label"]) == ["Anterior", "Posterior"]
    assert (table["volume (mL)"] > 0.5).all()
    assert (table["Dice vs all skips on"] == 1.0).all()

    app = upload(app, "truth", "labels.nii.gz", truth)
    assert (metrics(app)["dice vs truth (all on)"] > 0.8).all()

    app = app.toggle(key="skip_level_1").set_value(False).run()
    assert not app.exception
    assert any(markdown.value.startswith("**Mask** (skips 0111): ") for markdown in app.markdown)
    assert "`--set model.long_skips=[0,1,1,1] model.skip_dropout=0`" in app.sidebar.caption[-1].value
    assert "HD95 in mm; NSD with a tolerance of" in " ".join(caption.value for caption in app.caption)
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


@pytest.mark.slow
def test_the_example_compared_with_a_member_its_uncertainty_and_its_3d_view(viewer):
    """Try the example (its labels come as the ground truth), compare the ensemble with one of
    its members, then a model of another task, then the uncertainty map and the 3D view, with a
    label recoloured and one hidden."""
    app = viewer.button(key="try_example").click().run()
    assert not app.exception and not app.error
    assert (metrics(app)["dice vs truth (now)"] > 0.8).all(), "the example's labels are its ground truth"

    app = app.selectbox(key="compare").set_value("hippocampus_3d/member_1 (bundled ensemble member)").run()
    assert not app.exception and not app.error
    captions = [image.captions[0] for image in app.image]
    assert captions[3:] == [
        f"{plane}: {row}" for row in ("compared", "differences") for plane in ("axial", "coronal", "sagittal")
    ]
    table = metrics(app)
    assert table["Dice vs compared"].between(0.8, 1.0).all()
    assert (table["dice vs truth (compared)"] > 0.8).all()
    assert any(m.value.startswith("**Where the two differ**") for m in app.markdown)

    app = app.selectbox(key="compare").set_value("isbi2012_2d (bundled)").run()
    assert [warning.value for warning in app.sidebar.warning] == [
        "isbi2012_2d labels 1 membrane, not 1 Anterior, 2 Posterior as hippocampus_3d does; "
        "compare two models of one task."
    ]
    assert len(app.image) == 3 and "Dice vs compared" not in metrics(app).columns

    app = app.selectbox(key="compare").set_value(NO_COMPARISON).run()
    app = app.toggle(key="uncertainty").set_value(True).run()
    assert not app.exception
    assert [image.captions[0] for image in app.image][3:] == [
        f"{plane}: uncertainty" for plane in ("axial", "coronal", "sagittal")
    ]
    assert any("Samples: the 3 members of the ensemble." in m.value for m in app.markdown)
    assert metrics(app)["mean uncertainty"].between(0.0, 1.0).all()

    app = app.color_picker(key="label_colour_1").set_value("#00ff00").run()
    app = app.checkbox(key="label_shown_2").uncheck().run()
    app = app.toggle(key="view_3d").set_value(True).run()
    assert not app.exception
    summary = next(m.value for m in app.markdown if m.value.startswith("**Mask**"))
    assert "rgb(0, 255, 0)'>&#9632;</span> Anterior" in summary and "Posterior" not in summary
    [chart] = app.get("plotly_chart")
    traces = json.loads(chart.proto.spec)["data"]
    assert [(trace["type"], trace["name"], trace["color"]) for trace in traces] == [
        ("mesh3d", "Anterior", "#00ff00")
    ]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("notes.txt.gz", b"hello", "is not a supported file"),
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


@pytest.mark.slow
def test_a_ground_truth_of_another_scan_is_refused(viewer, case_bytes, hippocampus_root):
    other = sorted((hippocampus_root / "Task04_Hippocampus" / "labelsTr").glob("*.nii.gz"))[5].read_bytes()
    app = upload(viewer, "scan", "case.nii.gz", case_bytes[0])
    app = upload(app, "truth", "other.nii.gz", other)
    assert any(
        error.value.startswith("other.nii.gz: the label's shape or affine differs from the image's; ")
        and error.value.endswith("check that it is the labelling of case.nii.gz.")
        for error in app.error
    ), "named as uploaded"
    assert "dice vs truth (now)" not in metrics(app).columns


@pytest.mark.slow
def test_a_ground_truth_with_labels_the_model_does_not_know_is_refused(viewer, case_bytes):
    truth = nib.Nifti1Image.from_bytes(gzip.decompress(case_bytes[1]))
    binary = (np.asarray(truth.dataobj) > 0).astype(np.uint8) * 255  # a 0/255 mask, as image tools save
    foreign = gzip.compress(nib.Nifti1Image(binary, truth.affine).to_bytes())
    app = upload(viewer, "scan", "case.nii.gz", case_bytes[0])
    app = upload(app, "truth", "mask.nii.gz", foreign)
    assert not app.exception
    assert any("holds label values 0..255 but the model knows 0..2" in error.value for error in app.error)
    assert "dice vs truth (now)" not in metrics(app).columns


@pytest.mark.slow
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
        "model.long_skips=[1,0,1,1]",
        "model.skip_dropout=0",
        "name=hippocampus_3d_skips1011",
    ]
    trained = subprocess.run(
        segment_command(
            "train", "--config", str(ROOT / "configs/hippocampus_3d.yaml"), "--quiet", *set_args(overrides)
        ),
        cwd=tmp_path,
        env=os.environ | {"SEGMENT_DATA_ROOT": str(hippocampus_root), "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    return uri


@pytest.mark.slow
def test_a_switched_off_skip_can_be_set_beside_a_model_trained_without_it(
    tmp_path, monkeypatch, case_bytes, store_with_a_model_trained_without_level_2
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_with_a_model_trained_without_level_2)
    monkeypatch.chdir(tmp_path)
    app = upload(AppTest.from_file(VIEWER, default_timeout=180).run(), "scan", "case.nii.gz", case_bytes[0])
    assert app.selectbox(key="model").value == "hippocampus_3d (bundled)"
    assert not [box for box in app.checkbox if box.key == "side_by_side"], "no peer while all skips are on"

    app = app.toggle(key="skip_level_1").set_value(False).run()
    assert not [box for box in app.checkbox if box.key == "side_by_side"], "no model lacks level 1 only"
    app = app.toggle(key="skip_level_1").set_value(True).run()
    app = app.toggle(key="skip_level_2").set_value(False).run()
    offer = app.checkbox(key="side_by_side")
    assert "hippocampus_3d_skips1011" in offer.label

    app = offer.check().run()
    assert not app.exception and not app.error
    captions = [image.captions[0] for image in app.image]
    assert captions[3:6] == [
        "axial: trained without",
        "coronal: trained without",
        "sagittal: trained without",
    ]
    app = upload(app, "truth", "labels.nii.gz", case_bytes[1])
    table = metrics(app)
    assert table["Dice, switched off vs trained without"].between(0, 1).all()
    assert table["volume, trained without (mL)"].ge(0).all()
    assert "dice vs truth (trained without)" in table.columns


@pytest.mark.slow
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
    assert app.toggle(key="skip_level_1").label.endswith("full resolution, 0.004 µm")
    assert app.toggle(key="skip_level_2").label.endswith("1/2 resolution, 0.008 µm"), (
        "pooled within the slice only"
    )
    table = metrics(app)
    assert 0.7 < table["dice vs truth (all on)"][0] <= 1.0
    assert table["volume (µm³)"][0] > 0
    assert 0.5 < table["nsd vs truth (all on)"][0] < 0.999, (
        "a tolerance of two pixels, not of the whole slice"
    )
    assert "NSD with a tolerance of 0.008 µm" in " ".join(caption.value for caption in app.caption)
