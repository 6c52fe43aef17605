"""Prediction and evaluation with the bundled hippocampus model on real scans."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import load_script, run_segment
from torch.profiler import profile
from typer.testing import CliRunner

from segment.cli import app
from segment.engine.device import make_runtime
from segment.engine.inference import predict_labels, predict_logits
from segment.engine.metrics import score_case
from segment.engine.preparation import prepare
from segment.engine.scoring import ablation_masks
from segment.io import read_scan
from segment.models import load_model
from segment.models.sources import resolve_model

CASE = "hippocampus_001"


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_model("hippocampus_3d"))


@pytest.fixture(scope="module")
def case_paths(hippocampus_root) -> tuple[Path, Path]:
    task = hippocampus_root / "Task04_Hippocampus"
    return task / "imagesTr" / f"{CASE}.nii.gz", task / "labelsTr" / f"{CASE}.nii.gz"


def reoriented(image: nib.Nifti1Image, kind: str) -> tuple[nib.Nifti1Image, callable]:
    """The same anatomy stored another way, and how to map its mask back to the original."""
    data = np.asarray(image.dataobj)
    if kind == "lps":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.array(data.shape[:2]) - 1
        return nib.Nifti1Image(data[::-1, ::-1].copy(), image.affine @ flip), lambda m: m[::-1, ::-1]
    # Axes stored S, A, R and the whole grid rotated 20 degrees: an oblique acquisition.
    permute = np.zeros((4, 4))
    permute[0, 2] = permute[1, 1] = permute[2, 0] = permute[3, 3] = 1
    angle = np.deg2rad(20)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    stored = np.transpose(data, (2, 1, 0)).copy()
    return nib.Nifti1Image(stored, rotation @ image.affine @ permute), lambda m: np.transpose(m, (2, 1, 0))


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    return 2 * ((a == label) & (b == label)).sum() / ((a == label).sum() + (b == label).sum())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_masks_keep_shape_affine_and_anatomy_whatever_the_orientation(tmp_path, case_paths, kind):
    image_path, label_path = case_paths
    original = nib.load(image_path)
    truth = np.asarray(nib.load(label_path).dataobj)
    other, back = reoriented(original, kind)
    assert nib.aff2axcodes(other.affine) != nib.aff2axcodes(original.affine)
    nib.save(other, tmp_path / f"{kind}.nii.gz")

    for name in ("ras", kind):
        source = image_path if name == "ras" else tmp_path / f"{kind}.nii.gz"
        result = run_segment(
            "predict",
            "--model",
            "hippocampus_3d",
            "--input",
            str(source),
            "--output",
            str(tmp_path / f"{name}_mask.nii.gz"),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
    ras_mask = nib.load(tmp_path / "ras_mask.nii.gz")
    other_mask = nib.load(tmp_path / f"{kind}_mask.nii.gz")
    assert other_mask.shape == other.shape
    np.testing.assert_allclose(other_mask.affine, other.affine, atol=1e-5)
    assert other_mask.get_data_dtype() == np.uint8
    assert b"1=Anterior 2=Posterior" in other_mask.header["descrip"].tobytes()
    assert json.loads((tmp_path / f"{kind}_mask.labels.json").read_text())["2"] == "Posterior"
    np.testing.assert_array_equal(back(np.asarray(other_mask.dataobj)), np.asarray(ras_mask.dataobj))
    assert dice(np.asarray(ras_mask.dataobj), truth, 1) > 0.7
    assert dice(np.asarray(ras_mask.dataobj), truth, 2) > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_scans_get_masks_with_their_own_geometry(tmp_path, case_paths, model, suffix):
    image_path, _ = case_paths
    itk_image = sitk.ReadImage(str(image_path))
    sitk.WriteImage(itk_image, str(tmp_path / f"scan{suffix}"))
    result = run_segment(
        "predict",
        "--model",
        "hippocampus_3d",
        "--input",
        f"scan{suffix}",
        "--output",
        f"mask{suffix}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    mask = sitk.ReadImage(str(tmp_path / f"mask{suffix}"))
    assert mask.GetSize() == itk_image.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), itk_image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetSpacing(), itk_image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(mask.GetDirection(), itk_image.GetDirection(), atol=1e-6)
    network, config = model
    expected = predict_labels(network, prepare(read_scan(image_path), config), make_runtime("cpu"), config)
    # bf16 arithmetic can tip a voxel whose two top classes tie; anything more is a geometry error.
    assert (sitk.GetArrayFromImage(mask).transpose(2, 1, 0) == expected).mean() > 0.999


@pytest.mark.slow
def test_fp32_cpu_inference_runs_onednn_convolutions_with_pytorchs_own_results(case_paths, model):
    network, config = model
    volume = prepare(read_scan(case_paths[0]), config).volume
    routed = make_runtime("cpu", amp="off")
    assert routed.onednn_convolutions
    pytorch_choice = dataclasses.replace(routed, onednn_convolutions=False)
    logits, kernels = {}, {}
    for name, runtime in (("routed", routed), ("pytorch", pytorch_choice)):
        prepared = runtime.prepare_model(copy.deepcopy(network))
        with profile() as profiler:
            logits[name] = predict_logits(prepared, volume, runtime, config)
        kernels[name] = {event.key for event in profiler.key_averages()}
    # PyTorch's own choice for a volume this small is its slow native kernel.
    assert "aten::slow_conv3d_forward" in kernels["pytorch"]
    assert "aten::slow_conv3d_forward" not in kernels["routed"]
    assert "aten::mkldnn_convolution" in kernels["routed"]
    # The two kernels sum in different orders, and the rounding grows through the layers (more
    # with one thread): the logits agree to fp32's accumulated rounding, the labels but for ties.
    torch.testing.assert_close(logits["routed"], logits["pytorch"], rtol=1e-3, atol=1e-3)
    assert (logits["routed"].argmax(1) == logits["pytorch"].argmax(1)).float().mean() > 0.9999


@pytest.mark.slow
def test_switching_skips_off_changes_the_mask(tmp_path, case_paths, model):
    network, config = model
    scan = read_scan(case_paths[0])
    runtime = make_runtime("cpu")
    prepared = prepare(scan, config)
    all_on = predict_labels(network, prepared, runtime, config)
    all_off = predict_labels(network, prepared, runtime, config, [0, 0, 0, 0])
    assert (all_on != all_off).sum() > 0


@pytest.mark.slow
def test_a_folder_of_scans_gives_one_mask_each(tmp_path, hippocampus_root):
    images = sorted((hippocampus_root / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]
    scans = tmp_path / "scans"
    scans.mkdir()
    for image in images:
        (scans / image.name).write_bytes(image.read_bytes())
    (scans / "notes.txt").write_text("not a scan")
    result = run_segment(
        "predict", "--model", "hippocampus_3d", "--input", "scans", "--output", "masks", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.nii.gz")) == [image.name for image in images]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("picture.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "is not a supported scan"),
        ("notes.nii.gz", b"just some text, not a scan", "is not a readable NIfTI file"),
        ("empty.nii.gz", b"", "is empty"),
    ],
)
def test_bad_inputs_give_one_sentence_and_no_output(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    result = run_segment(
        "predict", "--model", "hippocampus_3d", "--input", name, "--output", "mask.nii.gz", cwd=tmp_path
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.slow
def test_truncated_scan_is_refused_and_leaves_nothing(tmp_path, case_paths):
    data = case_paths[0].read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    result = run_segment(
        "predict",
        "--model",
        "hippocampus_3d",
        "--input",
        "cut.nii.gz",
        "--output",
        "mask.nii.gz",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "cut.nii.gz is not a readable NIfTI file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.nii.gz"]


@pytest.mark.slow
def test_unknown_model_names_the_choices(tmp_path, case_paths):
    result = run_segment(
        "predict", "--model", "nonsense", "--input", str(case_paths[0]), "--output", "y.nii.gz", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "is not a bundled model (" in result.stderr
    assert "hippocampus_3d" in result.stderr


@pytest.mark.slow
def test_evaluate_writes_the_documented_json_with_every_skip_level_ablated(tmp_path, hippocampus_root):
    result = run_segment(
        "evaluate",
        "--model",
        "hippocampus_3d",
        "--data",
        str(hippocampus_root / "Task04_Hippocampus"),
        "--max-cases",
        "3",
        "--ablate-skips",
        "--json",
        "report.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "hippocampus_3d"
    assert report["cases"] == 3
    for metric in ("dice", "hd95", "nsd"):
        assert set(report[metric]) == {"Anterior", "Posterior"}
    assert 0.7 < report["mean_dice"] <= 1.0
    assert all(0 <= value < 10 for value in report["hd95"].values())
    settings = [row["skip_mask"] for row in report["ablation"]]
    assert settings == [[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert report["ablation"][0]["mean_dice"] == pytest.approx(report["mean_dice"])
    assert report["ablation"][-1]["mean_dice"] < report["mean_dice"]
    assert (report["unit"], report["nsd_tolerance"], report["volume_unit"]) == ("mm", 1.0, "mL")
    assert all(0.5 < volume < 5.0 for volume in report["volume"].values()), "a hippocampus is a few mL"
    assert set(report["per_case"][0]) == {"case", "dice", "hd95", "nsd", "volume"}


def test_nsd_counts_boundary_voxels_within_the_tolerance_in_the_scans_unit(hippocampus_root):
    label = read_scan(hippocampus_root / "Task04_Hippocampus" / "labelsTr" / f"{CASE}.nii.gz")
    truth = label.array.round().astype(np.int64)
    shifted = np.roll(truth, 1, axis=0)  # every boundary one voxel (1 mm) out
    names = {0: "background", 1: "Anterior", 2: "Posterior"}
    within = score_case(CASE, shifted, truth, label, names, nsd_tolerance=1.0)
    tighter = score_case(CASE, shifted, truth, label, names, nsd_tolerance=0.5)
    assert all(within.nsd[name] > 0.9 for name in ("Anterior", "Posterior"))
    assert all(tighter.nsd[name] < within.nsd[name] - 0.2 for name in ("Anterior", "Posterior"))


def test_a_label_the_prediction_misses_has_no_hausdorff_distance_and_no_volume(hippocampus_root):
    label = read_scan(hippocampus_root / "Task04_Hippocampus" / "labelsTr" / f"{CASE}.nii.gz")
    truth = label.array.round().astype(np.int64)
    without_posterior = np.where(truth == 2, 0, truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_case(CASE, without_posterior, truth, label, {0: "background", 1: "Anterior", 2: "Posterior"})
    # Scored on purpose, so without MONAI's per-label warning about the empty surface.
    assert not [w for w in caught if "is all 0" in str(w.message)]
    assert math.isnan(scores.hd95["Posterior"]) and scores.volume["Posterior"] == 0.0
    assert scores.dice["Posterior"] == 0.0 and scores.hd95["Anterior"] == 0.0
    assert scores.volume["Anterior"] == (truth == 1).sum() * label.voxel_volume


@pytest.mark.slow
def refused_in_process(*args: str) -> str:
    """``segment ARGS`` run in this process (a subprocess costs seconds of imports): the one
    sentence it refused with."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = result.stderr.strip().splitlines()
    return line


def test_segment_ensemble_joins_models_into_one_that_predicts(tmp_path, monkeypatch, case_paths):
    bundle = resolve_model("hippocampus_3d")
    members = [str(bundle / "member_1"), str(bundle / "member_3")]
    built = run_segment("ensemble", *members, "--output", "pair", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    predicted = run_segment(
        "predict",
        "--model",
        "pair",
        "--input",
        str(case_paths[0]),
        "--output",
        "mask.nii.gz",
        "--skip-mask",
        "0,1,1,1",
        cwd=tmp_path,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(case_paths[0]).shape
    for args, expected in [
        ((*members, "--output", "pair"), "pair already exists"),
        ((members[0], "--output", "one"), "needs at least two models"),
        (("hippocampus_3d", members[0], "--output", "nested"), "hippocampus_3d is an ensemble already"),
        ((members[0], "isbi2012_2d", "--output", "mixed"), "member 2 differs from member 1 in data.task"),
    ]:
        monkeypatch.chdir(tmp_path)
        assert expected in refused_in_process("ensemble", *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.labels.json", "mask.nii.gz", "pair"]


@pytest.mark.slow
def test_segment_export_writes_a_standalone_copy_that_predicts_the_same_mask(tmp_path, monkeypatch, case_paths):
    member = str(resolve_model("hippocampus_3d") / "member_3")
    exported = run_segment("export", member, "--float16", "--output", "copy", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.yaml", "model.safetensors"]
    for source, mask in ((member, "original.nii.gz"), ("copy", "copy.nii.gz")):
        predicted = run_segment(
            "predict", "--model", source, "--input", str(case_paths[0]), "--output", mask, cwd=tmp_path
        )
        assert predicted.returncode == 0, predicted.stderr
    assert np.array_equal(
        np.asarray(nib.load(tmp_path / "copy.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "original.nii.gz").dataobj),
    )
    for args, expected in [
        ((member, "--output", "copy"), "copy already exists"),
        ((str(tmp_path), "--output", "broken"), "is not a model directory"),
    ]:
        monkeypatch.chdir(tmp_path)
        assert expected in refused_in_process("export", *args)
    assert not (tmp_path / "broken").exists()


def test_the_ablation_never_switches_on_a_skip_the_model_was_built_without():
    assert ablation_masks((True, True)) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    assert ablation_masks((True, False, True, True)) == [
        (1, 0, 1, 1),
        (0, 0, 1, 1),
        (1, 0, 0, 1),
        (1, 0, 1, 0),
        (0, 0, 0, 0),
    ]
    assert ablation_masks((False, False)) == [(0, 0)]
    assert ablation_masks((True, False, True), full_sweep=True) == [(1, 0, 1), (1, 0, 0), (0, 0, 1), (0, 0, 0)]


@pytest.mark.slow
def test_evaluate_measures_em_boundaries_within_two_pixels_by_default(tmp_path, isbi_source):
    """The converted EM task is in micrometres: the default NSD tolerance is two 4 nm pixels,
    not a millimetre that would cover the whole image."""
    isbi2012 = load_script("isbi2012_to_nifti")
    task = tmp_path / "Task90_ISBI2012"
    task.mkdir()
    isbi2012.write_task(isbi2012.find_pairs(isbi_source)[:2], task)
    result = run_segment(
        "evaluate", "--model", "isbi2012_2d", "--data", str(task), "--json", "report.json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cases"] == 2
    assert report["unit"] == "µm"
    assert report["nsd_tolerance"] == pytest.approx(0.008)
    # A 512 x 512 slice of 4 x 4 x 50 nm voxels holds 0.2 µm³; membrane is about a fifth of it.
    assert report["volume_unit"] == "µm³"
    assert 0.01 < report["volume"]["membrane"] < 0.2
    [membrane] = report["nsd"].values()
    assert 0.5 < membrane < 0.999
